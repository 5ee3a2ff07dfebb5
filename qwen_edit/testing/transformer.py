"""Transformer files for tests, benchmarks and the demo: SVDQ checkpoints in Nunchaku's exact tensors,
layout and metadata, quantized from a dense model or filled with random values.

SVDQuant (Li et al. 2024, "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion
Models") splits a smoothed weight W*diag(smooth) into a low-rank part (kept in 16 bits) and a 4-bit
residual. No calibration data is used here: the smoothing factor comes from the weight alone, which
is enough to make valid files with realistic statistics for tests and benchmarks (real checkpoints
are calibrated by deepcompressor; the file format is the same).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..svdq import layout
from ..svdq.checkpoint import AWQ_LAYERS, BLOCK_NORMS, FUSED_PARTS, FUSED_QKV, SVDQ_LAYERS, expected_tensors
from ..svdq.layers import INT4_FC2_SHIFT, modulation_scale_ones

FP8_MAX = 448.0
E2M1_MAX = 6.0

# Metadata as nunchaku's merge_safetensors.py writes it (nunchaku-tech/nunchaku,
# nunchaku/merge_safetensors.py; the tests check it against the real files' metadata).
QUANTIZATION_CONFIGS = {
    "int4": {
        "method": "svdquant",
        "weight": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
        "activation": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
    },
    "fp4": {
        "method": "svdquant",
        "weight": {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16},
        "activation": {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan", "group_size": 16},
    },
}
MODEL_CLASS = "NunchakuQwenImageTransformer2DModel"


def weight_only_smooth(weight: torch.Tensor) -> torch.Tensor:
    """A smoothing factor from the weight alone: flattens the per-input-channel weight range."""
    col_max = weight.abs().amax(dim=0).clamp(min=1e-6)
    smooth = col_max.rsqrt()
    return (smooth / smooth.mean()).clamp(0.25, 4.0)


def quantize_svdq_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    precision: str,
    rank: int,
    act_shift: float = 0.0,
    per_channel_scale: bool = False,
    smooth: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Dense [N, K] weight -> one SVDQW4A4Linear's file tensors (names as in the checkpoint).

    `per_channel_scale` (fp4 only) writes the outer scale as `wcscales` [N] instead of `wtscale` [1],
    as deepcompressor does for the fused q/k/v layers. `act_shift` must be INT4_FC2_SHIFT for the
    second linear of an int4 MLP: the kernel adds it to the activations, and the bias compensates.
    """
    w = weight.float()
    n, k = w.shape
    smooth = weight_only_smooth(w) if smooth is None else smooth.float()
    smooth = smooth.to(torch.bfloat16).float()  # the file stores it in bf16; quantize against that
    smoothed = w * smooth[None, :]
    u, s, vh = torch.linalg.svd(smoothed, full_matrices=False)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).to(torch.bfloat16)  # [N, R]
    down = (root[:, None] * vh[:rank] / smooth[None, :]).to(torch.bfloat16)  # [R, K], acts on raw x
    residual = smoothed - (up.float() @ down.float()) * smooth[None, :]

    out = {}
    if precision == "int4":
        groups = residual.reshape(n, k // 64, 64)
        scales = (groups.abs().amax(dim=2) / 7).clamp(min=1e-8).to(torch.bfloat16)
        codes = (groups / scales.float()[..., None]).round().clamp(-8, 7).to(torch.int8).reshape(n, k)
        dequant = codes.float() * scales.float().repeat_interleave(64, dim=1)
        out["wscales"] = layout.pack_scales(scales)
    elif precision == "fp4":
        groups = residual.reshape(n, k // 16, 16)
        amax = residual.abs().amax(dim=1) if per_channel_scale else residual.abs().amax().expand(n)
        outer = (amax / (E2M1_MAX * FP8_MAX)).clamp(min=1e-12).to(torch.bfloat16)
        micro = (groups.abs().amax(dim=2) / E2M1_MAX / outer.float()[:, None]).clamp(max=FP8_MAX)
        micro = micro.to(torch.float8_e4m3fn)
        step = micro.float().clamp(min=2.0**-9) * outer.float()[:, None]  # avoid 0 for all-zero groups
        codes = layout.float_to_e2m1((groups / step[..., None]).reshape(n, k)).reshape(n, k)
        dequant = layout.e2m1_to_float(codes) * (micro.float() * outer.float()[:, None]).repeat_interleave(
            16, dim=1
        )
        out["wscales"] = layout.pack_micro_scales(micro)
        if per_channel_scale:
            out["wcscales"] = layout.pack_vector(outer)
        else:
            out["wtscale"] = outer[:1].clone()
    else:
        raise ValueError(f"precision must be 'int4' or 'fp4', got {precision!r}")

    b = torch.zeros(n) if bias is None else bias.float()
    if act_shift:
        b = b - act_shift * (dequant / smooth[None, :]).sum(dim=1)
    out.update(
        qweight=layout.pack_qweight(codes),
        smooth_factor=layout.pack_vector(smooth.to(torch.bfloat16)),
        smooth_factor_orig=layout.pack_vector(smooth.to(torch.bfloat16)),
        proj_down=layout.pack_proj_down(down),
        proj_up=layout.pack_proj_up(up),
        bias=layout.pack_vector(b.to(torch.bfloat16)),
    )
    return out


def quantize_awq_linear(weight: torch.Tensor, bias: torch.Tensor, splits: int = 6) -> dict[str, torch.Tensor]:
    """Diffusers-order modulation Linear -> AWQW4A16Linear file tensors (interleaved, +1 folded in)."""
    w = layout.interleave_modulation(weight.float(), splits)
    n, k = w.shape
    groups = w.reshape(n, k // 64, 64)
    # Zero point 7 as deepcompressor writes it: w = (q - 7) * s = q * s + z, z = -7 s.
    scales = (groups.abs().amax(dim=2) / 7).clamp(min=1e-8).to(torch.bfloat16)
    codes = (groups / scales.float()[..., None]).round().clamp(-7, 8) + 7
    rows = layout.awq_group_rows(k)
    wscales = torch.zeros(rows, n, dtype=torch.bfloat16)
    wzeros = torch.zeros(rows, n, dtype=torch.bfloat16)
    wscales[: k // 64] = scales.t()
    wzeros[: k // 64] = (-7 * scales.float()).to(torch.bfloat16).t()
    folded = bias.float() + modulation_scale_ones(n, splits, device=bias.device)
    return {
        "qweight": layout.pack_awq_qweight(codes.to(torch.uint8).reshape(n, k)),
        "wscales": wscales,
        "wzeros": wzeros,
        "bias": layout.interleave_modulation(folded, splits).to(torch.bfloat16),
    }


# -- whole transformer ----------------------------------------------------------------------------


def _block_tensors(block: nn.Module, precision: str, rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    for name, _, _ in SVDQ_LAYERS:
        linears = [block.get_submodule(part) for part in FUSED_PARTS.get(name, (name,))]
        weight = torch.cat([lin.weight.detach() for lin in linears])
        bias = torch.cat([lin.bias.detach() for lin in linears])
        shift = INT4_FC2_SHIFT if precision == "int4" and name.endswith("mlp.net.2") else 0.0
        packed = quantize_svdq_linear(
            weight, bias, precision=precision, rank=rank, act_shift=shift, per_channel_scale=name in FUSED_QKV
        )
        yield from ((f"{name}.{k}", v) for k, v in packed.items())
    for name in AWQ_LAYERS:
        lin = block.get_submodule(name)
        packed = quantize_awq_linear(lin.weight.detach(), lin.bias.detach())
        yield from ((f"{name}.{k}", v) for k, v in packed.items())
    for name in BLOCK_NORMS:
        yield f"{name}.weight", block.get_submodule(name).weight.detach().to(torch.bfloat16)


def svdq_metadata(config: dict, precision: str, rank: int) -> dict[str, str]:
    """The safetensors metadata of a Nunchaku Qwen-Image file: config, quantization_config, model_class."""
    config = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
    config.setdefault("_class_name", "QwenImageTransformer2DModel")
    quant = dict(QUANTIZATION_CONFIGS[precision], rank=rank)
    return {
        "config": json.dumps(config),
        "quantization_config": json.dumps(quant),
        "model_class": MODEL_CLASS,
    }


@torch.no_grad()
def quantize_transformer(
    model: nn.Module, path: str | Path, *, precision: str = "int4", rank: int = 32
) -> Path:
    """Write a diffusers `QwenImageTransformer2DModel` as an SVDQ file in Nunchaku's exact layout.

    Block linears become SVDQ W4A4 layers (q/k/v fused), the modulation linears AWQ W4A16 layers;
    everything else is stored in bf16 under its diffusers name.
    """
    if precision not in QUANTIZATION_CONFIGS:
        raise ValueError(f"precision must be 'int4' or 'fp4', got {precision!r}")
    if rank % 16:
        raise ValueError(f"rank must be a multiple of 16 (Nunchaku's low-rank tiles), got {rank}")
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.state_dict().items():
        if not name.startswith("transformer_blocks."):
            tensors[name] = param.detach().to(torch.bfloat16).contiguous()
    for i, block in enumerate(model.transformer_blocks):
        for name, t in _block_tensors(block, precision, rank):
            tensors[f"transformer_blocks.{i}.{name}"] = t.contiguous().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=svdq_metadata(model.config, precision, rank))
    return path


@torch.no_grad()
def write_random_checkpoint(
    path: str | Path,
    config: dict,
    *,
    precision: str = "fp4",
    rank: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Path:
    """A full-size file of random values with the real names, shapes, dtypes and metadata (no SVD).

    For timing and memory measurements, where the values don't matter but everything else must: the
    loader reads and unpacks it exactly like a real checkpoint. Scales are small so activations stay
    finite through 60 blocks.
    """
    gen = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, (shape, dtype) in expected_tensors(config, precision, rank).items():
        leaf = name.rpartition(".")[2]
        if dtype in (torch.int8, torch.int32):
            info = torch.iinfo(dtype)
            t = torch.randint(info.min, info.max, shape, generator=gen, device=device, dtype=torch.int64)
            t = t.to(dtype)
        elif dtype == torch.float8_e4m3fn:  # fp4 micro-scales: positive, around 1
            t = (torch.rand(shape, generator=gen, device=device) + 0.5).to(dtype)
        elif leaf in ("smooth_factor", "smooth_factor_orig", "wcscales") or name.endswith("norm.weight"):
            t = torch.ones(shape, device=device, dtype=dtype)
        elif leaf in ("wtscale", "wscales"):  # bf16 scales: int4 groups, fp4 outer scale, AWQ groups
            t = torch.full(shape, 1e-3, device=device, dtype=dtype)
        else:
            scale = 0.02 if len(shape) == 2 else 0.01
            t = (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)
        tensors[name] = t.cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=svdq_metadata(config, precision, rank))
    return path


# -- tiny models (tests, CI, the demo) ------------------------------------------------------------
# Same key names, dtypes, packing and metadata as the real files; only the widths and depths are small
# (every SVDQ dimension still a multiple of 128, as Nunchaku's tiles require).

# Width 128 (2 heads of 64), MLP 512, modulation 768; text features 64 instead of 3584.
TINY_TRANSFORMER_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "attention_head_dim": 64,
    "axes_dims_rope": [8, 28, 28],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 64,
    "num_attention_heads": 2,
    "num_layers": 2,
    "out_channels": 16,
    "patch_size": 2,
}


@torch.no_grad()
def tiny_reference_transformer(config: dict | None = None, seed: int = 0) -> nn.Module:
    """A float32 diffusers QwenImageTransformer2DModel with weights of realistic scale (not zero-init)."""
    from diffusers import QwenImageTransformer2DModel

    config = dict(TINY_TRANSFORMER_CONFIG if config is None else config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    gen = torch.Generator().manual_seed(seed)
    model = QwenImageTransformer2DModel(**config).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        elif p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def write_tiny_transformer(
    path: str | Path, *, precision: str = "int4", rank: int = 16, seed: int = 0
) -> Path:
    """Quantize a tiny random transformer into an SVDQ file (Nunchaku's exact layout and metadata)."""
    return quantize_transformer(tiny_reference_transformer(seed=seed), path, precision=precision, rank=rank)
