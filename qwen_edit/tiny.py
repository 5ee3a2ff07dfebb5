"""Tiny random-weight models written in the real file formats, for tests, CI and the demo.

Same key names, dtypes, packing and metadata as the real files; only the widths and depths are small
(every SVDQ dimension still a multiple of 128, as Nunchaku's tiles require).
"""

from __future__ import annotations

from pathlib import Path

import torch

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
def tiny_reference_transformer(config: dict | None = None, seed: int = 0):
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
    from .svdq.quantize import quantize_transformer

    return quantize_transformer(tiny_reference_transformer(seed=seed), path, precision=precision, rank=rank)
