"""cuDNN's fp8 attention against PyTorch's bf16 SDPA: the kernel alone, then the whole compiled step.

Part 1, the attention of one block at the edit's size (1024x1024 output + one 1024x1024 reference: 8192
image tokens, plus text; 24 heads of 128): time of PyTorch's SDPA (bf16, cuDNN on Hopper), of the fp8
kernel alone, and of `fp8_attention.fp8_attention` with its quantization, eager and compiled; the error of
each against float32 attention for q/k at three sharpnesses (softmax logits' spread 1, 4, 8), and of
cuDNN against `fp8_attention.fp8_sdpa_reference` (the same arithmetic in float32: checks the scales' meaning).

Part 2, one compiled step of the full-size portable transformer (`comfy_forward`, fp8 linears) with
attention="sdpa" and "fp8": step time, and the output's relative L2 against the eager bf16-linear model
with bf16 SDPA (the "bf16 portable path"), beside what the fp8 linears alone cost.

    python benchmarks/bench_attention.py --workdir /tmp/qb --json benchmarks/results/attention_h200.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import fp8_attention as attention
import torch
from bench_offload import cuda_ms
from bench_pipeline import full_size_files

from qwen_edit.model import comfy_forward
from qwen_edit.transformer import load_transformer


def use_attention(model, kind: str) -> None:
    """Every block's joint attention through PyTorch's SDPA ("sdpa") or cuDNN's fp8 kernel ("fp8")."""
    attend = attention.sdpa if kind == "sdpa" else attention.fp8_attention
    for block in model.transformer_blocks:
        block.attn.processor.attend = lambda q, k, v, mask, f=attend: f(q, k, v)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(((a.float() - b.float()).norm() / b.float().norm()).item(), 5)


def timed(fn, warmup: int = 3, repeats: int = 10) -> float:
    for _ in range(warmup):
        fn()
    return round(cuda_ms(fn, repeats), 3)


def kernel_part(text_tokens: int) -> dict:
    length, heads, dim = 8192 + text_tokens, 24, 128
    gen = torch.Generator("cuda").manual_seed(0)
    rows = []
    for spread in (1.0, 4.0, 8.0):
        # RMS-normed q/k have unit-variance channels; `spread` scales q so the logits q.k/sqrt(d) have
        # that standard deviation (real attention is sharper than random data's).
        q, k, v = (torch.randn(1, length, heads, dim, device="cuda", generator=gen) for _ in range(3))
        q = q * spread
        reference = attention.sdpa(q, k, v)  # float32
        q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
        bf16 = attention.sdpa(q16, k16, v16)
        fp8 = attention.fp8_attention(q16, k16, v16)
        (q8, dq), (k8, dk), (v8, dv) = (attention.quantize_per_tensor(t) for t in (q16, k16, v16))
        emulated = (attention.fp8_sdpa_reference(q8, k8, v8, dq, dk, dv).float() * dv.reshape(())).flatten(2)
        rows.append({
            "logit_spread": spread,
            "bf16_sdpa_vs_fp32": rel(bf16, reference),
            "fp8_vs_fp32": rel(fp8, reference),
            "fp8_vs_reference_arithmetic": rel(fp8, emulated),
            "reference_arithmetic_vs_fp32": rel(emulated, reference),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    compiled = torch.compile(attention.fp8_attention)
    op = torch.ops.qwen_edit.cudnn_fp8_sdpa
    times = {
        "bf16_sdpa_ms": timed(lambda: attention.sdpa(q16, k16, v16)),
        "fp8_kernel_ms": timed(lambda: op(q8, k8, v8, dq, dk, dv)),
        "fp8_with_quantization_eager_ms": timed(lambda: attention.fp8_attention(q16, k16, v16)),
        "fp8_with_quantization_compiled_ms": timed(lambda: compiled(q16, k16, v16)),
    }
    print(json.dumps(times), flush=True)
    return {"tokens": length, "heads": heads, "head_dim": dim, "errors": rows, **times}


def step_part(workdir: Path, text_tokens: int) -> dict:
    files = full_size_files(workdir, "fp4")
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 16, 1, 128, 128, device="cuda", generator=gen)
    ref = torch.randn(1, 16, 1, 128, 128, device="cuda", generator=gen)
    sigma = torch.tensor([0.75], device="cuda")
    ctx = torch.randn(1, text_tokens, 3584, device="cuda", generator=gen)

    def forward(model):
        with torch.inference_mode():
            return comfy_forward(model, x, sigma, ctx, [ref])

    bf16_model = load_transformer(files["transformer"], backend="portable", compute="bf16", device="cuda")
    reference = forward(bf16_model).float()
    out = {"bf16_sdpa_eager_ms": timed(lambda m=bf16_model: forward(m), 1, 3)}
    del bf16_model
    torch.cuda.empty_cache()
    model = load_transformer(files["transformer"], backend="portable", compute="fp8", device="cuda")
    out["fp8_linears_sdpa_eager_vs_bf16"] = rel(forward(model), reference)
    use_attention(model, "fp8")
    out["fp8_linears_fp8_attention_eager_vs_bf16"] = rel(forward(model), reference)
    for kind in ("sdpa", "fp8"):
        torch._dynamo.reset()
        use_attention(model, kind)
        for block in model.transformer_blocks:
            block._compiled_call_impl = None
            block.compile(dynamic=True)  # what load_transformer(compile=True) does
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = forward(model)
        torch.cuda.synchronize()
        out[f"{kind}_compile_s"] = round(time.perf_counter() - start, 1)
        out[f"{kind}_compiled_step_ms"] = timed(lambda: forward(model), 2, 7)
        out[f"{kind}_compiled_vs_bf16"] = rel(result, reference)
        print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--kernel-only", action="store_true")
    args = parser.parse_args()
    problem = attention.fp8_problem("cuda")
    if problem:
        raise SystemExit(problem)
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    import cudnn

    result["cudnn_frontend"] = getattr(cudnn, "__version__", "?")
    result["cudnn_backend"] = torch.backends.cudnn.version()
    result["kernel"] = kernel_part(args.text_tokens)
    if not args.kernel_only:
        result["step"] = step_part(args.workdir, args.text_tokens)
    print(json.dumps(result, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
