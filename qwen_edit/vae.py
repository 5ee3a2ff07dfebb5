"""The Qwen-Image VAE without ComfyUI: load it, encode images to latents, decode latents (tiled when large).

The model is diffusers' `AutoencoderKLQwenImage`, the Wan-2.1 video VAE fine-tuned for images. Images are
one frame, so tensors inside it are 5-D [B, C, T=1, H, W]; the functions here take and return 4-D ones.

Weights can come from:
- ComfyUI's `qwen_image_vae.safetensors` (Comfy-Org/Qwen-Image_ComfyUI, split_files/vae). It keeps the
  original Wan-2.1 module names (`encoder.downsamples.*`, `conv1`/`conv2`, `decoder.upsamples.*`, the tree of
  Comfy-Org/ComfyUI@a125cd8:comfy/ldm/wan/vae.py), which are renamed here onto diffusers' names;
- a diffusers `vae/` folder (`config.json` + `diffusion_pytorch_model.safetensors`, sharded or not), or a
  repository root holding one;
- one safetensors file with diffusers' names.

Loading is strict: every tensor of the file must fill a parameter of the right shape, and every parameter must
be filled; anything else raises `VAEFormatError` naming the offending keys.

Latents exchanged with the rest of the library are *normalized* with the per-channel Wan-2.1 statistics
(`latents_mean` / `latents_std` of the config). That is ComfyUI's `Wan21` latent format (process_in /
process_out, Comfy-Org/ComfyUI@a125cd8:comfy/latent_formats.py) and the same maths diffusers' Qwen pipelines
apply around `vae.encode` / `vae.decode`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLQwenImage
from safetensors import safe_open

from .errors import VAEFormatError
from .header import HeaderError, few, read_header

CONFIG_PATH = Path(__file__).resolve().parent / "configs" / "qwen_image_vae.json"

SPATIAL_FACTOR = 8  # 3 stride-2 stages: one latent pixel per 8x8 image pixels
DEFAULT_TILE_SIZE = 512  # pixels, the default of ComfyUI's VAEDecodeTiled node (nodes.py)
DEFAULT_TILE_OVERLAP = 64  # pixels, likewise
# decode_latents(tiled=None) tiles above this many output pixels (2048x2048). Recent ComfyUI budgets
# 2200 x 64 x dtype-size bytes per latent pixel for a one-frame Wan-2.1 decode (comfyanonymous/ComfyUI
# comfy/sd.py, VAE.__init__, memory_used_decode): in bf16 ~4.6 GB at 1 MP, ~18 GB at 4 MP. The usual 1-2 MP
# Qwen outputs therefore decode whole, as in ComfyUI, and bigger ones stay within a 24 GB card.
AUTO_TILE_PIXELS = 2048 * 2048

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"

# Keys that identify a layout; they are the ones ComfyUI's own detection looks at (comfy/sd.py, VAE.__init__).
COMFY_MARKER = "decoder.middle.0.residual.0.gamma"
DIFFUSERS_MARKER = "decoder.mid_block.resnets.0.norm1.gamma"
WAN22_MARKER = "decoder.upsamples.0.upsamples.0.residual.2.weight"

# ComfyUI's ResidualBlock is `residual = Sequential(RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout,
# CausalConv3d)` plus `shortcut`; diffusers names the same layers.
_RESNET_PARTS = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}
# Attention (norm/to_qkv/proj) and Resample (resample.1/time_conv) layers have the same names in both.
_SAME_NAME_PARTS = {"norm", "to_qkv", "proj", "resample", "time_conv"}


# ----------------------------------------------------------------------------------------------- config


def vae_config() -> dict:
    """The diffusers config of Qwen-Image(-Edit-2509)'s VAE (`vae/config.json`), shipped with the package."""
    return json.loads(CONFIG_PATH.read_text())


def build_vae(config: Mapping | None = None) -> AutoencoderKLQwenImage:
    """`AutoencoderKLQwenImage` from `config` (default: Qwen-Image's) on the meta device: no memory used."""
    config = dict(vae_config() if config is None else config)
    if config.get("_class_name", "AutoencoderKLQwenImage") != "AutoencoderKLQwenImage":
        raise VAEFormatError(f"config describes a {config['_class_name']}, expected AutoencoderKLQwenImage")
    with torch.device("meta"):
        return AutoencoderKLQwenImage.from_config(config)


# ------------------------------------------------------------------------------------------ key naming


def comfy_key_map(model: AutoencoderKLQwenImage) -> dict[str, str]:
    """{ComfyUI/Wan-2.1 name: diffusers name} for every parameter of `model`.

    Built from the model's own parameter list so it holds for any width; the decoder's flat `upsamples` index
    is counted from the model's up blocks (num_res_blocks + 1 resnets, then one upsampler except the last).
    """
    up_starts, start = [], 0
    for block in model.decoder.up_blocks:
        up_starts.append(start)
        start += len(block.resnets) + (0 if block.upsamplers is None else len(block.upsamplers))
    up_resnets = [len(block.resnets) for block in model.decoder.up_blocks]

    mapping = {}
    for name in model.state_dict():
        comfy = _comfy_name(name, up_starts, up_resnets)
        if comfy in mapping:
            raise AssertionError(f"two parameters map onto {comfy}: {mapping[comfy]} and {name}")
        mapping[comfy] = name
    return mapping


def _comfy_name(name: str, up_starts: list[int], up_resnets: list[int]) -> str:
    parts = name.split(".")
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    if parts[0] in top:
        return ".".join([top[parts[0]], *parts[1:]])
    side, block, rest = parts[0], parts[1], parts[2:]
    if block == "conv_in":
        return ".".join([side, "conv1", *rest])
    if block == "norm_out":
        return ".".join([side, "head.0", *rest])
    if block == "conv_out":
        return ".".join([side, "head.2", *rest])
    if block == "mid_block":
        # ComfyUI: middle = Sequential(ResidualBlock, AttentionBlock, ResidualBlock).
        kind, k, inner = rest[0], int(rest[1]), rest[2:]
        index = 2 * k if kind == "resnets" else 2 * k + 1
        return f"{side}.middle.{index}.{_inner_name(inner, name)}"
    if block == "down_blocks":
        # Both encoders build one flat list in the same order, so the index carries over.
        return f"{side}.downsamples.{rest[0]}.{_inner_name(rest[1:], name)}"
    if block == "up_blocks":
        stage, kind, k, inner = int(rest[0]), rest[1], int(rest[2]), rest[3:]
        index = up_starts[stage] + (k if kind == "resnets" else up_resnets[stage] + k)
        return f"{side}.upsamples.{index}.{_inner_name(inner, name)}"
    raise AssertionError(f"no ComfyUI name known for diffusers parameter {name}")


def _inner_name(inner: list[str], full: str) -> str:
    if inner[0] in _RESNET_PARTS:
        return ".".join([_RESNET_PARTS[inner[0]], *inner[1:]])
    if inner[0] in _SAME_NAME_PARTS:
        return ".".join(inner)
    raise AssertionError(f"no ComfyUI name known for diffusers parameter {full}")


def detect_layout(keys: Iterable[str], source: str = "weights") -> str:
    """'comfy' (Wan-2.1 names) or 'diffusers'; `VAEFormatError` with a hint for anything else."""
    keys = set(keys)
    if WAN22_MARKER in keys:
        raise VAEFormatError(
            f"{source} is a Wan-2.2 VAE (48 latent channels, 16x downscale); Qwen-Image needs its own "
            "Wan-2.1 style VAE (qwen_image_vae.safetensors)"
        )
    if COMFY_MARKER in keys:
        return "comfy"
    if DIFFUSERS_MARKER in keys:
        return "diffusers"
    hint = ""
    prefixed = sorted(k for k in keys if k.endswith("." + COMFY_MARKER) or k.endswith("." + DIFFUSERS_MARKER))
    if prefixed:
        prefix = prefixed[0][: prefixed[0].index("decoder.")]
        hint = f"; it holds a VAE under the prefix {prefix!r} (a whole checkpoint?): extract the VAE first"
    elif any("lora" in k.lower() for k in keys):
        hint = "; it looks like a LoRA, not a VAE"
    elif any("transformer_blocks." in k for k in keys):
        hint = "; it looks like a diffusion transformer (DiT), not a VAE"
    elif any(k.startswith(("model.layers.", "visual.", "model.language_model.")) for k in keys):
        hint = "; it looks like a text encoder, not a VAE"
    raise VAEFormatError(
        f"{source} is not a Qwen-Image VAE: none of its {len(keys)} tensors is {COMFY_MARKER!r} (ComfyUI / "
        f"Wan-2.1 names) or {DIFFUSERS_MARKER!r} (diffusers names){hint}. First keys: {few(sorted(keys), 8)}"
    )


def match_vae_keys(
    file_shapes: Mapping[str, Sequence[int]], model: AutoencoderKLQwenImage, source: str = "weights"
) -> dict[str, str]:
    """{file key: model parameter name}, after checking the file holds exactly the model's parameters.

    `file_shapes` is {name: shape} as stored (ComfyUI or diffusers names). Raises `VAEFormatError` listing the
    missing, unexpected and wrongly shaped tensors.
    """
    layout = detect_layout(file_shapes, source)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    rename = comfy_key_map(model) if layout == "comfy" else {name: name for name in expected}
    mapping = {key: rename[key] for key in file_shapes if key in rename}
    unexpected = sorted(key for key in file_shapes if key not in rename)
    filled = set(mapping.values())
    inverse = {v: k for k, v in rename.items()}
    missing = sorted(inverse[name] for name in expected if name not in filled)
    mismatched = [
        f"{key} {list(file_shapes[key])} (needs {list(expected[name])})"
        for key, name in sorted(mapping.items())
        if tuple(file_shapes[key]) != expected[name]
    ]
    if missing or unexpected or mismatched:
        cfg = model.config
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing: {few(missing, 8)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: {few(unexpected, 8)}")
        if mismatched:
            problems.append(f"{len(mismatched)} with the wrong shape: {few(mismatched, 8)}")
        raise VAEFormatError(
            f"{source} ({layout} names) does not match AutoencoderKLQwenImage(base_dim={cfg.base_dim}, "
            f"z_dim={cfg.z_dim}, dim_mult={list(cfg.dim_mult)}, num_res_blocks={cfg.num_res_blocks}): "
            + "; ".join(problems)
        )
    return mapping


# ---------------------------------------------------------------------------------------------- loading


def load_vae(
    path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = torch.bfloat16
) -> AutoencoderKLQwenImage:
    """Load the Qwen-Image VAE from ComfyUI's single file, a diffusers folder, or a diffusers-named file.

    `path`: `qwen_image_vae.safetensors` (ComfyUI), a diffusers `vae/` folder (config.json +
    diffusion_pytorch_model.safetensors[.index.json]), a repository root with such a `vae/` folder, or one
    safetensors file with diffusers' names. Single files use the shipped Qwen-Image config with the widths
    read off the file (as ComfyUI reads `dim` off `decoder.head.0.gamma`). `device` defaults to the CPU;
    `dtype` None keeps the stored dtype (bf16 in the real file; ComfyUI runs the VAE in bf16 where it can).
    Returns the model in eval mode without gradients.
    """
    path = Path(path)
    files, config = _locate(path)
    header = _read_header(files)
    shapes = {key: shape for key, (shape, _, _) in header.items()}
    layout = detect_layout(shapes, str(path))
    if config is None:
        config = _config_from_shapes(shapes, layout, str(path))
    model = build_vae(config)
    mapping = match_vae_keys(shapes, model, str(path))

    device = torch.device("cpu") if device is None else torch.device(device)
    state = {}
    for file in files:
        # Read on the CPU (memory-mapped) and copy once to the target: works for every device type.
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                tensor = handle.get_tensor(key)
                if not tensor.is_floating_point():
                    raise VAEFormatError(f"{path}: tensor {key} is {tensor.dtype}, expected floating point")
                state[mapping[key]] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"VAE tensors left unloaded on the meta device: {few(left, 8)}")
    model.requires_grad_(False)
    return model.eval()


def _locate(path: Path) -> tuple[list[Path], dict | None]:
    """The weight files and, for a diffusers folder, its config."""
    expected = (
        "expected ComfyUI's qwen_image_vae.safetensors, a diffusers VAE folder (config.json + "
        f"{DIFFUSERS_WEIGHTS}), or a diffusers repository with a vae/ folder"
    )
    if not path.exists():
        raise FileNotFoundError(f"VAE not found at {path}: {expected}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise VAEFormatError(f"{path} is not a .safetensors file: {expected}")
        return [path], None
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no VAE config.json in {path}: {expected}")
    config = json.loads(config_file.read_text())
    if config.get("_class_name", "AutoencoderKLQwenImage") != "AutoencoderKLQwenImage":
        raise VAEFormatError(
            f"{config_file} describes a {config['_class_name']}, expected AutoencoderKLQwenImage"
        )
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return [folder / DIFFUSERS_WEIGHTS], config
    if (folder / DIFFUSERS_INDEX).is_file():
        index = json.loads((folder / DIFFUSERS_INDEX).read_text())
        shards = [folder / name for name in sorted(set(index["weight_map"].values()))]
        absent = [str(s) for s in shards if not s.is_file()]
        if absent:
            raise FileNotFoundError(
                f"VAE shards listed in {folder / DIFFUSERS_INDEX} are missing: {few(absent, 8)}"
            )
        return shards, config
    raise FileNotFoundError(f"no {DIFFUSERS_WEIGHTS} (or its .index.json) in {folder}: {expected}")


def _read_header(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """{key: (shape, dtype, file)} from the safetensors headers, without reading any tensor data."""
    header = {}
    for file in files:
        try:
            entries = read_header(file).tensors
        except HeaderError as exc:
            raise VAEFormatError(f"{file} is not a readable safetensors file: {exc.cause}") from exc
        for key, entry in entries.items():
            if key in header:
                raise VAEFormatError(f"tensor {key} appears in both {header[key][2]} and {file}")
            header[key] = (entry.shape, entry.dtype, file)
    return header


def _config_from_shapes(shapes: Mapping[str, Sequence[int]], layout: str, source: str) -> dict:
    """Qwen-Image's config with base_dim and channels read off the file (so narrower test files load)."""
    config = vae_config()
    names = {
        "comfy": ("encoder.conv1.weight", "conv2.weight"),
        "diffusers": ("encoder.conv_in.weight", "post_quant_conv.weight"),
    }[layout]
    conv_in, post_quant = (shapes.get(name) for name in names)
    if conv_in is not None and len(conv_in) == 5:
        config["base_dim"] = int(conv_in[0])
        if int(conv_in[1]) != 3:
            config["input_channels"] = int(conv_in[1])
    if post_quant is not None and len(post_quant) == 5 and int(post_quant[0]) != config["z_dim"]:
        raise VAEFormatError(
            f"{source} has {post_quant[0]} latent channels; the Qwen-Image VAE has {config['z_dim']} "
            "(and its latent normalization is defined for those)"
        )
    return config


# ----------------------------------------------------------------------------------------- normalization


def latent_stats(vae: AutoencoderKLQwenImage | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) as float32 [C] from `vae.config` (default: the shipped Qwen-Image config)."""
    config = vae_config() if vae is None else vae.config
    mean = torch.tensor(config["latents_mean"], dtype=torch.float32)
    std = torch.tensor(config["latents_std"], dtype=torch.float32)
    return mean, std


def normalize_latents(latents: torch.Tensor, vae: AutoencoderKLQwenImage | None = None) -> torch.Tensor:
    """Raw VAE latents -> the model's latent space: (z - mean) / std per channel; [B,C,H,W] or [B,C,T,H,W].

    ComfyUI's Wan21.process_in is `(z - mean) * 1.0 / std`, diffusers' `(z - mean) / std`: bit-identical. The
    statistics are cast to the latents' dtype first, as both do.
    """
    mean, std = _broadcast_stats(latents, vae)
    return (latents - mean) / std


def denormalize_latents(latents: torch.Tensor, vae: AutoencoderKLQwenImage | None = None) -> torch.Tensor:
    """Inverse of `normalize_latents`: z * std + mean per channel.

    This is ComfyUI's Wan21.process_out. diffusers writes it `z / (1 / std) + mean`, which can differ by
    one rounding step; we follow ComfyUI.
    """
    mean, std = _broadcast_stats(latents, vae)
    return latents * std + mean


def _broadcast_stats(latents: torch.Tensor, vae) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = latent_stats(vae)
    if latents.ndim not in (4, 5) or latents.shape[1] != mean.numel():
        raise ValueError(
            f"latents must be [B,{mean.numel()},H,W] or [B,{mean.numel()},T,H,W], got {list(latents.shape)}"
        )
    view = (1, -1) + (1,) * (latents.ndim - 2)
    return (
        mean.view(view).to(latents.device, latents.dtype),
        std.view(view).to(latents.device, latents.dtype),
    )


# ------------------------------------------------------------------------------------------------ encode


def encode_images(
    vae: AutoencoderKLQwenImage, images: torch.Tensor | PIL.Image.Image | Sequence[PIL.Image.Image]
) -> torch.Tensor:
    """Images -> normalized latents [B, 16, H/8, W/8], float32 on the VAE's device.

    `images`: a float tensor [B,3,H,W] in [-1, 1], or PIL images of one size (converted like ComfyUI's
    LoadImage: RGB, alpha dropped, /255, then 2x-1). Sizes that are not multiples of 8 are centre-cropped
    to them, as ComfyUI's VAEEncode does (vae_encode_crop_pixels). The latent is the posterior *mean*, which
    is what ComfyUI's WanVAE.encode returns and what diffusers' Qwen pipelines use (sample_mode="argmax").
    Each image is encoded on its own (diffusers' batch); ComfyUI would treat a batch as video frames.
    """
    pixels = crop_to_multiple(_as_pixels(images), SPATIAL_FACTOR)
    x = pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)  # [B,3,1,H,W]
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mean  # first z_dim channels of quant_conv's output
    # ComfyUI hands latents on as float32 (VAE.encode ends in .float()).
    return normalize_latents(raw[:, :, 0].float(), vae)


def crop_to_multiple(pixels: torch.Tensor, multiple: int = SPATIAL_FACTOR) -> torch.Tensor:
    """Centre-crop [..., H, W] down to multiples of `multiple`, offset (size % multiple) // 2 like ComfyUI."""
    for dim in (-2, -1):
        size = pixels.shape[dim]
        keep = size // multiple * multiple
        if keep == 0:
            raise ValueError(f"image side {size} is smaller than {multiple} pixels")
        if keep != size:
            pixels = pixels.narrow(dim, (size % multiple) // 2, keep)
    return pixels


def _as_pixels(images) -> torch.Tensor:
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor [B,3,H,W] in [-1, 1], got {images.dtype} {list(images.shape)}"
            )
        low, high = torch.stack(torch.aminmax(images)).tolist()  # one read back from the GPU
        if low < -1.001 or high > 1.001:
            raise ValueError(
                f"images must be in [-1, 1] (got values in [{low:.3g}, {high:.3g}]); "
                "map [0, 1] images with x * 2 - 1"
            )
        return images.float()
    images = list(images)
    if not images or not all(isinstance(im, PIL.Image.Image) for im in images):
        raise TypeError("images must be a tensor [B,3,H,W] or PIL images")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(f"PIL images in one batch must share a size, got {sorted(sizes)}")
    # ComfyUI's LoadImage: convert("RGB") (alpha dropped, not composited), float32 / 255; then 2x - 1.
    arrays = [np.asarray(im.convert("RGB")).astype(np.float32) / 255.0 for im in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return pixels * 2.0 - 1.0


# ------------------------------------------------------------------------------------------------ decode


def decode_latents(
    vae: AutoencoderKLQwenImage,
    latents: torch.Tensor,
    tiled: bool | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = DEFAULT_TILE_OVERLAP,
) -> torch.Tensor:
    """Normalized latents [B,16,h,w] (or [B,16,1,h,w]) -> images [B,3,8h,8w], float32 in [-1, 1].

    `tiled`: decode in overlapping tiles of `tile_size` pixels overlapping by `overlap` pixels (both
    multiples of 8) and blend them linearly across the overlaps; None tiles above `AUTO_TILE_PIXELS` output
    pixels, or when a whole decode runs out of GPU memory (ComfyUI's fallback too). Tiling bounds memory
    but is not exact: the decoder's mid-block attention is global and its convolutions see past a tile's
    edge. Denormalization runs in float32 and the decode in the VAE's dtype, as ComfyUI does; map to [0, 1]
    with (x + 1) / 2.
    """
    if latents.ndim == 5:
        if latents.shape[2] != 1:
            raise ValueError(f"only single-frame latents [B,C,1,h,w] are images, got {list(latents.shape)}")
    elif latents.ndim == 4:
        latents = latents.unsqueeze(2)
    else:
        raise ValueError(f"latents must be [B,C,h,w] or [B,C,1,h,w], got {list(latents.shape)}")
    tiles = _tile_in_latents(tile_size, overlap)  # validate before any work
    raw = denormalize_latents(latents.float(), vae).to(device=vae.device, dtype=vae.dtype)
    height, width = raw.shape[-2:]
    auto = tiled is None
    if auto:
        tiled = height * width * SPATIAL_FACTOR**2 > AUTO_TILE_PIXELS
    with torch.no_grad(), _without_diffusers_tiling(vae):
        if tiled:
            return _decode_tiled(vae, raw, *tiles)[:, :, 0]
        try:
            return vae.decode(raw).sample.float()[:, :, 0]
        except torch.cuda.OutOfMemoryError:
            if not auto:
                raise
        # Like ComfyUI, fall back to tiles when a whole decode does not fit (outside the except block, so
        # the failed attempt's tensors are freed first).
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return _decode_tiled(vae, raw, *tiles)[:, :, 0]


def _tile_in_latents(tile_size: int, overlap: int) -> tuple[int, int]:
    if tile_size % SPATIAL_FACTOR or overlap % SPATIAL_FACTOR:
        raise ValueError(
            f"tile_size ({tile_size}) and overlap ({overlap}) must be multiples of {SPATIAL_FACTOR}"
        )
    if not 0 <= overlap < tile_size:
        raise ValueError(f"need 0 <= overlap < tile_size, got overlap={overlap}, tile_size={tile_size}")
    return tile_size // SPATIAL_FACTOR, overlap // SPATIAL_FACTOR


@contextlib.contextmanager
def _without_diffusers_tiling(vae) -> Iterator[None]:
    # Our tiles must be decoded whole: switch off diffusers' own tiling (enable_tiling) for the call.
    before = getattr(vae, "use_tiling", None)
    if before:
        vae.use_tiling = False
    try:
        yield
    finally:
        if before:
            vae.use_tiling = before


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, length): stride tile - overlap, the last tile flush with the end."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def _ramp(size: int, band: int, rise: bool, fall: bool) -> torch.Tensor:
    """Weights 1 inside a tile, rising/falling linearly over `band` pixels at edges shared with a neighbour.

    Over an overlap of exactly `band` pixels the two tiles' weights sum to 1 ((i+1)/(band+1) and
    (band-i)/(band+1)); wider overlaps (the end-aligned last tile) are normalized by the weight sum.
    """
    weight = torch.ones(size)
    if band > 0:
        ramp = torch.arange(1, band + 1, dtype=torch.float32) / (band + 1)
        if rise:
            weight[:band] = ramp
        if fall:
            weight[size - band :] = torch.minimum(weight[size - band :], ramp.flip(0))
    return weight


def _decode_tiled(vae, raw: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """Decode raw latents [B,C,1,h,w] tile by tile; returns float32 [B,3,1,8h,8w] on the VAE's device."""
    batch, _, _, height, width = raw.shape
    f = SPATIAL_FACTOR
    ys, xs = _tile_starts(height, tile, overlap), _tile_starts(width, tile, overlap)
    out = weights = None
    for y in ys:
        for x in xs:
            part = vae.decode(raw[..., y : y + tile, x : x + tile]).sample.float()
            th, tw = part.shape[-2:]
            wy = _ramp(th, overlap * f, rise=y > 0, fall=y + tile < height)
            wx = _ramp(tw, overlap * f, rise=x > 0, fall=x + tile < width)
            mask = (wy[:, None] * wx[None, :]).to(part.device)
            if out is None:
                out = part.new_zeros(batch, part.shape[1], 1, height * f, width * f)
                weights = part.new_zeros(height * f, width * f)
            out[..., y * f : y * f + th, x * f : x * f + tw] += part * mask
            weights[y * f : y * f + th, x * f : x * f + tw] += mask
    return out / weights


# ----------------------------------------------------------------------------------------------- compile

VAE_COMPILED_SIZES = 4  # per stage (encoder, decoder): static graphs kept, one per input shape


class CompileRepeatedShapes:
    """Run `forward` eagerly at an input shape seen once, and through a static-shape torch.compile from
    that shape's second call on, for at most `max_shapes` shapes (then eagerly again).

    Why this policy (benchmarks/RESULTS.md, issue 14; H200, 1024x1024): compiled with static shapes and
    channels-last weights the encoder took 29.9 ms instead of 44.7 and the decoder 40.8 instead of 69.7,
    but each new shape compiles for ~13 s per stage (less with inductor's on-disk cache); a dynamic-shape
    graph ran slower than eager. Reference sizes follow the input's aspect ratio, so a one-off size stays
    eager, a size that comes back pays its compilation once, and the number of graphs is bounded.
    `compile`: the compiler (torch.compile; tests pass a recording stand-in).
    """

    MAX_SEEN = 256

    def __init__(self, forward, max_shapes: int = VAE_COMPILED_SIZES, compile=None) -> None:
        self.forward = forward
        self.max_shapes = max_shapes
        self.compile = compile or (lambda fn: torch.compile(fn, dynamic=False))
        self.seen: dict[tuple, int] = {}  # shapes seen once; emptied when full (MAX_SEEN) or no longer needed
        self.compiled: dict[tuple, object] = {}

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        key = (tuple(x.shape), x.dtype, x.device)
        fn = self.compiled.get(key)
        if fn is None and len(self.compiled) < self.max_shapes:
            if key not in self.seen and len(self.seen) >= self.MAX_SEEN:  # a stream of one-off sizes
                self.seen.clear()
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] >= 2:
                fn = self.compiled[key] = self.compile(self.forward)
                if len(self.compiled) == self.max_shapes:
                    self.seen.clear()
        return (fn or self.forward)(x, *args, **kwargs)


def use_channels_last(vae: AutoencoderKLQwenImage) -> None:
    """5D (Conv3d) weights to channels-last-3d, 4D (Conv2d, the decoder's attention) to channels-last;
    each convolution's output then follows its weight's layout."""
    for module in vae.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and weight.dim() in (4, 5):
            layout = torch.channels_last_3d if weight.dim() == 5 else torch.channels_last
            module.weight.data = weight.data.contiguous(memory_format=layout)


def compile_vae(vae: AutoencoderKLQwenImage, max_shapes: int = VAE_COMPILED_SIZES, compile=None) -> None:
    """Channels-last convolution weights, and the encoder and decoder compiled per repeated input shape
    (`CompileRepeatedShapes`). Same numbers as eager up to kernel rounding (~1% relative on random
    weights); channels-last alone, eager, gained nothing."""
    use_channels_last(vae)
    for part in (vae.encoder, vae.decoder):
        part.forward = CompileRepeatedShapes(part.forward, max_shapes, compile)
