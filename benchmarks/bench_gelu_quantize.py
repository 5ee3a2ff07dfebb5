"""The MLP's fused tanh-GELU + per-token fp8 quantization kernel (kernels.py) at the edit's shape.

8192 image tokens x 12288 (the MLP's hidden width), bf16 in: the library's kernel (a whole row in
registers, one program per row), a chunked two-pass variant defined here (each row read twice in chunks,
the second read from L2) at several chunk sizes and warp counts, and torch.compile's fusion of the
unfused ops; each one's time, memory throughput (2 bytes in, 1 byte out per element), and whether its
codes and scales equal the unfused PyTorch ops'. The chunked variant was measured and not kept (issue
14, benchmarks/RESULTS.md): 15% faster as a kernel, ~3 ms of a 214 ms step.

    python benchmarks/bench_gelu_quantize.py --json benchmarks/results/gelu_quantize_h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from bench_kernels import cuda_ms
from triton.language.extra import libdevice

from qwen_edit import fp8, kernels


@triton.jit
def chunked(x_ptr, codes_ptr, scale_ptr, n_cols, BLOCK: tl.constexpr):
    """GELU(x) rows -> per-row e4m3 codes and scales, reading each row twice in BLOCK-wide chunks."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n_cols
    largest = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n_cols
        x = tl.load(x_ptr + base + offsets, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        y = (0.5 * x * (1.0 + libdevice.tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x))))).to(
            tl.bfloat16
        )
        largest = tl.maximum(largest, tl.where(mask, tl.abs(y.to(tl.float32)), 0.0))
    scale = tl.maximum(tl.max(largest, axis=0), 1e-12) / 448.0
    for start in range(0, n_cols, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n_cols
        x = tl.load(x_ptr + base + offsets, mask=mask, other=0.0, eviction_policy="evict_first").to(
            tl.float32
        )
        y = (0.5 * x * (1.0 + libdevice.tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x))))).to(
            tl.bfloat16
        )
        codes = tl.clamp(y.to(tl.float32) / scale, -448.0, 448.0)
        tl.store(codes_ptr + base + offsets, codes.to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr + row, scale)


def outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn)
    return codes, torch.empty((x.shape[0], 1), device=x.device, dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    rows, cols = 8192, 12288
    x = (
        torch.randn(rows, cols, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 3
    ).bfloat16()
    ref_codes, ref_scale = fp8.quantize_per_token(torch.nn.functional.gelu(x, approximate="tanh"))
    kernels.register()

    def launcher(block, warps):
        def run():
            codes, scale = outputs(x)
            chunked[(rows,)](x, codes, scale, cols, BLOCK=block, num_warps=warps)
            return codes, scale

        return run

    variants = {
        "kernels.gelu_tanh_quantize (row in registers, 16384/16)": lambda: kernels.gelu_tanh_quantize(x)
    }
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16)):
        variants[f"chunked {block}/{warps}"] = launcher(block, warps)
    unfused = torch.compile(lambda t: fp8.quantize_per_token(torch.nn.functional.gelu(t, approximate="tanh")))
    variants["torch.compile of the unfused ops"] = lambda: unfused(x)
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    result["rows"] = []
    for name, fn in variants.items():
        try:
            codes, scale = fn()
            ms = cuda_ms(fn, warmup=3, repeats=20)
            row = {
                "kernel": name,
                "ms": round(ms, 4),
                "tb_per_s": round(rows * cols * 3 / ms / 1e9, 2),
                "scales_equal": bool(torch.equal(scale, ref_scale)),
                "codes_equal_fraction": round((codes.float() == ref_codes.float()).float().mean().item(), 6),
            }
        except Exception as exc:  # a variant that does not compile must not end the run
            row = {"kernel": name, "error": repr(exc)[:300]}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
