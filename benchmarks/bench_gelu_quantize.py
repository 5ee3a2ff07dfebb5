"""The MLP's fused tanh-GELU + per-token fp8 quantization kernel (kernels.py) at the edit's shape.

8192 image tokens x 12288 (the MLP's hidden width), bf16 in: the first kernel (a whole row in registers),
the chunked two-pass kernel at several chunk sizes and warp counts, and torch.compile's fusion of the
unfused ops; each one's time, memory throughput (2 bytes in, 1 byte out per element), and whether its
codes and scales equal the unfused PyTorch ops' bit for bit.

    python benchmarks/bench_gelu_quantize.py --json benchmarks/results/gelu_quantize_h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from bench_kernels import cuda_ms

from qwen_edit import fp8, kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    rows, cols = 8192, 12288
    x = (
        torch.randn(rows, cols, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 3
    ).bfloat16()
    ref_codes, ref_scale = fp8.quantize_per_token(torch.nn.functional.gelu(x, approximate="tanh"))
    found = kernels.triton_kernels()

    def launcher(name, block, warps):
        def run():
            codes, scale = kernels._outputs(x)
            found[name][(rows,)](x, codes, scale, cols, BLOCK=block, num_warps=warps)
            return codes, scale

        return run

    variants = {"row in registers (first kernel), 16384/16": launcher("row_in_registers", 16384, 16)}
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16)):
        variants[f"chunked {block}/{warps}"] = launcher("chunked", block, warps)
    variants["the op (chunked, defaults)"] = lambda: kernels.gelu_tanh_quantize(x)
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
