"""Fused GPU kernels (Triton) where torch.compile's own fusion leaves memory bandwidth unused.

One kernel so far: the MLP's tanh-GELU fused with the per-token fp8 quantization of its output, the
input of the second MLP linear. torch.compile fuses the same ops, but into a looped reduction over the
12288-wide rows that reads the GEMM output twice from memory (0.24 ms per call at 8192 tokens on an
H100); this kernel reads each row a second time while it is still in L2 (benchmarks/RESULTS.md).
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


# Rows are read in chunks of GELU_CHUNK elements by GELU_WARPS warps, twice (absolute maximum, then the
# codes; the second read of a 24 KB row comes from L2). The first kernel kept a whole 12288-wide row in
# registers: one program per SM fit, and it moved ~1.2 TB/s on an H200 (benchmarks/RESULTS.md, issue 14).
GELU_CHUNK = 2048
GELU_WARPS = 4


# Once per process (a single entry): torch.library refuses a second registration of the same op name.
@functools.cache
def _ops():
    kernels = triton_kernels()
    if kernels is None:
        return None
    import triton

    @torch.library.triton_op("qwen_edit::gelu_tanh_quantize", mutates_args={})
    def op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, scale = _outputs(x)
        torch.library.wrap_triton(kernels["chunked"])[(x.shape[0],)](
            x, codes, scale, x.shape[1], BLOCK=min(GELU_CHUNK, triton.next_power_of_2(x.shape[1])),
            num_warps=GELU_WARPS,
        )  # fmt: skip
        return codes, scale

    return op


def _outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    codes = torch.empty((rows, cols), device=x.device, dtype=torch.float8_e4m3fn)
    return codes, torch.empty((rows, 1), device=x.device, dtype=torch.float32)


@functools.cache
def triton_kernels() -> dict | None:
    """The Triton kernels by name ("row_in_registers": the first version, kept for the benchmark;
    "chunked": what the op runs), or None without Triton."""
    try:
        import triton
        import triton.language as tl
        from triton.language.extra import libdevice
    except ImportError:
        return None

    @triton.jit
    def gelu_tanh(x, dtype: tl.constexpr):
        # PyTorch's tanh GELU in float32, in its order of operations (ActivationGeluKernel.cu; sqrt(2/pi),
        # kBeta, kKappa), rounded to the activation dtype as the unfused path does
        inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
        return (0.5 * x * (1.0 + libdevice.tanh(inner))).to(dtype).to(tl.float32)

    @triton.jit
    def row_in_registers(x_ptr, codes_ptr, scale_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n_cols
        x = tl.load(x_ptr + row * n_cols + offsets, mask=mask, other=0.0).to(tl.float32)
        y = gelu_tanh(x, x_ptr.dtype.element_ty)
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
        scale = tl.maximum(amax, 1e-12) / 448.0
        codes = tl.clamp(y / scale, -448.0, 448.0)
        tl.store(codes_ptr + row * n_cols + offsets, codes.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def chunked(x_ptr, codes_ptr, scale_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * n_cols
        largest = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < n_cols
            x = tl.load(x_ptr + base + offsets, mask=mask, other=0.0, eviction_policy="evict_last")
            y = gelu_tanh(x.to(tl.float32), x_ptr.dtype.element_ty)
            largest = tl.maximum(largest, tl.where(mask, tl.abs(y), 0.0))
        scale = tl.maximum(tl.max(largest, axis=0), 1e-12) / 448.0
        for start in range(0, n_cols, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < n_cols
            x = tl.load(x_ptr + base + offsets, mask=mask, other=0.0, eviction_policy="evict_first")
            y = gelu_tanh(x.to(tl.float32), x_ptr.dtype.element_ty)
            codes = tl.clamp(y / scale, -448.0, 448.0)
            tl.store(codes_ptr + base + offsets, codes.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row, scale)

    return {"row_in_registers": row_in_registers, "chunked": chunked}
