"""Portable quantized layers: Nunchaku's SVDQ W4A4 and AWQ W4A16 linears on any device.

Nunchaku's kernels compute, for an SVDQ layer (nunchaku-tech/nunchaku@3a3cc3d
nunchaku/models/linear.py:161-268, nunchaku/ops/fused.py:14-79),

    y = ((x + shift) / smooth) @ R.T + (x @ proj_down) @ proj_up.T + bias

where R is the 4-bit residual (int4 codes * group-64 scales, or e2m1 codes * fp8 group-16 scales *
wcscales * wtscale), the low-rank branch sees the raw input, and `shift` is 0.171875 only for the
second layer of the int4 fused GELU MLP (its activations are quantized unsigned; the file's bias
compensates). Every term is linear in x, so the whole layer is exactly one dense linear map:

    W_eff = R / smooth[None, :] + proj_up @ proj_down.T,   b_eff = bias + shift * (R / smooth).sum(1)

The portable backend builds W_eff once at load and then runs a plain GEMM: in the activation dtype
("bf16" mode) or as fp8 codes with a per-output-channel scale ("fp8" mode, dynamic per-token activation
scales; fp8 tensor cores on SM >= 8.9). It does not emulate Nunchaku's 4-bit activation quantization,
so it is slightly *more* accurate than the kernels it replaces.

A LoRA side branch (y += (x @ A.T) @ B.T) can be attached to any of these layers; see lora.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp8
from . import layout

INT4_FC2_SHIFT = 0.171875  # nunchaku launch_impl.cuh: unsigned activation shift of the fused MLP's fc2
COMPUTE_MODES = ("bf16", "fp8")


def svdq_dense(
    tensors: Mapping[str, torch.Tensor], precision: str, act_shift: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective float32 (weight [N, K], bias [N]) of one SVDQ layer given under the checkpoint's names."""
    _require(tensors, ("qweight", "wscales", "smooth_factor", "proj_down", "proj_up", "bias"), "SVDQ")
    qweight = tensors["qweight"]
    n = qweight.shape[0]
    if precision == "int4":
        codes = layout.unpack_qweight(qweight, signed=True).float()
        scales = layout.unpack_scales(tensors["wscales"]).float()
        residual = codes * scales.repeat_interleave(64, dim=1)
    elif precision == "fp4":
        codes = layout.unpack_qweight(qweight, signed=False)
        micro = layout.unpack_micro_scales(tensors["wscales"]).float()
        residual = layout.e2m1_to_float(codes) * micro.repeat_interleave(16, dim=1)
        if "wcscales" in tensors:  # per-channel outer scale (fused q/k/v layers)
            residual = residual * layout.unpack_vector(tensors["wcscales"]).float()[:, None]
        if "wtscale" in tensors:  # per-tensor outer scale (the other layers)
            residual = residual * tensors["wtscale"].float().reshape(())
    else:
        raise ValueError(f"precision must be 'int4' or 'fp4', got {precision!r}")
    smooth = layout.unpack_vector(tensors["smooth_factor"]).float()
    residual = residual / smooth[None, :]
    down = layout.unpack_proj_down(tensors["proj_down"]).float()  # [R, K]
    up = layout.unpack_proj_up(tensors["proj_up"]).float()  # [N, R]
    weight = residual + up @ down
    bias = layout.unpack_vector(tensors["bias"]).float()
    if act_shift:
        bias = bias + act_shift * residual.sum(dim=1)
    assert weight.shape[0] == n
    return weight, bias


def awq_dense(tensors: Mapping[str, torch.Tensor], splits: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective float32 (weight, bias) of an AWQ modulation layer, in diffusers' channel order.

    The file interleaves the `splits` chunks (channel c*6+s) and folds the +1 of the two scale chunks
    (s = 1 and 4) into the bias (nunchaku transformer_qwenimage.py; deepcompressor utils.py:356-363);
    both are undone here so the layer is a drop-in for diffusers' `img_mod.1` / `txt_mod.1`.
    """
    _require(tensors, ("qweight", "wscales", "wzeros", "bias"), "AWQ")
    codes = layout.unpack_awq_qweight(tensors["qweight"]).float()
    n, k = codes.shape
    groups = k // layout.AWQ_GROUP
    # Rows beyond K/64 are TinyChat's padding; the weight is w = q * s + z with z pre-scaled.
    scales = tensors["wscales"][:groups].float().t().repeat_interleave(layout.AWQ_GROUP, dim=1)
    zeros = tensors["wzeros"][:groups].float().t().repeat_interleave(layout.AWQ_GROUP, dim=1)
    weight = layout.deinterleave_modulation(codes * scales + zeros, splits)
    bias = layout.deinterleave_modulation(tensors["bias"].float(), splits)
    return weight, bias - modulation_scale_ones(n, splits, device=bias.device)


def modulation_scale_ones(n: int, splits: int = 6, device: torch.device | None = None) -> torch.Tensor:
    """The +1 that Nunchaku folds into the scale chunks (s = 1 and 4: shift, scale, gate twice)."""
    ones = torch.zeros(splits, n // splits, device=device)
    ones[1] = 1.0
    ones[4] = 1.0
    return ones.reshape(n)


def _require(tensors: Mapping[str, torch.Tensor], names: tuple[str, ...], kind: str) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise KeyError(f"{kind} layer is missing tensors {missing}; got {sorted(tensors)}")


class DequantizedLinear(nn.Module):
    """A linear layer holding an effective weight, in the activation dtype ("bf16") or as fp8 + scale.

    Optional LoRA side branches are kept apart from the weight so strengths can change without
    touching it (lora.py manages them).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute: str, dtype: torch.dtype):
        super().__init__()
        if compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
        self.compute = compute
        self.dtype = dtype
        self.out_features, self.in_features = weight.shape
        self.weight = self.weight_scale = None
        self.set_weight(weight)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        # LoRA side branch y += (x @ lora_down.T) @ lora_up.T, every LoRA of this layer concatenated
        # along the rank with its strength folded into lora_up (lora.py). Buffers, so they move with
        # the module (offload) and never touch the weight.
        self.register_buffer("lora_down", None)
        self.register_buffer("lora_up", None)

    @classmethod
    def shell(
        cls, out_features: int, in_features: int, compute: str, dtype: torch.dtype
    ) -> DequantizedLinear:
        """A layer without its weight (a streamed block's, offload.py); it gets one from set_weight."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.compute, layer.dtype = compute, dtype
        layer.out_features, layer.in_features = out_features, in_features
        layer.weight = layer.weight_scale = None
        layer.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
        layer.register_buffer("lora_down", None)
        layer.register_buffer("lora_up", None)
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Store a float effective weight in this layer's compute form (in place when shapes allow)."""
        if self.compute == "fp8":
            codes, scale = fp8.quantize_weight_per_channel(weight)
            if self.weight is not None and self.weight.device == codes.device:
                self.weight.copy_(codes)
                self.weight_scale.copy_(scale)
            else:
                self.weight = nn.Parameter(codes, requires_grad=False)
                self.weight_scale = nn.Parameter(scale, requires_grad=False)
        elif self.weight is not None and self.weight.device == weight.device:
            self.weight.copy_(weight)
        else:
            self.weight = nn.Parameter(weight.to(self.dtype), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (bf16 weights are stored in it)."""
        return getattr(torch, self.dtype_name)

    @dtype.setter
    def dtype(self, dtype: torch.dtype) -> None:
        # Kept as a name: torch's guard serialization (saved compiled graphs, precompile.py) pickles the
        # module attributes a graph doesn't read as "missing" by object id, and would then lose the
        # process-wide torch.bfloat16 object everywhere else in the saved guards.
        self.dtype_name = str(dtype).removeprefix("torch.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute == "fp8":
            y = fp8.fp8_linear(x, self.weight, self.weight_scale, self.bias, out_dtype=x.dtype)
        else:
            y = F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        if self.lora_down is not None:
            y = y + F.linear(F.linear(x.to(self.lora_down.dtype), self.lora_down), self.lora_up).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, compute={self.compute}"


class SVDQLinear(DequantizedLinear):
    """Nunchaku's SVDQW4A4Linear (int4 or nvfp4 file tensors) as a dense bf16 or fp8 GEMM."""

    @classmethod
    def from_packed(
        cls,
        tensors: Mapping[str, torch.Tensor],
        *,
        precision: str,
        act_shift: float = 0.0,
        compute: str = "bf16",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> SVDQLinear:
        """Build from one layer's tensors under the checkpoint's names (`qweight`, `wscales`, ...).

        `act_shift` is INT4_FC2_SHIFT for the second linear of an int4 MLP (the `*_mlp.net.2` layers)
        and 0 elsewhere. The unpacking runs on `device` (the GPU, where there is one: it is fast there).
        """
        moved = {name: t.to(device) for name, t in tensors.items()} if device is not None else tensors
        weight, bias = svdq_dense(moved, precision, act_shift)
        return cls(weight, bias, compute, dtype)


class AWQLinear(DequantizedLinear):
    """Nunchaku's AWQW4A16Linear (the modulation layers) in diffusers' channel order, without the +1."""

    @classmethod
    def from_packed(
        cls,
        tensors: Mapping[str, torch.Tensor],
        *,
        compute: str = "bf16",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> AWQLinear:
        moved = {name: t.to(device) for name, t in tensors.items()} if device is not None else tensors
        weight, bias = awq_dense(moved)
        return cls(weight, bias, compute, dtype)
