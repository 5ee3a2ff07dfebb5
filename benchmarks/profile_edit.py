"""Where the time of a full-size edit goes: each stage's wall time against its GPU kernel time, by kind.

Loads the full-size random files (bench_pipeline.py writes them) through `QwenEditPipeline.from_files`,
then for each stage of an edit (text encode, VAE encode, one transformer step, VAE decode) reports the
median wall time, the GPU time its kernels take (torch.profiler), the share of that time by kernel kind
(GEMM, attention, convolution, fused Triton, copies, other) and the ten most expensive kernels. Wall
time well above kernel time means the stage waits on the CPU (Python, launches, host work).

    python benchmarks/profile_edit.py --workdir /tmp/qb --json benchmarks/results/profile.json --compile
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from bench_pipeline import full_size_files
from PIL import Image

from qwen_edit import QwenEditPipeline, conditioning
from qwen_edit.model import comfy_forward
from qwen_edit.vae import decode_latents, encode_images

KINDS = (  # first match wins: convolutions before GEMMs (cuDNN's implicit-GEMM convolutions)
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("conv", "fprop", "dgrad", "implicit")),
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "matmul")),
    ("triton (fused)", ("triton",)),
    ("copy / cast", ("copy", "memcpy", "memset", "cat", "elementwise_kernel_with_index")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other"


def profile_stage(fn, warmup: int = 2, repeats: int = 5) -> dict:
    """Median wall time of `fn` and the kernel time of one profiled call, by kind and top kernels."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) * 1000)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_name: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for k in kernels:
        us = k.time_range.elapsed_us()
        by_kind[kernel_kind(k.name)] += us / 1000
        by_name[k.name] += us / 1000
        counts[k.name] += 1
    gpu_ms = sum(by_kind.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {
        "wall_ms": round(statistics.median(walls), 2),
        "kernel_ms": round(gpu_ms, 2),
        "kernels": len(kernels),
        "by_kind_ms": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"ms": round(v, 3), "calls": counts[n], "name": n[:160]} for n, v in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--compute", default="fp8")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--prompt-chars", type=int, default=200)
    args = parser.parse_args()

    files = full_size_files(args.workdir, "fp4")
    pipe = QwenEditPipeline.from_files(
        **files, device="cuda", backend="portable", compute=args.compute, compile=args.compile
    )
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    prompt = ("turn the sky into a warm sunset and add reflections on the water " * 8)[: args.prompt_chars]
    first = pipe.edit([image], prompt, seed=0, steps=4)
    cond = pipe._encode(prompt, [image])
    ref = encode_images(pipe.vae, conditioning.reference_pixels(image)).unsqueeze(2)
    x = torch.randn(1, 16, 1, 128, 128, device="cuda")
    sigma = torch.tensor([0.75], device="cuda")

    @torch.inference_mode()
    def step():
        comfy_forward(pipe.transformer, x, sigma, cond, [ref])

    stages = {
        "text_encode": lambda: pipe._encode(prompt, [image]),
        "vae_encode": lambda: encode_images(pipe.vae, conditioning.reference_pixels(image)),
        "step": step,
        "vae_decode": lambda: decode_latents(pipe.vae, x),
    }
    result = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "compute": args.compute,
        "compiled": args.compile,
        "text_tokens": int(cond.shape[1]),
        "first_edit_s": {k: v if k == "steps" else round(v, 3) for k, v in first.timings.items()},
        "stages": {},
    }
    for name, fn in stages.items():
        result["stages"][name] = row = profile_stage(fn)
        print(name, json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
        for t in row["top_kernels"]:
            print(f"    {t['ms']:8.2f} ms {t['calls']:5d}x  {t['name'][:110]}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
