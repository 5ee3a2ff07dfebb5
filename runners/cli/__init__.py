"""The `qwen-edit` command: edit, download, doctor, demo (and bench, runners/bench.py).

A thin runner over the library: argparse, the model folders, progress and output. Conventions:
- Edit flags follow mflux's `mflux-generate-qwen-edit` (images, --prompt or --prompt-file,
  --negative-prompt, --seed taking several values, one image per seed, --steps, --width/--height,
  --lora) and ComfyUI's KSampler names (--sampler, --scheduler, --cfg, --denoise, --shift).
- `--json` follows comfy-cli's NDJSON contract (runners/cli/output.py): events on stdout, one final
  envelope line, human text on stderr; the exit codes are documented in output.EXIT_CODES and
  the README ("Command line").
- Everything that can be checked before loading the 20 GB of models is checked first: parameter
  values, input images, the batch file, the output template, the model files.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import string
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .output import (
    EXIT_CANCELLED,
    EXIT_CODES,
    EXIT_INTERNAL,
    EXIT_MODEL,
    EXIT_RUNTIME,
    EXIT_USAGE,
    CliError,
    Reporter,
    human_bytes,
)

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
DEFAULT_OUT = "qwen-edit_{seed}.png"
MAX_RANDOM_SEED = 2**32 - 1  # random seeds stay short enough to retype


class _UsageError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so `--json` still gets its envelope for a bad flag."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(self, message)


# -- jobs ----------------------------------------------------------------------------------------


@dataclass
class Job:
    """One `pipe.edit` call: where it came from (for messages), its inputs and parameters."""

    index: int
    source: str  # "command line" or "batch.txt:3"
    images: list  # paths (str) or PIL images (the demo's generated input)
    params: dict  # EditParams fields, prompt included
    out: str
    loras: list[tuple[str, float]] | None = None  # None: the run's LoRAs (config or --lora)
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
                raise CliError(
                    "bad_parameter",
                    f"{source}: {exc}",
                    EXIT_USAGE,
                    details={"field": exc.field, "job": len(jobs)},
                ) from exc
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

SLOT_KINDS = {
    "transformer": "diffusion_models",
    "text_encoder": "text_encoders",
    "vae": "vae",
    "tokenizer": "tokenizers",
}


def load_cli_settings(args):
    """Settings from --config/--models-dir; a bad or missing settings file is a usage error (2)."""
    import yaml

    from qwen_edit.params import ParameterError
    from qwen_edit.settings import load_settings

    from .locations import settings_layers

    try:
        return load_settings(settings_layers(args.config, args.models_dir))
    except ParameterError as exc:
        raise CliError("bad_config", f"settings: {exc}", EXIT_USAGE, details={"field": exc.field}) from exc
    except FileNotFoundError as exc:
        raise CliError(
            "config_not_found",
            str(exc),
            EXIT_USAGE,
            fix="check the --config path (the presets are in the repository's configs/)",
        ) from exc
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        raise CliError("bad_config", f"settings: {exc}", EXIT_USAGE) from exc


def pipeline_kwargs(args, settings) -> dict:
    """from_files keyword arguments: the settings, with the command line's files and options on top."""
    from qwen_edit.paths import ModelNotFoundError, UnsafeModelNameError

    for slot, kind in SLOT_KINDS.items():
        value = getattr(args, slot, None)
        if value is None:
            continue
        path = Path(value).expanduser()
        if path.exists():  # a path: search its folder first, under its own name
            settings.folders.folders[kind].insert(0, path.absolute().parent)
            settings.models[slot] = path.name
        else:
            settings.models[slot] = value
    for name, attr in (
        ("device", "device"),
        ("backend", "backend"),
        ("compute", "compute"),
        ("offload", "cpu_offload"),
        ("num_blocks_on_gpu", "num_blocks_on_gpu"),
        ("pin_memory", "use_pin_memory"),
    ):
        if getattr(args, name, None) is not None:
            setattr(settings, attr, getattr(args, name))
    if args.compile:
        settings.compile = True
    try:
        kwargs = settings.pipeline_kwargs()
    except ModelNotFoundError as exc:
        raise CliError("model_not_found", str(exc), EXIT_MODEL, fix=download_fix(args)) from exc
    except UnsafeModelNameError as exc:
        raise CliError("bad_model_name", str(exc), EXIT_USAGE) from exc
    if args.lora:
        kwargs["loras"] = [resolve_lora(p, s, settings) for p, s in map(parse_lora, args.lora)]
    return kwargs


def resolve_lora(spec: str, strength: float, settings) -> tuple[str, float]:
    """A LoRA file path, or a name in the configured loras folders."""
    from qwen_edit.paths import ModelNotFoundError, UnsafeModelNameError

    path = Path(spec).expanduser()
    if path.is_file():
        return str(path.absolute()), strength
    if settings is None or path.is_absolute() or spec.startswith((".", "~")):
        raise CliError("model_not_found", f"LoRA file not found: {spec}", EXIT_MODEL)
    try:
        return str(settings.folders.resolve("loras", spec)), strength
    except (ModelNotFoundError, UnsafeModelNameError) as exc:
        raise CliError("model_not_found", f"LoRA: {exc}", EXIT_MODEL) from exc


def download_fix(args) -> str:
    where = f" --models-dir {args.models_dir}" if getattr(args, "models_dir", None) else ""
    return f"qwen-edit download{where} (fetches the model files), or `qwen-edit doctor` to see what is where"


def describe_files(kwargs: dict) -> dict:
    out = {}
    for key in ("transformer", "text_encoder", "vae", "tokenizer"):
        value = kwargs.get(key)
        out[key] = None if value is None else str(value)
    out["loras"] = [[str(p), s] for p, s in kwargs.get("loras", [])]
    return out


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
            if job.loras is not None and [(str(p), float(s)) for p, s in job.loras] != pipe.loras:
                pipe.set_loras(job.loras)  # no reload: LoRAs are side branches / low-rank appends
            result = run_one(pipe, job, len(jobs), reporter)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            error = classify(exc)
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


def classify(exc: BaseException) -> CliError:
    """A library exception as a CliError with its exit code (output.EXIT_CODES)."""
    if isinstance(exc, CliError):
        return exc  # before the imports below: they bring in torch, seconds for a usage error
    from qwen_edit.hardware import UnsupportedHardwareError
    from qwen_edit.params import ParameterError
    from qwen_edit.paths import ModelNotFoundError, UnsafeModelNameError
    from qwen_edit.svdq.checkpoint import CheckpointError

    if isinstance(exc, ParameterError):
        return CliError("bad_parameter", str(exc), EXIT_USAGE, details={"field": exc.field})
    if isinstance(exc, UnsafeModelNameError):
        return CliError("bad_model_name", str(exc), EXIT_USAGE)
    if isinstance(exc, ModelNotFoundError):
        return CliError("model_not_found", str(exc), EXIT_MODEL, fix="qwen-edit download")
    if isinstance(exc, FileNotFoundError):  # the tokenizer, a file that vanished after resolution
        return CliError("model_not_found", str(exc), EXIT_MODEL, fix="qwen-edit download; qwen-edit doctor")
    if isinstance(exc, CheckpointError):
        return CliError(
            "model_invalid",
            str(exc),
            EXIT_MODEL,
            fix="download the file again (qwen-edit download) or check which file this is",
        )
    if isinstance(exc, UnsupportedHardwareError):
        return CliError("unsupported_hardware", str(exc), EXIT_RUNTIME, fix="qwen-edit doctor")
    if type(exc).__name__ == "GPUOutOfMemoryError":
        return CliError(
            "out_of_memory",
            str(exc),
            EXIT_RUNTIME,
            fix="--offload enable --num-blocks-on-gpu N --pin-memory, or a smaller size/batch",
            details={"suggestion": getattr(exc, "suggestion", None)},
        )
    if type(exc).__name__ in ("OutOfMemoryError",):
        return CliError("out_of_memory", str(exc), EXIT_RUNTIME, fix="--offload enable, or a smaller size")
    if type(exc).__name__ == "SamplingCancelled":
        return CliError("cancelled", str(exc), EXIT_CANCELLED)
    if isinstance(exc, ImportError):
        return CliError("missing_dependency", str(exc), EXIT_RUNTIME, fix="qwen-edit doctor")
    if isinstance(exc, RuntimeError):
        return CliError("runtime_error", f"{type(exc).__name__}: {exc}", EXIT_RUNTIME, fix="qwen-edit doctor")
    return CliError("internal_error", f"{type(exc).__name__}: {exc}", EXIT_INTERNAL)


# -- subcommands ---------------------------------------------------------------------------------


def cmd_edit(args, reporter: Reporter) -> int:
    if args.demo:
        settings, defaults = None, {}
    else:
        settings = load_cli_settings(args)
        defaults = settings.edit_defaults()
    jobs = build_jobs(args, defaults)
    if args.demo:
        kwargs = {"loras": [resolve_lora(p, s, None) for p, s in map(parse_lora, args.lora or [])]}
        files = {"demo": True, "loras": kwargs["loras"]}
    else:
        kwargs = pipeline_kwargs(args, settings)
        files = describe_files(kwargs)
    for job in jobs:  # a batch line's LoRAs resolve like --lora; the others use the run's
        job.loras = (
            kwargs["loras"] if job.loras is None else [resolve_lora(p, s, settings) for p, s in job.loras]
        )
    return execute(args, kwargs, jobs, files, reporter)


def execute(
    args, kwargs: dict, jobs: list[Job], files: dict, reporter: Reporter, extra: dict | None = None
) -> int:
    """The plan event; then (unless --dry-run) load once, run every job, and the envelope."""
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
    if args.dry_run:
        reporter.say(
            f"{len(jobs)} job(s) checked; models: "
            + ", ".join(f"{k}={v}" for k, v in files.items() if k != "loras" and v)
        )
        return reporter.succeed({"dry_run": True, "jobs": plan, "models": files})
    pipe = load_pipeline(args, kwargs, reporter)
    results, error = run_jobs(pipe, jobs, reporter)
    data = {
        "outputs": [p for j in jobs for p in j.outputs],
        "jobs": results,
        "load_seconds": getattr(pipe, "_cli_load_seconds", None),
        "model": pipe_info(pipe),
        **(extra or {}),
    }
    if error is not None:
        return reporter.fail(error, data)
    return reporter.succeed(data)


def load_pipeline(args, kwargs: dict, reporter: Reporter):
    from qwen_edit import QwenEditPipeline

    reporter.event("loading", demo=bool(getattr(args, "demo", False)))
    reporter.note("loading the models ..." if not args.demo else "loading the tiny demo model ...")
    start = time.perf_counter()
    if args.demo:
        compute = args.compute if args.compute not in (None, "auto") else "bf16"
        pipe = QwenEditPipeline.demo(
            cache_dir=getattr(args, "cache_dir", None),
            device=args.device or "cpu",
            compute=compute,
            compile=bool(args.compile),
        )
        if kwargs.get("loras"):
            pipe.set_loras(kwargs["loras"])
        if any(getattr(args, k, None) is not None for k in ("offload", "num_blocks_on_gpu", "pin_memory")):
            pipe.set_offload(args.offload or "auto", args.num_blocks_on_gpu or 1, bool(args.pin_memory))
    else:
        pipe = QwenEditPipeline.from_files(**kwargs)
    seconds = time.perf_counter() - start
    pipe._cli_load_seconds = round(seconds, 3)
    info = pipe_info(pipe)
    reporter.event("loaded", seconds=round(seconds, 3), **info)
    reporter.note(
        f"loaded in {seconds:.1f} s: {info.get('backend')} backend, {info.get('compute')} on "
        f"{info.get('device')}" + (f"; offload: {info['offload']}" if info.get("offload") else "")
    )
    return pipe


def pipe_info(pipe) -> dict:
    info = getattr(pipe.transformer, "qwen_edit_info", None)
    out = {"device": str(pipe.device)}
    if info is not None:
        out.update(
            backend=info.backend,
            compute=info.compute,
            precision=info.precision,
            rank=info.rank,
            reason=info.reason,
        )
    if pipe.offload_plan is not None:
        out["offload"] = pipe.offload_plan.reason
    return out


def cmd_demo(args, reporter: Reporter) -> int:
    """The tiny random-weight model end to end on the CPU: a generated picture in, a PNG out."""
    image = demo_picture()
    args.images, args.batch_file, args.prompt_file, args.lora, args.seed = [], None, None, None, [args.seed]
    args.demo, args.dry_run, args.compile = True, False, False
    args.offload = args.num_blocks_on_gpu = args.pin_memory = None
    for name in PARAM_FLAGS:
        if not hasattr(args, name):
            setattr(args, name, None)
    jobs = build_jobs(args, {}, demo_image=image)
    code = execute(args, {}, jobs, {"demo": True, "loras": []}, reporter, {"note": DEMO_NOTE})
    reporter.note(DEMO_NOTE)
    return code


DEMO_NOTE = (
    "the demo model has random weights, so its pictures are noise; every stage of the real path runs "
    "(tokenizer, fp8 text encoder, SVDQ int4 transformer, VAE, sampler, PNG with the parameters)"
)


def demo_picture():
    """A small synthetic input (sky, sun, ground), so the demo needs no file."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (192, 128), (110, 160, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 88, 192, 128), fill=(70, 130, 60))
    draw.ellipse((130, 14, 170, 54), fill=(250, 210, 80))
    return image


def cmd_doctor(args, reporter: Reporter) -> int:
    from . import doctor

    checks, verdict_line, code = doctor.run_doctor(
        args.config, args.models_dir, args.device, args.backend, args.compute
    )
    for check in checks:
        reporter.event("check", **check.to_dict())
    data = {
        "ready": code == 0,
        "verdict": verdict_line,
        "exit_code": code,
        "checks": [c.to_dict() for c in checks],
    }
    if not reporter.json_mode:
        print(doctor.render(checks, verdict_line), file=reporter.out, flush=True)
    if code == 0:
        return reporter.succeed(data)
    error = CliError(
        "not_ready",
        verdict_line,
        code,
        fix="; ".join(f"{c.name}: {c.fix}" for c in checks if c.status == "error" and c.fix),
    )
    if reporter.json_mode:
        return reporter.fail(error, data)
    return code  # the report above already says what to fix


def cmd_download(args, reporter: Reporter) -> int:
    from . import download as dl
    from .locations import default_download_dir

    dl.validate_choices(args.rank, args.steps)
    models_dir = Path(args.models_dir).expanduser().absolute() if args.models_dir else default_download_dir()
    precision, why = dl.resolve_precision(args.precision, args.device)
    files = dl.planned_files(precision, sorted(set(args.rank), reverse=True), sorted(set(args.steps)))
    dl.fetch_metadata(files)  # HEADs first: they fail fast (no retries) when the hub is unreachable
    if not args.no_tokenizer:
        tokenizer = dl.list_tokenizer()
        dl.fetch_metadata(tokenizer)
        files.extend(tokenizer)
    dl.inspect_local(files, models_dir)
    if args.checksum:
        dl.check_present(files, models_dir)
    to_fetch = [f for f in files if f.status != "present"]
    needed = sum((f.size or 0) - f.local_bytes for f in to_fetch)
    free = dl.free_bytes(models_dir)
    reporter.event(
        "plan",
        models_dir=str(models_dir),
        precision=precision,
        reason=why,
        files=[f.to_dict() for f in files],
        bytes_to_fetch=needed,
        free_bytes=free,
    )
    reporter.note(f"models folder: {models_dir}\nprecision: {precision} ({why})")
    width = max(len(f.target) for f in files)
    for f in files:
        state = {
            "present": "present",
            "missing": "to fetch",
            "size_mismatch": "wrong size, to fetch again",
            "corrupt": "sha256 mismatch, to fetch again",
            "partial": f"partial ({human_bytes(f.local_bytes)}), to resume",
        }[f.status]
        reporter.say(f"  {f.target:<{width}}  {human_bytes(f.size):>10}  {state:<12}  <- {f.repo}/{f.path}")
    reporter.say(f"{human_bytes(needed)} to fetch, {human_bytes(free)} free")
    if args.dry_run:
        for f in to_fetch:
            f.status = "would_download"
        return reporter.succeed(
            {
                "dry_run": True,
                "models_dir": str(models_dir),
                "precision": precision,
                "reason": why,
                "files": [f.to_dict() for f in files],
                "bytes_to_fetch": needed,
                "free_bytes": free,
            }
        )
    dl.check_disk(files, models_dir)
    total_done = 0
    for f in files:
        if f.status == "present":
            verified = bool(f.extra.get("sha256_verified"))
            reporter.event(
                "skipped", target=f.target, size=f.size, reason="present", sha256_verified=verified
            )
            continue
        start = time.monotonic()
        reporter.event(
            "download_start",
            target=f.target,
            repo=f.repo,
            path=f.path,
            size=f.size,
            resume_from=f.local_bytes,
        )
        if not sys.stderr.isatty():  # no progress bar: say what is going on
            reporter.note(f"fetching {f.target} ({human_bytes(f.size)}) from {f.repo} ...")
        with _DownloadProgress(reporter, f) as progress:
            dl.download_file(f, models_dir, progress=progress, retries=args.retries, checksum=args.checksum)
        seconds = time.monotonic() - start
        total_done += f.size - f.local_bytes
        f.status = "downloaded"
        reporter.event(
            "download_done",
            target=f.target,
            size=f.size,
            seconds=round(seconds, 3),
            sha256_verified=args.checksum and dl._is_sha256(f.etag),
        )
        reporter.note(f"fetched {f.target} ({human_bytes(f.size)}, {seconds:.1f} s)")
    reporter.say(f"done: {len(files)} files in {models_dir}")
    return reporter.succeed(
        {
            "models_dir": str(models_dir),
            "precision": precision,
            "reason": why,
            "files": [f.to_dict() for f in files],
            "bytes_fetched": total_done,
        }
    )


class _DownloadProgress:
    """A byte progress bar on a terminal, throttled `download_progress` events with --json."""

    def __init__(self, reporter: Reporter, f):
        self.reporter, self.f, self.bar, self.last = reporter, f, None, 0.0

    def __enter__(self):
        if not self.reporter.json_mode and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.f.size,
                initial=self.f.local_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=Path(self.f.target).name[-40:],
                file=sys.stderr,
            )
        return self.update

    def update(self, f, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        now = time.monotonic()
        if done >= (f.size or 0) or now - self.last >= 0.5:
            self.last = now
            self.reporter.event("download_progress", target=f.target, bytes=done, size=f.size)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


# -- argparse ------------------------------------------------------------------------------------


def build_parser() -> _Parser:
    from qwen_edit import __version__

    epilog = "exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items())
    parser = _Parser(
        prog="qwen-edit",
        description="Qwen-Image-Edit-2509 with Nunchaku SVDQuant weights, without ComfyUI.",
        epilog=epilog,
    )
    parser.add_argument("--version", action="version", version=f"qwen-edit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="NDJSON events on stdout, a final envelope line")
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="library logs on stderr (-vv: debug)"
    )

    models = _Parser(add_help=False)
    models.add_argument(
        "--config",
        action="append",
        metavar="YAML",
        help="settings file (model folders as in ComfyUI's extra_model_paths.yaml, generation "
        "defaults); repeat to layer, e.g. configs/runpod-pod.yaml configs/lightning-8step.yaml",
    )
    models.add_argument(
        "--models-dir",
        metavar="DIR",
        help="a ComfyUI models/ folder (diffusion_models/, text_encoders/, vae/, loras/); "
        "overrides the folders of --config",
    )
    models.add_argument("--device", help="cuda, cuda:1, cpu (default: the settings, else cuda if present)")
    models.add_argument("--backend", choices=("auto", "nunchaku", "portable"))
    models.add_argument(
        "--compute", choices=("auto", "bf16", "fp8"), help="portable backend's GEMM precision"
    )

    edit = sub.add_parser(
        "edit",
        parents=[common, models],
        help="edit images following a prompt",
        description="Edit 1-3 images following a prompt; writes PNGs with the parameters "
        "embedded (text chunk 'parameters').",
        epilog=epilog,
    )
    edit.add_argument("images", nargs="*", metavar="IMAGE", help="1-3 input images (picture 1 sets the size)")
    prompt = edit.add_mutually_exclusive_group()
    prompt.add_argument("-p", "--prompt")
    prompt.add_argument("--prompt-file", metavar="FILE", help="the prompt, read from a file")
    edit.add_argument("-n", "--negative-prompt")
    edit.add_argument("--seed", type=int, nargs="+", metavar="N", help="one job per seed (default: random)")
    edit.add_argument("--steps", type=int)
    edit.add_argument(
        "--cfg", "--guidance", type=float, dest="cfg", help="CFG scale (1.0 skips the negative)"
    )
    edit.add_argument("--sampler", help="euler, euler_ancestral, heun, dpmpp_2m, dpmpp_2m_sde, lcm")
    edit.add_argument("--scheduler", help="simple, normal, sgm_uniform, karras, exponential, beta")
    edit.add_argument("--denoise", type=float)
    edit.add_argument("--shift", type=float, help="ModelSamplingAuraFlow shift")
    edit.add_argument("--width", type=int, help="output width (multiple of 16; with --height)")
    edit.add_argument("--height", type=int, help="output height (multiple of 16; with --width)")
    edit.add_argument("--batch-size", type=int, help="images per job")
    edit.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:STRENGTH]",
        help="a LoRA file or a name in the loras folder; repeatable; replaces the config's",
    )
    edit.add_argument(
        "--batch-file",
        metavar="FILE",
        help="one job per line: a prompt, or a JSON object (prompt, images, seed, steps, cfg, "
        "sampler, scheduler, denoise, shift, width, height, batch_size, out, loras); the "
        "command line gives the defaults; the models load once",
    )
    edit.add_argument(
        "-o",
        "--out",
        default=DEFAULT_OUT,
        metavar="PATH",
        help="output file; {seed}, {job}, {index} are filled in (default: %(default)s)",
    )
    edit.add_argument("--transformer", help="transformer file (path, or name in diffusion_models/; 'auto')")
    edit.add_argument("--text-encoder", help="text encoder file (path or name in text_encoders/)")
    edit.add_argument("--vae", help="VAE file (path or name in vae/)")
    edit.add_argument("--tokenizer", help="tokenizer folder (default: beside the text encoder)")
    _offload_flags(edit)
    edit.add_argument(
        "--compile", action="store_true", help="torch.compile the transformer blocks and the text encoder"
    )
    edit.add_argument("--demo", action="store_true", help="use the tiny random-weight demo model (CPU)")
    edit.add_argument(
        "--dry-run", action="store_true", help="check the parameters, inputs and model files; load nothing"
    )
    edit.set_defaults(func=cmd_edit, cache_dir=None)

    download = sub.add_parser(
        "download",
        parents=[common],
        help="fetch the model files from the Hugging Face hub",
        description="Fetch the SVDQ transformer(s), text encoder, VAE and tokenizer into "
        "a ComfyUI models/ folder; resumable; sizes verified.",
        epilog=epilog,
    )
    download.add_argument(
        "--models-dir",
        metavar="DIR",
        help="target models/ folder (default: $QWEN_EDIT_MODELS, an existing RunPod models "
        "folder, /workspace/data/models on a pod, else ./models)",
    )
    download.add_argument(
        "--precision",
        choices=("auto", "fp4", "int4"),
        default="auto",
        help="auto: fp4 on RTX 50xx (SM 120/121), int4 elsewhere",
    )
    download.add_argument("--rank", type=int, nargs="+", default=[128], help="SVD rank(s): 128 or 32")
    download.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[4, 8],
        help="Lightning transformer(s): 4 and/or 8 steps (default: both)",
    )
    download.add_argument(
        "--no-tokenizer", action="store_true", help="skip Qwen/Qwen-Image-Edit-2509 tokenizer/"
    )
    download.add_argument("--checksum", action="store_true", help="also verify sha256 (reads every file)")
    download.add_argument("--retries", type=int, default=5, help="resume attempts without progress per file")
    download.add_argument("--dry-run", action="store_true", help="list what would be fetched; write nothing")
    download.add_argument("--device", help="the card --precision auto decides for (default: this one)")
    download.set_defaults(func=cmd_download)

    doctor = sub.add_parser(
        "doctor",
        parents=[common, models],
        help="check GPU, drivers, Nunchaku and models",
        description="Check the GPU, torch, Nunchaku, the backend and precision that would "
        "run, the model files, memory and disk; a verdict and a fix per problem.",
        epilog="exit codes: 0 ready; 4 environment problem; 3 model files missing",
    )
    doctor.set_defaults(func=cmd_doctor, backend="auto", compute="auto")

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="run the tiny random-weight model end to end (CPU)",
        description="Every stage of the real path on a tiny random model, on the CPU, in "
        "seconds: a PNG out (noise, with the parameters embedded).",
    )
    demo.add_argument("-o", "--out", default="qwen-edit-demo.png", metavar="PATH")
    demo.add_argument("-p", "--prompt", default="make the sky a warm sunset")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=4)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--compute", choices=("bf16", "fp8"), default="bf16")
    demo.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where the demo files are written (default: $QWEN_EDIT_CACHE or ~/.cache/qwen-edit)",
    )
    demo.set_defaults(func=cmd_demo)

    sub.add_parser("bench", help="per-stage latency benchmark (see `qwen-edit bench --help`)", add_help=False)
    return parser


def _offload_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--offload",
        choices=("auto", "enable", "disable"),
        help="ComfyUI-nunchaku's cpu_offload: stream transformer blocks from CPU memory",
    )
    parser.add_argument("--num-blocks-on-gpu", type=int, metavar="N", help="with --offload enable")
    parser.add_argument(
        "--pin-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pinned host memory for streamed blocks (faster copies)",
    )


def _configure_logging(verbose: int) -> None:
    """-v: the library's INFO logs (backend choice, offload plan, LoRAs) on stderr; -vv: DEBUG. Without
    it warnings still reach stderr through logging's last-resort handler, and libraries with their own
    handlers (huggingface_hub, transformers) are not printed twice."""
    if verbose:
        level = logging.INFO if verbose == 1 else logging.DEBUG
        logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # its own argparse (runners/bench.py)
        from .. import bench

        return bench.main(argv[1:])
    parser = build_parser()
    json_mode = "--json" in argv
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        command = next((a for a in argv if not a.startswith("-")), "qwen-edit")
        print(exc.parser.format_usage().rstrip(), file=sys.stderr)
        return Reporter(command, json_mode).fail(CliError("usage", str(exc), EXIT_USAGE))
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _configure_logging(args.verbose)
    reporter = Reporter(args.command, args.json, stdout=sys.stdout, stderr=sys.stderr)
    saved_stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the NDJSON stream
    try:
        return args.func(args, reporter)
    except KeyboardInterrupt:
        return reporter.fail(
            CliError(
                "cancelled", "interrupted (Ctrl-C); partial downloads are kept and resume", EXIT_CANCELLED
            )
        )
    except Exception as exc:
        error = classify(exc)
        if error.exit_code == EXIT_INTERNAL or args.verbose:
            traceback.print_exc(file=sys.stderr)
        return reporter.fail(error)
    finally:
        sys.stdout = saved_stdout


if __name__ == "__main__":
    raise SystemExit(main())
