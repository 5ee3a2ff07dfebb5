"""VAE files for tests, benchmarks and the demo: a small random Qwen-Image VAE in ComfyUI's format."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..vae import build_vae, comfy_key_map, vae_config


def write_comfy_vae(
    path: str | Path,
    *,
    base_dim: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    diffusers_dir: str | Path | None = None,
) -> Path:
    """Write a small random Qwen-Image VAE in ComfyUI's format: the real file's 194 names, only narrower.

    Same structure as `qwen_image_vae.safetensors` (z_dim 16, dim_mult [1,2,4,4], 2 res blocks) with every
    width of 96 scaled to `base_dim`; all tensors in `dtype` (the real file is all bf16), no metadata. The
    weights are drawn from a CPU generator seeded with `seed` (the global RNG is untouched), scaled so that
    activations stay O(1). With `diffusers_dir`, the same weights are also saved there in diffusers' own
    layout (save_pretrained: config.json + diffusion_pytorch_model.safetensors). Returns `path`.
    """
    config = vae_config()
    config["base_dim"] = base_dim
    model = build_vae(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, meta in model.state_dict().items():
        shape = tuple(meta.shape)
        if name.endswith(".gamma"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith(".bias"):
            value = 0.05 * torch.randn(shape, generator=generator)
        else:
            # Uniform with variance 1/fan_in: each conv roughly keeps the scale of its input.
            bound = math.sqrt(3.0 / math.prod(shape[1:]))
            value = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        tensors[name] = value.to(dtype).contiguous()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {diffusers: comfy for comfy, diffusers in comfy_key_map(model).items()}
    save_file({names[name]: value for name, value in tensors.items()}, str(path))
    if diffusers_dir is not None:
        model.load_state_dict(tensors, strict=True, assign=True)
        model.save_pretrained(str(diffusers_dir), safe_serialization=True)
    return path
