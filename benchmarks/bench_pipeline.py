"""Full-size edit timings through QwenEditPipeline: per stage, per step, end to end, peak memory.

Writes full-size random-weight files in the real formats with the project's writers (an SVDQ fp4 r128
transformer, ComfyUI's scaled-fp8 Qwen2.5-VL 7B encoder, ComfyUI's VAE; the demo's byte-level tokenizer
with the real special-token ids), loads them with `QwenEditPipeline.from_files`, and runs 4-step
1024x1024 edits of a 1024x1024 image.

    python benchmarks/bench_pipeline.py --workdir /tmp/qb --json benchmarks/results/pipeline.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qwen_edit import QwenEditPipeline
from qwen_edit.svdq.checkpoint import DEFAULT_CONFIG
from qwen_edit.testing.demo import write_demo_tokenizer
from qwen_edit.testing.text_encoder import write_comfy_text_encoder
from qwen_edit.testing.transformer import write_random_checkpoint
from qwen_edit.testing.vae import write_comfy_vae
from qwen_edit.text_encoder import DEFAULT_CONFIG as TEXT_ENCODER_CONFIG


def full_size_files(workdir: Path, precision: str) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    files = {
        "transformer": workdir / f"svdq-{precision}_r128-random.safetensors",
        "text_encoder": workdir / "qwen_2.5_vl_7b_fp8_scaled-random.safetensors",
        "vae": workdir / "qwen_image_vae-random.safetensors",
        "tokenizer": workdir / "tokenizer",
    }
    writers = {
        "transformer": lambda p: write_random_checkpoint(
            p, DEFAULT_CONFIG, precision=precision, device="cuda"
        ),
        "text_encoder": lambda p: write_comfy_text_encoder(
            p, config=json.loads(TEXT_ENCODER_CONFIG.read_text()), device="cuda"
        ),
        "vae": lambda p: write_comfy_vae(p, base_dim=96),
        "tokenizer": write_demo_tokenizer,
    }
    for name, path in files.items():
        if not path.exists():
            start = time.perf_counter()
            writers[name](path)
            torch.cuda.empty_cache()
            print(f"wrote {path.name} in {time.perf_counter() - start:.0f}s", flush=True)
    return files


def run(files: dict, compute: str, args) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe = QwenEditPipeline.from_files(**files, device="cuda", backend="portable", compute=compute)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    weights = torch.cuda.memory_allocated()
    te_info = pipe.text_encoder.qwen_edit_info
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    # The demo tokenizer is byte-level: one token per character gives a prompt of `prompt_chars` tokens.
    prompt = ("turn the sky into a warm sunset and add reflections on the water " * 8)[: args.prompt_chars]
    kwargs = dict(seed=0, steps=args.steps, width=args.size, height=args.size)
    pipe.edit([image], prompt, **kwargs)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    runs = [pipe.edit([image], prompt, **kwargs).timings for _ in range(args.repeats)]
    med = lambda key: round(statistics.median(r[key] for r in runs) * 1000, 1)  # noqa: E731
    steps = [s for r in runs for s in r["steps"]]
    row = {
        "config": f"portable fp4 r128, compute={compute} "
        f"(transformer {pipe.transformer.qwen_edit_info.compute}, text encoder {te_info.compute})",
        "load_s": round(load_s, 1),
        "text_encode_ms": med("text_encode"),
        "vae_encode_ms": med("vae_encode"),
        "step_ms": round(statistics.median(steps) * 1000, 1),
        "vae_decode_ms": med("vae_decode"),
        "total_ms": med("total"),
        "sum_of_stages_ms": round(
            med("text_encode")
            + med("vae_encode")
            + args.steps * statistics.median(steps) * 1000
            + med("vae_decode"),
            1,
        ),
        "weights_gib": round(weights / 2**30, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    print(json.dumps(row), flush=True)
    del pipe
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--computes", nargs="+", default=["auto", "bf16"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompt-chars", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    files = full_size_files(args.workdir, "fp4")
    rows = [run(files, compute, args) for compute in args.computes]
    result = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "size": args.size,
        "steps": args.steps,
        "note": "random weights; byte-level demo tokenizer; medians of the timed edits after one warm-up; "
        "load reads files just written (page cache warm)",
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
