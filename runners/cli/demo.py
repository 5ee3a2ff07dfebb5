"""`qwen-edit demo`: the tiny random-weight model end to end on the CPU, a generated picture in, a PNG out."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from .edit import PARAM_FLAGS, build_jobs, execute
from .output import Reporter, cli_error

DEMO_NOTE = (
    "the demo model has random weights, so its pictures are noise; every stage of the real path runs "
    "(tokenizer, fp8 text encoder, SVDQ int4 transformer, VAE, sampler, PNG with the parameters)"
)


def cmd_demo(args: argparse.Namespace, reporter: Reporter) -> int:
    """The demo's files as the settings (written once into --cache-dir), one job on a generated picture."""
    from qwen_edit.errors import QwenEditError
    from qwen_edit.settings import resolve_spec
    from qwen_edit.testing.demo import default_cache_dir, demo_settings

    image = demo_picture()
    args.images, args.batch_file, args.prompt_file, args.lora, args.seed = [], None, None, None, [args.seed]
    args.dry_run = False
    for name in PARAM_FLAGS:
        if not hasattr(args, name):
            setattr(args, name, None)
    jobs = build_jobs(args, {}, demo_image=image)
    try:
        spec = resolve_spec(demo_settings(args.cache_dir), device=args.device, compute=args.compute)
    except QwenEditError as exc:
        raise cli_error(exc) from exc
    for job in jobs:
        job.loras = []
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    code = execute(args, spec, jobs, reporter, {"note": DEMO_NOTE, "cache_dir": str(cache.absolute())})
    reporter.note(DEMO_NOTE)
    for path in jobs[0].outputs:
        reporter.note(f"the picture: {Path(path).absolute()}")
    reporter.note(f"the demo model's files (about 45 MB, written once): {cache.absolute()}")
    return code


def demo_picture() -> Image.Image:
    """A small synthetic input (sky, sun, ground), so the demo needs no file."""
    from PIL import ImageDraw

    image = Image.new("RGB", (192, 128), (110, 160, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 88, 192, 128), fill=(70, 130, 60))
    draw.ellipse((130, 14, 170, 54), fill=(250, 210, 80))
    return image
