"""Each change to the compiled fp8 step, one at a time, on one loaded model (the pipeline's forward).

Rows, each compiled afresh (torch._dynamo.reset) and timed through `comfy_forward` at 1024x1024 with one
1024x1024 reference and a 428-token prompt (what the pipeline's text encoder gives for a 200-character
prompt):
  before       complex-number RoPE (a separate kernel under compile), SDPA on transposed views
  + real RoPE  RoPE in real float32 arithmetic (fuses into the q/k norm kernel)
  + contiguous q/k/v for SDPA (the current code)
  dynamic      compiled with dynamic shapes (one graph for every prompt length; the current code)
  fast accumulation   fp8 GEMMs without float32 promotion of partial sums
  fused MLP    tanh-GELU and the fp8 quantization of its output in one Triton kernel (kernels.py)
and for the static and dynamic compiles, the first call at a prompt length not seen before. Each
output is compared with the eager forward's.

    python benchmarks/bench_step_changes.py --workdir /tmp/qb --json benchmarks/results/step_changes.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_offload import cuda_ms
from bench_pipeline import full_size_files

import qwen_edit.model as model_module
from qwen_edit import fp8
from qwen_edit.model import FusedQKVAttnProcessor, comfy_forward, use_fused_fp8_mlp
from qwen_edit.transformer import load_transformer

CURRENT = (model_module.apply_rotary, FusedQKVAttnProcessor.attend)


def complex_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The RoPE of the earlier code: complex multiplication."""
    freqs = freqs if freqs.is_complex() else torch.view_as_complex(freqs)
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs[None, :, None, :]
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def strided_attend(q, k, v, mask):
    """The attention call of the earlier code: SDPA on transposed views of [B, L, H, D]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2).to(q.dtype)


def timed(fn, warmup: int = 2, repeats: int = 7) -> float:
    for _ in range(warmup):
        fn()
    return cuda_ms(fn, repeats)


def first_call_s(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return round(time.perf_counter() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--text-tokens", type=int, default=428)
    args = parser.parse_args()
    files = full_size_files(args.workdir, "fp4")
    model = load_transformer(files["transformer"], backend="portable", compute="fp8", device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 16, 1, 128, 128, device="cuda", generator=gen)
    ref = torch.randn(1, 16, 1, 128, 128, device="cuda", generator=gen)
    sigma = torch.tensor([0.75], device="cuda")

    def context(n: int) -> torch.Tensor:
        return torch.randn(1, n, 3584, device="cuda", generator=gen)

    ctx = context(args.text_tokens)

    @torch.inference_mode()
    def step(c=ctx):
        return comfy_forward(model, x, sigma, c, [ref])

    def fused_mlp(on: bool) -> None:
        for block in model.transformer_blocks:
            for mlp in (block.img_mlp, block.txt_mlp):
                mlp.__dict__.pop("forward", None)
        if on:
            use_fused_fp8_mlp(model)

    variants = [  # (name, rotary, attend, dynamic, fast accumulation, fused MLP kernel)
        ("before: complex RoPE, SDPA on views", complex_rotary, strided_attend, False, False, False),
        ("+ real RoPE", CURRENT[0], strided_attend, False, False, False),
        ("+ contiguous q/k/v for SDPA", *CURRENT, False, False, False),
        ("+ dynamic-shape compile", *CURRENT, True, False, False),
        ("+ fp8 fast accumulation", *CURRENT, True, True, False),
        ("+ fused GELU + fp8 quantization kernel (current)", *CURRENT, True, True, True),
    ]
    rows = []
    fused_mlp(False)
    with torch.inference_mode():
        outputs = {"eager": comfy_forward(model, x, sigma, ctx, [ref]).float()}
    try:
        for name, rotary, attend, dynamic, fast, fused in variants:
            torch._dynamo.reset()
            fused_mlp(fused)
            model_module.apply_rotary = rotary
            FusedQKVAttnProcessor.attend = staticmethod(attend)
            for block in model.transformer_blocks:
                block._compiled_call_impl = None
                block.compile(dynamic=dynamic)
            with fp8.fast_accumulation(fast):  # compiled and timed with it; the default is back after
                row = {"variant": name, "compile_s": first_call_s(step)}
                row["step_ms"] = round(timed(step), 1)
                outputs[name] = step().float()
                if name.startswith(("+ dynamic", "+ contiguous")):
                    other = context(args.text_tokens - 37)
                    row["new_prompt_length_first_call_s"] = first_call_s(lambda o=other: step(o))
                    row["new_prompt_length_step_ms"] = round(timed(lambda o=other: step(o), 1, 3), 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:  # the earlier code's RoPE and attention were swapped in above: the current ones go back
        model_module.apply_rotary = CURRENT[0]
        FusedQKVAttnProcessor.attend = staticmethod(CURRENT[1])
    # A random-weight 60-block network amplifies rounding differences; the eager row sets the scale.
    base = outputs["eager"]
    for row in rows:
        row["rel_diff_vs_eager"] = ((outputs[row["variant"]] - base).norm() / base.norm()).item()
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    print(json.dumps(result, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
