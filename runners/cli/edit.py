"""`qwen-edit edit`: jobs from the command line or a batch file, checked before loading, run on one pipeline.

Edit flags follow mflux's `mflux-generate-qwen-edit` (images, --prompt or --prompt-file,
--negative-prompt, --seed taking several values, one image per seed, --steps, --width/--height,
--lora) and ComfyUI's KSampler names (--sampler, --scheduler, --cfg, --denoise, --shift). Everything
that can be checked before loading the 20 GB of models is checked first: parameter values, input
images, the batch file, the output template, the model files (resolved by the library's
`settings.resolve_spec`, the command line's files and options on top of the settings).
"""

from __future__ import annotations

import argparse
import json
import secrets
import string
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .output import EXIT_INTERNAL, EXIT_USAGE, CliError, Reporter, cli_error

if TYPE_CHECKING:  # the library loads when a command needs it, not for --help
    from qwen_edit.errors import QwenEditError
    from qwen_edit.pipeline import QwenEditPipeline
    from qwen_edit.settings import PipelineSpec, Settings

# Edit parameters: CLI flag dest -> EditParams field.
PARAM_FLAGS = {
    "negative_prompt": "negative_prompt",
    "steps": "steps",
    "cfg": "cfg",
    "sampler": "sampler_name",
    "scheduler": "scheduler",
    "denoise": "denoise",
    "shift": "shift",
    "width": "width",
    "height": "height",
    "batch_size": "batch_size",
}
# Keys of a JSON line in a --batch-file: the flags' names, EditParams' own names, and a few more.
JOB_KEYS = {
    **PARAM_FLAGS,
    **{name: name for name in PARAM_FLAGS.values()},
    "prompt": "prompt",
    "images": "images",
    "image": "images",
    "seed": "seed",
    "guidance": "cfg",
    "out": "out",
    "loras": "loras",
}
MAX_RANDOM_SEED = 2**32 - 1  # random seeds stay short enough to retype


# -- jobs ----------------------------------------------------------------------------------------


@dataclass
class Job:
    """One `pipe.edit` call: where it came from (for messages), its inputs and parameters."""

    index: int
    source: str  # "command line" or "batch.txt:3"
    images: list  # paths (str) or PIL images (the demo's generated input)
    params: dict  # EditParams fields, prompt included
    out: str
    # (path or name, strength) as given, then LoraSpecs once resolved; None: the run's (config or --lora)
    loras: list | None = None
    outputs: list[str] = field(default_factory=list)


def parse_lora(spec) -> tuple[str, float]:
    """`path[:strength]` (or [path, strength] / {path|name, strength} in a batch file)."""
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        return str(spec[0]), float(spec[1])
    if isinstance(spec, dict) and ("path" in spec or "name" in spec):
        return str(spec.get("path", spec.get("name"))), float(spec.get("strength", 1.0))
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a LoRA is 'path[:strength]', got {spec!r}")
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass  # a ':' inside the path, no strength
    return spec, 1.0


def _usage(message: str, field_name: str | None = None) -> CliError:
    return CliError(
        "bad_parameter", message, EXIT_USAGE, details={"field": field_name} if field_name else None
    )


def read_batch_file(path: Path) -> list[tuple[str, dict]]:
    """(source, overrides) per job line: a JSON object, or a bare prompt. Blank and # lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _usage(f"--batch-file {path}: {exc.strerror or exc}", "batch_file") from exc
    jobs = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        source = f"{path.name}:{number}"
        if not stripped.startswith("{"):
            jobs.append((source, {"prompt": stripped}))
            continue
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise _usage(f"{source}: not valid JSON ({exc.msg} at column {exc.colno})", "batch_file") from exc
        unknown = sorted(set(obj) - set(JOB_KEYS))
        if unknown:
            raise _usage(
                f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(JOB_KEYS))}", "batch_file"
            )
        jobs.append((source, {JOB_KEYS[k]: v for k, v in obj.items()}))
    if not jobs:
        raise _usage(f"--batch-file {path} holds no jobs", "batch_file")
    return jobs


def build_jobs(args, defaults: dict, demo_image=None) -> list[Job]:
    """Jobs from the command line or the batch file, each seed its own job, every parameter checked."""
    from qwen_edit.params import MAX_IMAGES, EditParams, ParameterError

    base = dict(defaults)
    base.update({PARAM_FLAGS[k]: getattr(args, k) for k in PARAM_FLAGS if getattr(args, k, None) is not None})
    cli_images = list(getattr(args, "images", None) or [])
    prompt = args.prompt
    if getattr(args, "prompt_file", None):
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise _usage(f"--prompt-file {args.prompt_file}: {exc.strerror or exc}", "prompt_file") from exc
    if getattr(args, "batch_file", None):
        entries = read_batch_file(Path(args.batch_file))
    else:
        if prompt is None:
            raise _usage("give --prompt (or --prompt-file, or --batch-file)", "prompt")
        entries = [("command line", {})]
    jobs: list[Job] = []
    for source, overrides in entries:
        params = {**base, "prompt": prompt if prompt is not None else ""}
        overrides = dict(overrides)
        images = overrides.pop("images", cli_images)
        images = [images] if isinstance(images, str) else list(images)
        out = str(overrides.pop("out", args.out))
        loras = None  # the pipeline's LoRAs (config or --lora) unless the line names its own
        if "loras" in overrides:
            try:
                loras = [parse_lora(s) for s in overrides.pop("loras")]
            except (TypeError, ValueError) as exc:
                raise _usage(f"{source}: loras: {exc}", "loras") from exc
        seeds = overrides.pop("seed", None)
        params.update(overrides)
        if seeds is None:
            seeds = args.seed if args.seed else [params.pop("seed", None)]
        seeds = seeds if isinstance(seeds, list) else [seeds]
        if demo_image is not None and not images:
            images = [demo_image]
        if "prompt" not in overrides and prompt is None:
            raise _usage(f"{source}: no prompt (give --prompt, or a prompt on the line)", "prompt")
        if not 1 <= len(images) <= MAX_IMAGES:
            raise _usage(f"{source}: give 1 to {MAX_IMAGES} input images, got {len(images)}", "images")
        for i, image in enumerate(images):
            if isinstance(image, str):
                check_image(image, f"{source}: images[{i}]")
        for seed in seeds:
            seed = secrets.randbelow(MAX_RANDOM_SEED + 1) if seed is None else seed
            job_params = {**params, "seed": seed}
            try:
                job_params = EditParams(**job_params).to_dict()  # every field, defaults filled in
            except ParameterError as exc:
                raise cli_error(exc, prefix=f"{source}: ", details={"job": len(jobs)}) from exc
            except TypeError as exc:  # a wrong key slipped through (shouldn't: JOB_KEYS maps them)
                raise _usage(f"{source}: {exc}") from exc
            jobs.append(Job(len(jobs), source, images, job_params, out, loras))
    for job in jobs:
        check_out_template(job.out, job.source)
    return jobs


def check_image(path: str, where: str) -> None:
    """The input exists and decodes as an image (checked before the models load)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise CliError(
            "image_not_found", f"{where}: no such file: {path}", EXIT_USAGE, details={"field": "images"}
        )
    try:
        with Image.open(p) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CliError(
            "bad_image",
            f"{where}: {path} is not a readable image ({exc})",
            EXIT_USAGE,
            details={"field": "images"},
        ) from exc


def check_out_template(template: str, where: str) -> None:
    try:
        name = template.format(seed=0, job=0, index=0)
    except (KeyError, IndexError, ValueError) as exc:
        raise _usage(
            f"{where}: --out {template!r}: only {{seed}}, {{job}} and {{index}} can be filled in ({exc})",
            "out",
        ) from exc
    if not name or name.endswith(("/", "\\")):
        raise _usage(f"{where}: --out {template!r} is not a file name", "out")


def output_paths(job: Job, seed: int, count: int, n_jobs: int, written: set[str]) -> list[Path]:
    """Where job's images go: the template filled in; `_<index>` for several images and `_<job>` when
    two jobs would write the same file (nothing written in one run is overwritten by the same run)."""
    paths = []
    for i in range(count):
        path = Path(job.out.format(seed=seed, job=job.index, index=i)).expanduser()
        if not path.suffix:
            path = path.with_suffix(".png")
        if count > 1 and "index" not in _template_fields(job.out):
            path = path.with_name(f"{path.stem}_{i}{path.suffix}")
        if str(path) in written and n_jobs > 1:
            path = path.with_name(f"{path.stem}_job{job.index}{path.suffix}")
        written.add(str(path))
        paths.append(path)
    return paths


def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


# -- models --------------------------------------------------------------------------------------

FILE_FLAGS = ("transformer", "text_encoder", "vae", "tokenizer")  # flag dest = the library's slot name


def load_cli_settings(args: argparse.Namespace) -> Settings:
    """Settings from --config/--models-dir; a bad or missing settings file is a usage error (2)."""
    from qwen_edit.errors import QwenEditError
    from qwen_edit.settings import load_settings

    from .locations import settings_layers

    try:
        return load_settings(settings_layers(args.config, args.models_dir))
    except QwenEditError as exc:
        raise cli_error(exc, prefix="settings: " if exc.kind == "config" else "") from exc


def cli_spec(args: argparse.Namespace, settings: Settings) -> PipelineSpec:
    """The PipelineSpec for this run: the settings, with the command line's files and options on top
    (a file flag or --lora is a path, or a name in its folder). The demo's files are its own."""
    from qwen_edit.errors import QwenEditError
    from qwen_edit.settings import resolve_spec

    if args.demo:  # the demo's own files and backend; "auto" compute is its bf16
        overrides = {"compute": None if args.compute == "auto" else args.compute}
    else:
        overrides = {slot: getattr(args, slot, None) for slot in FILE_FLAGS}
        overrides.update(backend=args.backend, compute=args.compute)
    try:
        return resolve_spec(
            settings,
            **overrides,
            loras=[parse_lora(spec) for spec in args.lora] if args.lora else None,
            device=args.device,
            cpu_offload=args.offload,
            num_blocks_on_gpu=args.num_blocks_on_gpu,
            use_pin_memory=args.pin_memory,
            compile=True if args.compile else None,
            allow_paths=True,
        )
    except QwenEditError as exc:
        raise model_error(exc, args) from exc


def job_loras(job: Job, settings: Settings, args: argparse.Namespace) -> None:
    """A batch line's own LoRAs, resolved as --lora is."""
    from qwen_edit.errors import QwenEditError
    from qwen_edit.settings import resolve_lora

    try:
        job.loras = [
            resolve_lora(settings, name, strength, f"loras[{i}]", allow_paths=True)
            for i, (name, strength) in enumerate(job.loras)
        ]
    except QwenEditError as exc:
        raise model_error(exc, args) from exc


def model_error(exc: QwenEditError, args: argparse.Namespace) -> CliError:
    """A file the settings or flags name is missing: say how to get it (`qwen-edit download` fetches
    the models, not LoRAs)."""
    fix = None
    if exc.kind == "model_not_found":
        lora = str(exc.field or "").startswith(("loras", "models.loras"))
        fix = "check the LoRA's path, or its name in the loras folder" if lora else download_fix(args)
    return cli_error(exc, fix=fix)


def download_fix(args: argparse.Namespace) -> str:
    where = f" --models-dir {args.models_dir}" if getattr(args, "models_dir", None) else ""
    return f"qwen-edit download{where} (fetches the model files), or `qwen-edit doctor` to see what is where"


# -- running -------------------------------------------------------------------------------------


def run_jobs(pipe, jobs: list[Job], reporter: Reporter) -> tuple[list[dict], CliError | None]:
    """Run every job on one loaded pipeline; a job that fails at run time doesn't stop the others."""
    written: set[str] = set()
    results, first_error = [], None
    for job in jobs:
        reporter.event(
            "job_start",
            job=job.index,
            source=job.source,
            prompt=job.params["prompt"],
            seed=job.params["seed"],
            images=[_image_name(i) for i in job.images],
        )
        try:
            if job.loras is not None and tuple(job.loras) != pipe.lora_specs:
                pipe.set_loras(job.loras)  # no reload: LoRAs are side branches / low-rank appends
            result = run_one(pipe, job, len(jobs), reporter)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            error = cli_error(exc)
            if error.exit_code == EXIT_INTERNAL:
                traceback.print_exc(file=sys.stderr)
            reporter.event("job_error", job=job.index, source=job.source, error=error.to_dict())
            reporter.note(f"job {job.index} ({job.source}) failed: {error.message}")
            first_error = first_error or error
            results.append({"job": job.index, "source": job.source, "ok": False, "error": error.to_dict()})
            continue
        paths = output_paths(job, result.seed, len(result.images), len(jobs), written)
        for i, path in enumerate(paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(result.png_bytes(i))
            job.outputs.append(str(path))
            reporter.event(
                "output",
                job=job.index,
                index=i,
                path=str(path),
                seed=result.seed,
                size=list(result.images[i].size),
            )
            reporter.say(
                f"saved {path} (seed {result.seed}, {result.images[i].size[0]}x{result.images[i].size[1]})"
            )
        timings = {
            k: (round(v, 4) if isinstance(v, float) else [round(s, 4) for s in v])
            for k, v in result.timings.items()
        }
        reporter.event("job_done", job=job.index, seconds=timings.get("total"), timings=timings)
        results.append(
            {
                "job": job.index,
                "source": job.source,
                "ok": True,
                "seed": result.seed,
                "outputs": job.outputs,
                "timings": timings,
                "parameters": result.parameters,
            }
        )
    return results, first_error


def _image_name(image) -> str:
    return image if isinstance(image, str) else "<generated>"


def run_one(pipe, job: Job, n_jobs: int, reporter: Reporter):
    """One edit with progress: NDJSON `progress` events, or a bar on a terminal."""
    bar = None
    if not reporter.json_mode and sys.stderr.isatty():
        from tqdm import tqdm

        label = f"job {job.index + 1}/{n_jobs}" if n_jobs > 1 else "edit"
        bar = tqdm(total=job.params["steps"], desc=label, unit="step", file=sys.stderr, leave=False)
    last = [0.0]

    def callback(step: int, total: int, _latent) -> None:
        if bar is not None:
            bar.total = total
            bar.update(step - bar.n)
        now = time.monotonic()
        if step == total or now - last[0] >= 0.1:  # comfy-cli throttles progress to ~10 Hz
            last[0] = now
            reporter.event("progress", job=job.index, step=step, total=total)

    params = dict(job.params)
    prompt = params.pop("prompt")
    try:
        return pipe.edit(job.images, prompt, callback=callback, **params)
    finally:
        if bar is not None:
            bar.close()


# -- the command ---------------------------------------------------------------------------------


def cmd_edit(args: argparse.Namespace, reporter: Reporter) -> int:
    if args.demo:
        from qwen_edit.testing.demo import demo_settings

        settings, defaults = demo_settings(args.cache_dir), {}
    else:
        settings = load_cli_settings(args)
        defaults = settings.edit_defaults()
    jobs = build_jobs(args, defaults)
    spec = cli_spec(args, settings)
    for job in jobs:  # a batch line's LoRAs resolve like --lora; the others use the run's
        if job.loras is None:
            job.loras = list(spec.loras)
        else:
            job_loras(job, settings, args)
    return execute(args, spec, jobs, reporter)


def execute(
    args: argparse.Namespace,
    spec: PipelineSpec,
    jobs: list[Job],
    reporter: Reporter,
    extra: dict | None = None,
) -> int:
    """The plan event; then (unless --dry-run) load once, run every job, and the envelope."""
    if spec.demo:
        files = {"demo": True, "loras": [[str(lora.path), lora.strength] for lora in spec.loras]}
    else:
        files = spec.describe()
    plan = [
        {
            "job": j.index,
            "source": j.source,
            "images": [_image_name(i) for i in j.images],
            "parameters": j.params,
            "out": j.out,
        }
        for j in jobs
    ]
    reporter.event("plan", jobs=plan, models=files)
    if getattr(args, "dry_run", False):
        reporter.say(
            f"{len(jobs)} job(s) checked; models: "
            + ", ".join(f"{k}={v}" for k, v in files.items() if k != "loras" and v)
        )
        return reporter.succeed({"dry_run": True, "jobs": plan, "models": files})
    pipe = load_pipeline(spec, reporter)
    results, error = run_jobs(pipe, jobs, reporter)
    info = pipe.info()
    data = {
        "outputs": [p for j in jobs for p in j.outputs],
        "jobs": results,
        "load_seconds": info["load_seconds"]["total"],
        "model": model_info(info),
        **(extra or {}),
    }
    if error is not None:
        return reporter.fail(error, data)
    return reporter.succeed(data)


def load_pipeline(spec: PipelineSpec, reporter: Reporter) -> QwenEditPipeline:
    from qwen_edit import QwenEditPipeline

    reporter.event("loading", demo=spec.demo)
    reporter.note("loading the models ..." if not spec.demo else "loading the tiny demo model ...")
    pipe = QwenEditPipeline.from_spec(spec)
    info = pipe.info()
    seconds = info["load_seconds"]["total"]
    model = model_info(info)
    reporter.event("loaded", seconds=seconds, **model)
    reporter.note(
        f"loaded in {seconds:.1f} s: {model.get('backend')} backend, {model.get('compute')} on "
        f"{model.get('device')}" + (f"; offload: {model['offload']}" if model.get("offload") else "")
    )
    return pipe


MODEL_KEYS = ("device", "backend", "compute", "precision", "rank", "reason", "offload")


def model_info(info: dict) -> dict:
    """What the `loaded` event and the envelope say about the pipeline (a part of `pipe.info()`)."""
    return {key: info[key] for key in MODEL_KEYS if info.get(key) is not None}
