"""`qwen-edit run`: a ComfyUI Qwen-Image-Edit-2509 workflow (API or editor JSON) run headless.

The library reads and checks the graph (`qwen_edit.workflow`) and loads what its loader nodes name
(`QwenEditPipeline.from_workflow`); this module only turns flags into those calls and writes the
images as ComfyUI's SaveImage names them (`<filename_prefix>_00001_.png`, never over an existing file).
Everything checkable without the models is checked first, and is what `--dry-run` does: the graph,
every `--set`, the pictures (decoded), the model files the loaders name (found, and their headers
read as `edit` reads them, checks.py), and the output folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from . import saving
from .checks import check_model_files
from .edit import load_cli_settings
from .output import EXIT_USAGE, CliError, Reporter, cli_error

if TYPE_CHECKING:  # the library loads when the command runs, not for --help
    from qwen_edit.workflow import OutputSpec


def parse_image(text: str) -> tuple[str, str]:
    """--image NAME=PATH: the file a LoadImage node's `image` name stands for."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise CliError(
            "usage", f"--image {text!r}: use NAME=PATH (NAME as in the LoadImage node)", EXIT_USAGE
        )
    return name, path


def output_paths(folder: Path, output: OutputSpec, count: int) -> list[Path]:
    """SaveImage's files in `folder` (and the prefix's sub-folders), the counter moving past every file
    already there, as ComfyUI's does: nothing is overwritten."""
    folder = folder / Path(output.filename_prefix).parent
    paths, counter = [], 1
    while len(paths) < count:
        path = folder / output.file_name(counter)
        if not path.exists():
            paths.append(path)
        counter += 1
    return paths


def cmd_run(args: argparse.Namespace, reporter: Reporter) -> int:
    from qwen_edit.workflow import parse_assignment, plan_workflow

    overrides = dict(parse_assignment(text) for text in args.set or [])
    plan = plan_workflow(Path(args.workflow), overrides)
    images = dict(parse_image(text) for text in args.image) if args.image else None
    plan.pictures(images, args.input_dir)  # every picture opens before the models load
    if args.demo:
        from qwen_edit.testing.demo import demo_settings

        settings = demo_settings(args.cache_dir)
    else:
        settings = load_cli_settings(args)
    check_workflow_files(plan, settings)
    saving.check_writable(Path(args.out), "--out")
    reporter.event("plan", workflow=plan.to_dict())
    if args.dry_run:
        reporter.say(f"workflow checked: {len(plan.images)} picture(s), models {dict(plan.models)}")
        return reporter.succeed({"dry_run": True, "workflow": plan.to_dict()})

    from qwen_edit import QwenEditPipeline

    chosen = ("device", "backend", "compute", "text_encoder_compute")
    options = {k: getattr(args, k) for k in chosen if getattr(args, k) is not None}
    reporter.note("loading the models the workflow names ...")
    pipe = QwenEditPipeline.from_workflow(plan, settings, **options)

    def callback(step: int, total: int, _latent) -> None:
        reporter.event("progress", step=step, total=total)

    result = pipe.run_workflow(plan, images, input_dir=args.input_dir, callback=callback)
    paths = output_paths(Path(args.out), plan.output, len(result.images))
    for i, path in enumerate(paths):
        try:
            saving.write_picture(path, result.png_bytes(i), overwrite=False)
        except OSError as exc:
            raise saving.output_error("--out", path, exc) from exc
        reporter.say(f"wrote {path}")
    return reporter.succeed(
        {"outputs": [str(p) for p in paths], "seed": result.seed, "timings": result.timings}
    )


def check_workflow_files(plan, settings) -> None:
    """The files the workflow's loaders name: found in the model folders, and complete safetensors
    files of the kind each slot takes (the same header checks as `edit`)."""
    from qwen_edit.errors import QwenEditError
    from qwen_edit.settings import LoraSpec, ModelFiles, PipelineSpec
    from qwen_edit.workflow import resolve_models

    try:
        files = resolve_models(plan, settings.folders)
    except QwenEditError as exc:
        raise cli_error(exc) from exc
    loras = tuple(LoraSpec(Path(path), strength, Path(path).name) for path, strength in files.loras)
    check_model_files(PipelineSpec(ModelFiles(files.transformer, files.text_encoder, files.vae, None), loras))
