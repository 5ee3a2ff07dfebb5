"""FP8 (e4m3) matrix products with per-output-channel weight scales.

One idea: a weight stored as fp8 codes times a float scale per output channel, multiplied by
activations that are quantized on the fly with one scale per token ("dynamic per-token"). On GPUs
with fp8 tensor cores (SM >= 8.9) this is one `torch._scaled_mm` call; elsewhere the same numbers are
computed by upcasting, so CPU results equal the GPU path up to accumulation order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Hopper's fp8 tensor cores accumulate in reduced precision unless the GEMM promotes partial sums to
# float32 every few k-blocks; skipping that ("fast accumulation") is what fp8 inference stacks use
# for forward passes. On an H100: 1.17-1.24x faster GEMMs, 0.2-0.3% error against float32 sums
# (0.17% with promotion), next to the few % of fp8 rounding itself (benchmarks/RESULTS.md).
# Process-wide (the GEMMs run deep inside compiled blocks, where no argument reaches them): change it
# only through `fast_accumulation`, which puts it back.
_FAST_ACCUMULATION = True


@contextmanager
def fast_accumulation(enabled: bool) -> Iterator[None]:
    """Run the fp8 GEMMs inside the block with fast accumulation on or off (on is the default), and
    restore the previous setting on leaving, whatever happens inside. Compiled blocks see the change:
    torch.compile guards on the value and recompiles."""
    global _FAST_ACCUMULATION
    previous, _FAST_ACCUMULATION = _FAST_ACCUMULATION, bool(enabled)
    try:
        yield
    finally:
        _FAST_ACCUMULATION = previous


def fp8_supported(device: torch.device | str | None) -> bool:
    """True where `torch._scaled_mm` has fp8 tensor cores: CUDA devices of compute capability >= 8.9."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (fp8 codes [N, K], float32 scale [N]) with weight ~= codes * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    codes = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] activations -> (fp8 codes, float32 scale [M, 1]), one scale per row."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    codes = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale


def fp8_linear(
    x: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = x @ (weight_fp8 * weight_scale[:, None]).T + bias, activations quantized per token to fp8.

    `weight_scale` is float32, shape [N] (per output channel) or [] (per tensor).
    """
    shape = x.shape
    x_codes, x_scale = quantize_per_token(x.reshape(-1, shape[-1]))
    y = scaled_matmul(x_codes, x_scale, weight_fp8, weight_scale, bias, out_dtype or x.dtype)
    return y.reshape(*shape[:-1], y.shape[-1])


def scaled_matmul(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(x_codes * x_scale) @ (weight_fp8 * weight_scale[:, None]).T + bias for [M, K] fp8 codes with
    float32 scales [M, 1]: one `torch._scaled_mm` on fp8 tensor cores, else the same numbers upcast."""
    n = weight_fp8.shape[0]
    w_scale = weight_scale.float().reshape(-1)
    if w_scale.numel() == 1:
        w_scale = w_scale.expand(n)
    if x_codes.is_cuda and fp8_supported(x_codes.device) and x_codes.shape[0] > 0:
        # _scaled_mm wants the second operand column-major, scales as [M,1] and [1,N].
        return torch._scaled_mm(
            x_codes,
            weight_fp8.t(),
            scale_a=x_scale,
            scale_b=w_scale.reshape(1, n).contiguous(),
            bias=None if bias is None else bias.to(out_dtype),
            out_dtype=out_dtype,
            use_fast_accum=_FAST_ACCUMULATION,
        )
    y = (x_codes.float() @ weight_fp8.float().t()) * x_scale * w_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
