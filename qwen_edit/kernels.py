"""Fused GPU kernels (Triton) where torch.compile's own fusion leaves memory bandwidth unused.

One kernel so far: the MLP's tanh-GELU fused with the per-token fp8 quantization of its output, the
input of the second MLP linear. torch.compile fuses the same ops, but into a looped reduction over the
12288-wide rows that reads the GEMM output twice (0.24 ms per call at 8192 tokens on an H100); this
kernel keeps each row in registers and reads it once (benchmarks/RESULTS.md has the measurement).
Registered as a `torch.library.triton_op`, so compiled graphs call it too. Triton ships with PyTorch's
CUDA wheels; without it (or on a CPU) callers use the unfused PyTorch path, which gives the same numbers.
"""

from __future__ import annotations

import functools

import torch


def register() -> bool:
    """Register the kernels as torch ops; False where Triton is missing (a CPU-only PyTorch)."""
    return _ops() is not None


def gelu_tanh_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] bf16/fp16 pre-activations on a CUDA device -> (fp8 codes [M, K], float32 scales [M, 1])
    of GELU(x). Needs `register()` first.

    The same numbers as `fp8.quantize_per_token(F.gelu(x, approximate="tanh"))`: GELU in float32, rounded
    to x's dtype, the row's absolute maximum / 448 as its scale, codes rounded to nearest e4m3.
    """
    return torch.ops.qwen_edit.gelu_tanh_quantize(x.reshape(-1, x.shape[-1]).contiguous())


# Once per process (a single entry): torch.library refuses a second registration of the same op name.
@functools.cache
def _ops():
    try:
        import triton
        import triton.language as tl
        from triton.language.extra import libdevice
    except ImportError:
        return None

    @triton.jit
    def gelu_tanh_quantize_kernel(x_ptr, codes_ptr, scale_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n_cols
        x = tl.load(x_ptr + row * n_cols + offsets, mask=mask, other=0.0).to(tl.float32)
        # PyTorch's tanh GELU, in its order of operations (ActivationGeluKernel.cu)
        inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))  # sqrt(2/pi), PyTorch's kBeta, kKappa
        y = 0.5 * x * (1.0 + libdevice.tanh(inner))
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # the activation dtype, as the unfused path
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
        scale = tl.maximum(amax, 1e-12) / 448.0
        codes = tl.clamp(y / scale, -448.0, 448.0)
        tl.store(codes_ptr + row * n_cols + offsets, codes.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row, scale)

    @torch.library.triton_op("qwen_edit::gelu_tanh_quantize", mutates_args={})
    def op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = x.shape
        codes = torch.empty((rows, cols), device=x.device, dtype=torch.float8_e4m3fn)
        scale = torch.empty((rows, 1), device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(cols)
        torch.library.wrap_triton(gelu_tanh_quantize_kernel)[(rows,)](
            x, codes, scale, cols, BLOCK=block, num_warps=16 if block > 4096 else 8
        )
        return codes, scale

    # Compiled graphs name the kernel by module attribute (saved graphs load it from there: precompile.py).
    globals()["gelu_tanh_quantize_kernel"] = gelu_tanh_quantize_kernel
    return op
