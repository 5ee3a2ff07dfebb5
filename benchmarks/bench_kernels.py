"""The step's building blocks alone: attention backends and GEMM forms at the edit's shapes.

One edit step at 1024x1024 with one reference is 60 joint attentions over ~8.4k tokens (24 heads of
128) and 14 linears per block. This times each attention backend PyTorch offers on the card and the
GEMMs in bf16, fp8 with row-wise scales (what the portable backend runs) and fp8 with one scale per
tensor, so a change's gain can be predicted before the model is touched.

    python benchmarks/bench_kernels.py --json benchmarks/results/kernels.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qwen_edit.fp8 import FP8, quantize_per_token, quantize_weight_per_channel


def cuda_ms(fn, warmup: int = 3, repeats: int = 20) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def attention_rows(tokens: int, heads: int = 24, head_dim: int = 128) -> list[dict]:
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * tokens * tokens * heads * head_dim
    rows = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                ref = F.scaled_dot_product_attention(q, k, v)
                ms = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v))  # noqa: B023
            with sdpa_kernel([SDPBackend.MATH]):
                exact = F.scaled_dot_product_attention(q[:, :2].float(), k[:, :2].float(), v[:, :2].float())
            err = ((ref[:, :2].float() - exact).abs().max() / exact.abs().max()).item()
            rows.append({"tokens": tokens, "backend": backend.name, "ms": round(ms, 3),
                         "tflops": round(flops / ms / 1e9, 1), "rel_err": err})  # fmt: skip
        except RuntimeError as exc:  # backend not available for this card / shape
            rows.append({"tokens": tokens, "backend": backend.name, "error": str(exc)[:200]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def attention_layout_rows(tokens: int, heads: int = 24, head_dim: int = 128) -> list[dict]:
    """SDPA on contiguous [B, H, L, D] against transposed views of [B, L, H, D] (the model's natural
    layout), and the first call at a sequence length not seen before (cuDNN builds a plan per shape)."""
    blhd = [torch.randn(1, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    views = [t.transpose(1, 2) for t in blhd]
    contiguous = [t.contiguous() for t in views]
    rows = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel([backend]):
            for layout, qkv in (("contiguous BHLD", contiguous), ("transposed BLHD views", views)):
                ms = cuda_ms(lambda qkv=qkv: F.scaled_dot_product_attention(*qkv))
                rows.append({"tokens": tokens, "backend": backend.name, "layout": layout, "ms": round(ms, 3)})
                print(json.dumps(rows[-1]), flush=True)
            for new_len in (tokens + 1, tokens + 2):
                qkv = [t[:, :, :1].expand(-1, -1, new_len, -1).contiguous() for t in contiguous]
                torch.cuda.synchronize()
                start = time.perf_counter()
                F.scaled_dot_product_attention(*qkv)
                torch.cuda.synchronize()
                first = (time.perf_counter() - start) * 1000
                steady = cuda_ms(functools.partial(F.scaled_dot_product_attention, *qkv))
                rows.append({"tokens": new_len, "backend": backend.name, "first_call_ms": round(first, 2),
                             "steady_ms": round(steady, 3)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def gemm_rows(m: int, shapes: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for k, n in shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w8, ws = quantize_weight_per_channel(w)
        x8, xs = quantize_per_token(x)
        one = torch.ones((), device="cuda")
        flops = 2 * m * k * n
        mm = functools.partial(torch._scaled_mm, x8, w8.t(), out_dtype=torch.bfloat16)
        forms = {
            "bf16": functools.partial(F.linear, x, w),
            "fp8 rowwise": functools.partial(mm, scale_a=xs, scale_b=ws[None]),
            "fp8 rowwise, fast accumulation": functools.partial(
                mm, scale_a=xs, scale_b=ws[None], use_fast_accum=True
            ),
            "fp8 tensorwise": functools.partial(mm, scale_a=one, scale_b=one),
            "fp8 quantize x": functools.partial(quantize_per_token, x),
        }
        # error against the float32 product of the same (dequantized) operands: the accumulation alone
        exact = (x8.float() * xs) @ (w8.float() * ws[:, None]).t()
        for form, fn in forms.items():
            ms = cuda_ms(fn)
            rows.append({"m": m, "k": k, "n": n, "form": form, "ms": round(ms, 4),
                         "tflops": round(flops / ms / 1e9, 1)})  # fmt: skip
            if form.startswith("fp8 rowwise"):
                rows[-1]["rel_err_vs_fp32"] = ((fn().float() - exact).norm() / exact.norm()).item()
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    assert FP8 is torch.float8_e4m3fn
    result = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "attention": attention_rows(8448) + attention_rows(4352),
        "attention_layout": attention_layout_rows(8620),
        # image stream: 8192 tokens; qkv 3072->9216, out 3072->3072, mlp 3072->12288->3072
        "gemm": gemm_rows(8192, [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072)]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
