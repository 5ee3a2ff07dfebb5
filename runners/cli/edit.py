"""`qwen-edit edit`: jobs from the command line or a batch file, checked before loading, run on one pipeline.

Edit flags follow mflux's `mflux-generate-qwen-edit` (images, --prompt or --prompt-file,
--negative-prompt, --seed taking several values, one image per seed, --steps, --width/--height,
--lora) and ComfyUI's KSampler names (--sampler, --scheduler, --cfg, --denoise, --shift). Everything
that can be checked before loading the 20 GB of models is checked first: parameter values, input
images, the batch file, the output template and folder, the model files (resolved by the library's
`settings.resolve_spec`, the command line's files and options on top of the settings; their headers
read by `checks`). `--from PICTURE` takes a PNG's embedded parameters and provenance as the defaults,
so the same files make the same picture again.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import saving
from .checks import bad_image, check_device, check_image, check_model_files
from .output import EXIT_CANCELLED, EXIT_INTERNAL, EXIT_USAGE, CliError, Reporter, cli_error

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
RANDOM_SEED = -1  # --seed -1 (or "seed": -1 in a batch line): a random seed, as the worker takes it


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
            if seed is None or seed == RANDOM_SEED:
                seed = secrets.randbelow(MAX_RANDOM_SEED + 1)
            job_params = {**params, "seed": seed}
            try:
                job_params = EditParams(**job_params).to_dict()  # every field, defaults filled in
            except ParameterError as exc:
                raise cli_error(exc, prefix=f"{source}: ", details={"job": len(jobs)}) from exc
            except TypeError as exc:  # a wrong key slipped through (shouldn't: JOB_KEYS maps them)
                raise _usage(f"{source}: {exc}") from exc
            jobs.append(Job(len(jobs), source, images, job_params, out, loras))
    for job in jobs:
        saving.check_template(job.out, job.source)
    return jobs


def output_paths(job: Job, seed: int, count: int, taken: set[str], overwrite: bool = False) -> list[Path]:
    """Where a job's pictures go (saving.output_paths on the job's template)."""
    return saving.output_paths(job.out, seed, job.index, count, taken, overwrite)


# -- --from PICTURE ------------------------------------------------------------------------------


def apply_from(args: argparse.Namespace) -> dict:
    """--from PICTURE: what its PNG embeds (the parameters, the input pictures, the model files, backend,
    compute, device, the demo model) becomes this run's defaults; flags given on the command line win.
    Returns the metadata, for `check_reproduction` once the models are loaded."""
    from qwen_edit.provenance import read_metadata

    path = Path(args.from_picture)
    try:
        meta = read_metadata(path.read_bytes())
    except OSError as exc:
        raise _usage(f"--from {path}: {exc.strerror or exc}", "from") from exc
    except Exception as exc:  # PIL's errors for a file that is not an image
        raise bad_image(f"--from {path} is not a readable image ({exc})") from exc
    if "prompt" not in meta or "seed" not in meta:
        raise _usage(
            f"--from {path} holds no qwen-edit parameters (only the PNGs qwen-edit writes carry them)", "from"
        )
    if args.prompt is None and not args.prompt_file and not args.batch_file:
        args.prompt = meta["prompt"]
    for flag, key in PARAM_FLAGS.items():
        if getattr(args, flag) is None and meta.get(key) is not None:
            setattr(args, flag, meta[key])
    if not args.seed:
        args.seed = [meta["seed"]]
    if not args.images:
        pictures = meta.get("images") or []
        if not pictures or any("file" not in p for p in pictures):
            raise _usage(
                f"--from {path}: its input pictures were not files; give them on the command line", "images"
            )
        args.images = [p["file"] for p in pictures]
    if args.lora is None and "loras" in meta:
        args.lora = [f"{name}:{strength}" for name, strength in meta["loras"]]  # [] stays: no LoRAs
    models = meta.get("models") or {}
    if meta.get("demo"):
        args.demo = True
    else:
        for slot in ("transformer", "text_encoder", "vae"):
            if getattr(args, slot) is None and (models.get(slot) or {}).get("file"):
                setattr(args, slot, models[slot]["file"])
    for option in ("backend", "compute", "text_encoder_compute", "device"):
        if getattr(args, option) is None and meta.get(option):
            setattr(args, option, meta[option])
    return meta


def check_reproduction(meta: dict, provenance: dict, jobs: list[Job], reporter: Reporter) -> None:
    """Warn (not fail) where the files differ from those that made the --from picture: the result will."""
    differ = []
    made_with, loaded = meta.get("models") or {}, provenance.get("models") or {}
    for slot in ("transformer", "text_encoder", "vae"):
        before, now = (made_with.get(slot) or {}).get("sha256"), (loaded.get(slot) or {}).get("sha256")
        if before and now and before != now:
            differ.append(f"{slot} ({before} then, {now} now)")
    if [lora.get("sha256") for lora in made_with.get("loras") or []] != [
        lora.get("sha256") for lora in loaded.get("loras") or []
    ]:
        differ.append("the LoRA files")
    for job in jobs[:1]:
        then = [p.get("sha256") for p in meta.get("images") or []]
        now = [_picture(image).get("sha256") for image in job.images]
        if then and then != now:
            differ.append("the input pictures")
    for key in ("backend", "compute", "text_encoder_compute", "generator"):
        if meta.get(key) and meta.get(key) != provenance.get(key):
            differ.append(f"{key} ({meta[key]} then, {provenance.get(key)} now)")
    if differ:
        text = "not the same as what made the --from picture: " + "; ".join(differ)
        reporter.event("warning", message=text)
        reporter.note(f"warning: {text}; the result will differ")


def _picture(image) -> dict:
    from qwen_edit.provenance import picture_entry

    return picture_entry(image)


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
        overrides["text_encoder_compute"] = args.text_encoder_compute
    else:
        overrides = {slot: getattr(args, slot, None) for slot in FILE_FLAGS}
        overrides.update(
            backend=args.backend, compute=args.compute, text_encoder_compute=args.text_encoder_compute
        )
    try:
        return resolve_spec(
            settings,
            **overrides,
            loras=None if args.lora is None else [parse_lora(spec) for spec in args.lora],
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


def run_jobs(
    pipe,
    jobs: list[Job],
    reporter: Reporter,
    *,
    provenance: dict | None = None,
    overwrite: bool = False,
) -> tuple[list[dict], CliError | None]:
    """Run every job on one loaded pipeline; a job that fails while running or writing its pictures
    (out of memory, a full disk) is reported and the others still run. `provenance` is embedded in
    each PNG beside the parameters, with the job's input pictures."""
    taken: set[str] = set()
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
            extra = None
            if provenance is not None:
                extra = {**provenance, "images": [_picture(image) for image in job.images]}
            paths = output_paths(job, result.seed, len(result.images), taken, overwrite)
            for i, path in enumerate(paths):
                try:
                    data = result.encode(i, saving.format_of(path), extra)
                    saving.write_picture(path, data, overwrite)
                except OSError as exc:
                    raise saving.output_error(job.source, path, exc) from exc
                job.outputs.append(str(path))
                reporter.event(
                    "output",
                    job=job.index,
                    index=i,
                    path=str(path),
                    seed=result.seed,
                    size=list(result.images[i].size),
                )
                width, height = result.images[i].size
                reporter.say(f"saved {path} (seed {result.seed}, {width}x{height})")
        except KeyboardInterrupt:
            saved = [p for j in jobs for p in j.outputs]
            raise CliError(
                "cancelled",
                f"interrupted (Ctrl-C) during the edit of job {job.index} ({job.source}); "
                f"{len(saved)} picture(s) saved before it are kept",
                EXIT_CANCELLED,
                details={"outputs": saved},
            ) from None
        except Exception as exc:
            error = cli_error(exc)
            if error.exit_code == EXIT_INTERNAL:
                traceback.print_exc(file=sys.stderr)
            reporter.event("job_error", job=job.index, source=job.source, error=error.to_dict())
            reporter.note(f"job {job.index} ({job.source}) failed: {error.message}")
            first_error = first_error or error
            results.append(
                {"job": job.index, "source": job.source, "ok": False, "outputs": job.outputs,
                 "error": error.to_dict()}
            )  # fmt: skip
            continue
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
    meta = apply_from(args) if args.from_picture else None
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
    check_device(spec)
    check_model_files(spec)
    for job in jobs:
        if job.loras != list(spec.loras):
            check_model_files(spec.replace(loras=tuple(job.loras)))
    return execute(args, spec, jobs, reporter, from_meta=meta)


def execute(
    args: argparse.Namespace,
    spec: PipelineSpec,
    jobs: list[Job],
    reporter: Reporter,
    extra: dict | None = None,
    from_meta: dict | None = None,
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
    provenance = model_provenance(pipe, reporter)
    if from_meta is not None:
        check_reproduction(from_meta, provenance, jobs, reporter)
    overwrite = bool(getattr(args, "overwrite", False))
    results, error = run_jobs(pipe, jobs, reporter, provenance=provenance, overwrite=overwrite)
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


def model_provenance(pipe: QwenEditPipeline, reporter: Reporter) -> dict:
    """The pipeline as the pictures' metadata records it; model files are hashed once (then cached)."""
    from qwen_edit.provenance import pipeline_provenance

    start = time.monotonic()
    provenance = pipeline_provenance(pipe)
    seconds = time.monotonic() - start
    if seconds > 2:
        reporter.note(f"hashed the model files for the pictures' metadata in {seconds:.0f} s (once: cached)")
    return provenance


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


MODEL_KEYS = ("device", "backend", "compute", "text_encoder_compute", "precision", "rank", "reason",
              "offload")  # fmt: skip


def model_info(info: dict) -> dict:
    """What the `loaded` event and the envelope say about the pipeline (a part of `pipe.info()`)."""
    return {key: info[key] for key in MODEL_KEYS if info.get(key) is not None}
