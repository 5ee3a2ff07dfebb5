"""Where the compiled fp8 step's time goes now, and whether inductor's max-autotune (Triton fp8 GEMM
templates with fused epilogues) beats cuBLASLt plus separate elementwise kernels (issue 14).

One step of the full-size portable transformer (`comfy_forward`, fp8 linears) at 1024x1024 with one
1024x1024 reference and 256 text tokens: the compiled step as `compile=True` builds it (per block,
dynamic shapes), its kernel time by kind from torch.profiler, then the same blocks compiled with
mode="max-autotune-no-cudagraphs" (static shapes: autotuning picks per shape).

    python benchmarks/bench_step_profile.py --workdir /tmp/qb --json benchmarks/results/step_profile_h200.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_offload import cuda_ms
from bench_pipeline import full_size_files
from profile_edit import kernel_kind

from qwen_edit.model import comfy_forward
from qwen_edit.transformer import load_transformer


def profile_ms(step) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_kind, top = defaultdict(float), defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms = event.device_time / 1000
            by_kind[kernel_kind(event.name)] += ms
            top[event.name[:90]] += ms
    return {
        "by_kind_ms": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": {k: round(v, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--skip-autotune", action="store_true")
    args = parser.parse_args()
    files = full_size_files(args.workdir, "fp4")
    model = load_transformer(
        files["transformer"], backend="portable", compute="fp8", device="cuda", compile=True
    )
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 16, 1, 128, 128, device="cuda", generator=gen)
    ref = torch.randn(1, 16, 1, 128, 128, device="cuda", generator=gen)
    sigma = torch.tensor([0.75], device="cuda")
    ctx = torch.randn(1, 256, 3584, device="cuda", generator=gen)

    @torch.inference_mode()
    def step():
        return comfy_forward(model, x, sigma, ctx, [ref])

    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    start = time.perf_counter()
    baseline = step().float()
    torch.cuda.synchronize()
    result["compile_s"] = round(time.perf_counter() - start, 1)
    for _ in range(2):
        step()
    result["compiled_step_ms"] = round(cuda_ms(step, 7), 1)
    result["profile"] = profile_ms(step)
    print(json.dumps(result), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))  # kept if the autotuning below runs out of time
    if not args.skip_autotune:
        torch._dynamo.reset()
        for block in model.transformer_blocks:
            block._compiled_call_impl = None
            block.compile(mode="max-autotune-no-cudagraphs", dynamic=False)
        start = time.perf_counter()
        out = step().float()
        torch.cuda.synchronize()
        row = {"compile_s": round(time.perf_counter() - start, 1)}
        for _ in range(2):
            step()
        row["step_ms"] = round(cuda_ms(step, 7), 1)
        row["rel_diff_vs_default_compile"] = round(((out - baseline).norm() / baseline.norm()).item(), 5)
        row["profile"] = profile_ms(step)
        result["max_autotune_static"] = row
        print(json.dumps(row), flush=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
