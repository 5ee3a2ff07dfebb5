"""The Nunchaku backend with Nunchaku's real kernels against the portable backend, same file, same card.

Writes a full-size (60-block) random-weight int4 r128 SVDQ file, loads it through the portable backend
(bf16, the reference) and through the Nunchaku backend, and runs ComfyUI's forward (comfy_forward) at
1024x1024 with one 1024x1024 reference and 256 text tokens. Reported per configuration: step time,
weights on the GPU, and the step output's relative L2 difference from the portable bf16 model's; then
a rank-64 LoRA on every block layer, and block streaming from pinned memory.

On a card without Nunchaku kernels (an H100/H200, SM 90) run it with QWEN_EDIT_FORCE_NUNCHAKU=int4 and
a from-source build of Nunchaku for SM 90 (benchmarks/RESULTS.md says how): Hopper has no int4 tensor
cores, so those kernels are emulated in software there and slow; the numbers are for correctness.

    QWEN_EDIT_FORCE_NUNCHAKU=int4 python benchmarks/bench_nunchaku.py --workdir /tmp/qb \
        --json benchmarks/results/nunchaku_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from qwen_edit.lora import apply_loras
from qwen_edit.model import comfy_forward
from qwen_edit.nunchaku_backend import status
from qwen_edit.offload import set_block_offload
from qwen_edit.svdq.checkpoint import DEFAULT_CONFIG
from qwen_edit.testing.transformer import write_random_checkpoint
from qwen_edit.transformer import load_transformer


def step_inputs(size: int, text_tokens: int, device) -> tuple:
    """comfy_forward's inputs for one step: noise latent, sigma, prompt states, one reference latent."""
    gen = torch.Generator(device).manual_seed(0)
    latent = size // 8
    return (
        torch.randn(1, 16, 1, latent, latent, generator=gen, device=device),
        torch.tensor([0.75], device=device),
        torch.randn(1, text_tokens, 3584, generator=gen, device=device, dtype=torch.bfloat16),
        [torch.randn(1, 16, 1, latent, latent, generator=gen, device=device)],
    )


@torch.no_grad()
def timed(model, inputs: tuple, warmup: int, repeats: int) -> tuple[torch.Tensor, list[float]]:
    for _ in range(warmup):
        out = comfy_forward(model, *inputs)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = comfy_forward(model, *inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return out, times


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def row(name: str, out: torch.Tensor, times: list[float], reference: torch.Tensor | None, **extra) -> dict:
    r = {
        "config": name,
        "step_ms_median": round(statistics.median(times), 1),
        "step_ms_all": [round(t, 1) for t in times],
        "gpu_allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
        "finite": bool(torch.isfinite(out).all()),
        **extra,
    }
    if reference is not None:
        r["rel_l2_vs_portable_bf16"] = round(rel(out, reference), 4)
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    from bench_transformer import random_lora  # beside this file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=64)
    args = parser.parse_args()

    installed = status()
    if not installed.ok:
        raise SystemExit(f"Nunchaku is not usable here: {installed.problem()}")
    device = torch.device("cuda")
    config = dict(DEFAULT_CONFIG)
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / "svdq-int4_r128-random.safetensors"
    if not path.exists():
        write_random_checkpoint(path, config, precision="int4", rank=128, device=device)
    lora = random_lora(config, args.lora_rank, args.workdir / f"lora-r{args.lora_rank}.safetensors")
    inputs = step_inputs(args.size, args.text_tokens, device)
    rows = []

    portable = load_transformer(path, backend="portable", compute="bf16", device=device)
    reference, times = timed(portable, inputs, args.warmup, args.repeats)
    rows.append(row("portable bf16 (reference)", reference, times, None))
    apply_loras(portable, [(lora, 1.0)])
    with torch.no_grad():
        reference_lora = comfy_forward(portable, *inputs)
    del portable
    gc.collect()
    torch.cuda.empty_cache()

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = load_transformer(path, backend="nunchaku", device=device)
    load_s = time.perf_counter() - start
    weights = torch.cuda.memory_allocated()
    out, times = timed(model, inputs, args.warmup, args.repeats)
    with torch.no_grad():
        resident = comfy_forward(model, *inputs)
    rows.append(row("nunchaku int4 r128", out, times, reference, load_s=round(load_s, 1),
                    weights_gib=round(weights / 2**30, 2),
                    rel_l2_run_to_run=round(rel(out, resident), 6)))  # fmt: skip

    start = time.perf_counter()
    report = apply_loras(model, [(lora, 1.0)])
    torch.cuda.synchronize()
    apply_s = time.perf_counter() - start
    out, times = timed(model, inputs, args.warmup, args.repeats)
    rows.append(row(f"nunchaku int4 + rank-{args.lora_rank} LoRA", out, times, None,
                    lora_apply_s=round(apply_s, 2), lora_layers=sum(report.applied.values()),
                    rel_l2_vs_portable_bf16_with_lora=round(rel(out, reference_lora), 4),
                    rel_l2_lora_effect=round(rel(out, resident), 4)))  # fmt: skip
    apply_loras(model, [])

    for blocks, pin in ((1, True), (30, True), (1, False)):
        set_block_offload(model, blocks, use_pin_memory=pin)
        gc.collect()
        torch.cuda.empty_cache()
        out, times = timed(model, inputs, args.warmup, args.repeats)
        rows.append(row(f"nunchaku int4, {blocks} of 60 blocks resident, {'pinned' if pin else 'pageable'}",
                        out, times, None, rel_l2_vs_resident=round(rel(out, resident), 6)))  # fmt: skip
    set_block_offload(model, 60, use_pin_memory=False)
    del model
    gc.collect()
    torch.cuda.empty_cache()

    # Loading straight into offload: the streamed blocks never touch the GPU.
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = load_transformer(
        path, backend="nunchaku", device=device, num_blocks_on_gpu=1, use_pin_memory=True
    )
    load_peak = torch.cuda.max_memory_allocated() - before
    out, times = timed(model, inputs, args.warmup, args.repeats)
    rows.append(row("nunchaku int4 loaded with 1 block resident (pinned)", out, times, None,
                    load_peak_gib=round(load_peak / 2**30, 2),
                    rel_l2_vs_resident=round(rel(out, resident), 6)))  # fmt: skip

    result = {
        "card": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "nunchaku": installed.version,
        "python": platform.python_version(),
        "size": args.size,
        "text_tokens": args.text_tokens,
        "note": "random int4 r128 weights; Nunchaku's int4 kernels built from source for this card",
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
