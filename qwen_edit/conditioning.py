"""Images in and out, as the ComfyUI workflow handles them.

In: LoadImage (EXIF rotation, RGB, float in [0, 1]); TextEncodeQwenImageEditPlus's reference image
(an "area" resize to about 1024x1024, sides multiples of 8); ImageScaleToTotalPixels (Lanczos to a
pixel budget) and VAEEncode's centre crop for the output latent. Out: VAEDecode's clamp and SaveImage's
8-bit conversion (truncation, not rounding), PNG with the generation parameters in a text chunk.
Sources, Comfy-Org/ComfyUI@a125cd8: comfy_extras/nodes_qwen.py:51-104, comfy_extras/nodes_post_processing.py:
211-241, nodes.py:1593-1594 and 1630-1690, comfy/sd.py:598-610 (VAEEncode's crop).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, PngImagePlugin

REFERENCE_AREA = 1024 * 1024  # nodes_qwen.py: the VAE reference image's pixel budget
OUTPUT_MEGAPIXELS = 1.0  # the workflow's ImageScaleToTotalPixels(image1, "lanczos", 1.0)
LATENT_MULTIPLE = 8
# The longest side of an automatic output size: the cap an explicit width/height has (params.MAX_SIDE),
# so a very wide or tall picture 1 doesn't become a 16000-pixel-wide output at one megapixel.
MAX_OUTPUT_SIDE = 4096
# File suffix -> PIL format of an output picture. Only PNG carries the parameters (a text chunk).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def open_image(image: Image.Image | str | Path | bytes) -> Image.Image:
    """LoadImage: EXIF orientation applied, alpha dropped (not composited), RGB."""
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    elif isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    if not isinstance(image, Image.Image):
        raise TypeError(f"images must be PIL images, paths or bytes, got {type(image).__name__}")
    image.load()
    return ImageOps.exif_transpose(image).convert("RGB")


def to_tensor(image: Image.Image, device: torch.device | str | None = None) -> torch.Tensor:
    """[H, W, 3] float32 in [0, 1] on `device` (the 8-bit pixels travel, the division happens there)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).to(device)  # a copy: writable
    return pixels.float() / 255.0


def area_resize(pixels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's common_upscale(..., "area"): adaptive average pooling on float pixels [H, W, 3]."""
    return F.interpolate(pixels.permute(2, 0, 1)[None], size=(height, width), mode="area")[0].permute(1, 2, 0)


def reference_size(width: int, height: int, area: int = REFERENCE_AREA) -> tuple[int, int]:
    """The VAE reference image's size: about `area` (1024x1024) pixels, sides rounded to multiples of 8."""
    scale = math.sqrt(area / (width * height))
    w = round(width * scale / LATENT_MULTIPLE) * LATENT_MULTIPLE
    h = round(height * scale / LATENT_MULTIPLE) * LATENT_MULTIPLE
    return max(w, LATENT_MULTIPLE), max(h, LATENT_MULTIPLE)


def reference_pixels(
    image: Image.Image, area: int = REFERENCE_AREA, device: torch.device | str | None = None
) -> torch.Tensor:
    """The reference image for the VAE: [1, 3, h, w] in [-1, 1], made on `device` (default CPU)."""
    w, h = reference_size(*image.size, area)
    pixels = area_resize(to_tensor(image, device), w, h)
    return pixels.permute(2, 0, 1)[None] * 2 - 1


def megapixel_size(width: int, height: int, megapixels: float = OUTPUT_MEGAPIXELS) -> tuple[int, int]:
    """ImageScaleToTotalPixels' target size: the aspect ratio kept, `megapixels` * 1024^2 pixels."""
    scale = math.sqrt(megapixels * 1024 * 1024 / (width * height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def scale_to_megapixels(image: Image.Image, megapixels: float = OUTPUT_MEGAPIXELS) -> Image.Image:
    """ImageScaleToTotalPixels: Lanczos (PIL, on 8-bit data) to `megapixels` * 1024^2 pixels."""
    return image.resize(megapixel_size(*image.size, megapixels), Image.Resampling.LANCZOS)


def capped_size(width: int, height: int, max_side: int = MAX_OUTPUT_SIDE) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, so that neither side exceeds `max_side`."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(LATENT_MULTIPLE, round(width * scale)), max(LATENT_MULTIPLE, round(height * scale))


def output_size(
    image: Image.Image, width: int | None, height: int | None, megapixels: float = OUTPUT_MEGAPIXELS
) -> tuple[int, int]:
    """(width, height) of `output_pixels` without resampling anything: all a pure-noise edit needs."""
    if width is None or height is None:
        width, height = capped_size(*megapixel_size(*image.size, megapixels))
    return width // LATENT_MULTIPLE * LATENT_MULTIPLE, height // LATENT_MULTIPLE * LATENT_MULTIPLE


def output_pixels(
    image: Image.Image, width: int | None, height: int | None, megapixels: float = OUTPUT_MEGAPIXELS
) -> torch.Tensor:
    """The image VAEEncode turns into the output latent: [1, 3, H, W] in [-1, 1], sides multiples of 8.

    Without an explicit size it is image1 at one megapixel (the workflow's ImageScaleToTotalPixels),
    no side over MAX_OUTPUT_SIDE, centre-cropped to multiples of 8 as VAEEncode does; with one, image1
    resized to exactly that size.
    """
    if width is None or height is None:
        size = megapixel_size(*image.size, megapixels)
        capped = capped_size(*size)
        resized = image.resize(capped, Image.Resampling.LANCZOS)
    else:
        resized = image.resize((width, height), Image.Resampling.LANCZOS)
    pixels = to_tensor(resized).permute(2, 0, 1)[None] * 2 - 1
    h, w = pixels.shape[-2:]
    top, left = (h % LATENT_MULTIPLE) // 2, (w % LATENT_MULTIPLE) // 2
    return pixels[..., top : top + h // 8 * 8, left : left + w // 8 * 8]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images [B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, as VAEDecode + SaveImage do.

    VAEDecode clamps (x + 1) / 2 to [0, 1]; SaveImage then truncates 255 * x (it does not round).
    """
    x = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    # On the images' device, so 1 byte per value crosses to the host instead of 4; float -> uint8
    # truncates toward zero like numpy's astype.
    return (255.0 * x).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(image: Image.Image, parameters: dict) -> bytes:
    """PNG with the generation parameters as JSON in a `parameters` text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


def encode_image(image: Image.Image, format: str = "PNG", metadata: dict | None = None) -> bytes:
    """`image` as PNG (with `metadata` as `png_bytes` embeds it), JPEG or WebP (no metadata; quality 95)."""
    format = format.upper()
    if format == "PNG":
        return png_bytes(image, metadata or {})
    if format not in ("JPEG", "WEBP"):
        raise ValueError(f"unsupported image format {format!r}; one of PNG, JPEG, WEBP")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=format, quality=95)
    return buffer.getvalue()


def read_png_parameters(data: bytes) -> dict:
    """The parameters `png_bytes` embedded, or {} if there are none."""
    with Image.open(io.BytesIO(data)) as image:
        text = image.text.get("parameters") if hasattr(image, "text") else None
    return json.loads(text) if text else {}
