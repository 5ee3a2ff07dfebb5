"""QwenEditPipeline: the whole edit, as the ComfyUI Qwen-Image-Edit-2509 workflow computes it.

The pipeline only orchestrates. Each stage lives in its own module:
    text conditioning   tokenizer.encode_edit_prompt   (TextEncodeQwenImageEditPlus)
    images in and out   conditioning                   (LoadImage, reference resize, SaveImage)
    latents             vae.encode_images / decode_latents
    the DiT call        model.comfy_forward            (ComfyUI's RoPE positions and timestep)
    sampling            sampling.sample                (ModelSamplingAuraFlow -> CFGNorm -> KSampler)
    LoRAs               lora.apply_loras
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from . import conditioning
from .hardware import default_device
from .lora import LoraReport, apply_loras
from .model import comfy_forward
from .params import MAX_IMAGES, EditParams, ParameterError
from .sampling import SamplingCancelled, needs_uncond, sample, x0_from_flow

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "model")
ProgressCallback = Callable[[int, int, "torch.Tensor | None"], None]

__all__ = ["EditResult", "QwenEditPipeline", "SamplingCancelled"]


@dataclass
class EditResult:
    """The images of one `edit` call, with what produced them and how long each stage took."""

    images: list[Image.Image]
    seed: int
    parameters: dict
    timings: dict = field(
        default_factory=dict
    )  # seconds: text_encode, vae_encode, steps [..], vae_decode, total

    def png_bytes(self, index: int = 0) -> bytes:
        """Image `index` as PNG, the generation parameters embedded as JSON (text chunk `parameters`)."""
        return conditioning.png_bytes(self.images[index], {**self.parameters, "batch_index": index})

    def save(self, path: str | Path) -> list[Path]:
        """Write PNGs: `path` itself for one image, `stem_0.png`, `stem_1.png`, ... for several."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if len(self.images) == 1:
            targets = [path]
        else:
            targets = [
                path.with_name(f"{path.stem}_{i}{path.suffix or '.png'}") for i in range(len(self.images))
            ]
        for i, target in enumerate(targets):
            target.write_bytes(self.png_bytes(i))
        return targets


class QwenEditPipeline:
    """Transformer + text encoder + tokenizer + VAE, and `edit()`.

    Build it with `from_files`, `from_config` or `demo`. `offload="model"` keeps the text encoder and
    the VAE in CPU memory and brings each to the GPU only for its stage.
    """

    def __init__(self, transformer, text_encoder, tokenizer, vae, *, device=None, offload: str = "none"):
        if offload not in OFFLOAD_MODES:
            raise ParameterError("offload", f"must be one of {OFFLOAD_MODES}, got {offload!r}")
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.device = torch.device(device) if device is not None else default_device()
        self.offload = offload
        self.loras: list[tuple[str, float]] = []
        # The workflow's image budgets: references at ~1024x1024, the default output at 1 megapixel.
        # Only the demo changes them (a CPU can't run a tiny model at 1 MP "in seconds").
        self.reference_area = conditioning.REFERENCE_AREA
        self.output_megapixels = conditioning.OUTPUT_MEGAPIXELS
        resident = self.device if offload == "none" else torch.device("cpu")
        for module in (text_encoder, vae):
            module.to(resident)

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_files(
        cls,
        *,
        transformer: str | Path,
        text_encoder: str | Path,
        vae: str | Path,
        tokenizer: str | Path | None = None,
        loras: Sequence[tuple[str | Path, float]] = (),
        device: torch.device | str | None = None,
        backend: str = "auto",
        compute: str = "auto",
        offload: str = "none",
        text_encoder_config: dict | str | Path | None = None,
    ) -> QwenEditPipeline:
        """Load the four files the ComfyUI workflow uses (plus the tokenizer folder) and any LoRAs.

        `tokenizer`: a folder with vocab.json, merges.txt and tokenizer_config.json (ComfyUI's bundled
        qwen25_tokenizer/) or the Hugging Face repo's tokenizer/ folder; None looks beside the text
        encoder file (`qwen25_tokenizer/`, `tokenizer/`) and in the Hugging Face cache.
        `text_encoder_config`: only for encoders that are not the 7B one (the demo's tiny model).
        """
        from .text_encoder import load_text_encoder
        from .tokenizer import load_tokenizer
        from .transformer import load_transformer
        from .vae import load_vae

        device = torch.device(device) if device is not None else default_device()
        tokenizer_path = tokenizer if tokenizer is not None else find_tokenizer(Path(text_encoder))
        staging = device if offload == "none" else torch.device("cpu")
        pipe = cls(
            load_transformer(transformer, backend=backend, compute=compute, device=device),
            load_text_encoder(text_encoder, device=staging, config=text_encoder_config),
            load_tokenizer(tokenizer_path),
            load_vae(vae, device=staging),
            device=device,
            offload=offload,
        )
        if loras:
            pipe.set_loras(loras)
        return pipe

    @classmethod
    def from_config(cls, config: str | Path | Mapping, **overrides) -> QwenEditPipeline:
        """Build from a YAML file or dict: model folders (ComfyUI's extra_model_paths.yaml keys) and names.

        See `configs/` for examples; `settings.load_settings` documents the keys. `overrides` replace
        keyword arguments of `from_files` (device, backend, compute, offload, loras).
        """
        from .settings import load_settings

        settings = load_settings(config)
        kwargs = {**settings.pipeline_kwargs(), **overrides}
        return cls.from_files(**kwargs)

    @classmethod
    def demo(
        cls, cache_dir: str | Path | None = None, device: torch.device | str | None = "cpu"
    ) -> QwenEditPipeline:
        """A tiny random-weight pipeline in the real file formats (written once into a cache folder).

        Runs the whole path on a CPU in seconds; the images are noise, the code path is the real one.
        """
        from .demo import DEMO_OUTPUT_MEGAPIXELS, DEMO_REFERENCE_AREA, demo_files

        files = demo_files(cache_dir)
        pipe = cls.from_files(**files, device=device, backend="portable", compute="bf16")
        pipe.reference_area, pipe.output_megapixels = DEMO_REFERENCE_AREA, DEMO_OUTPUT_MEGAPIXELS
        return pipe

    # -- LoRAs -----------------------------------------------------------------------------------

    def set_loras(self, loras: Sequence[tuple[str | Path, float]]) -> LoraReport:
        """Use exactly these LoRAs [(path, strength), ...] from now on; [] removes all. No reload."""
        loras = [(str(p), float(s)) for p, s in loras]
        report = apply_loras(self.transformer, loras)
        self.loras = loras
        log.info("LoRAs set in %.3fs: %s", report.seconds, report.applied)
        return report

    # -- the edit --------------------------------------------------------------------------------

    @torch.no_grad()
    def edit(
        self,
        images: Sequence[Image.Image | str | Path | bytes] | Image.Image,
        prompt: str,
        *,
        negative_prompt: str = "",
        seed: int = 0,
        steps: int = 4,
        cfg: float = 1.0,
        sampler_name: str = "euler",
        scheduler: str = "simple",
        denoise: float = 1.0,
        shift: float = 3.0,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        callback: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> EditResult:
        """Edit 1-3 images following `prompt`; returns `batch_size` images.

        Output size: `width` x `height` (multiples of 16) if given, else image 1 at about one megapixel.
        `callback(step, total, x0_latent)` runs after each step; `cancel()` is polled between steps
        and stops the edit with `SamplingCancelled`.
        """
        params = EditParams(
            prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps, cfg=cfg,
            sampler_name=sampler_name, scheduler=scheduler, denoise=denoise, shift=shift,
            width=width, height=height, batch_size=batch_size,
        )  # fmt: skip
        pictures = _open_images(images)
        timings: dict = {}
        start = time.perf_counter()

        with self._stage("text_encode", timings, self.text_encoder):
            cond = self._encode(params.prompt, pictures)
            uncond = self._encode(params.negative_prompt, pictures) if needs_uncond(params.cfg) else None

        with self._stage("vae_encode", timings, self.vae):
            from .vae import encode_images

            refs = [
                encode_images(self.vae, conditioning.reference_pixels(p, self.reference_area)).unsqueeze(2)
                for p in pictures
            ]
            out_pixels = conditioning.output_pixels(
                pictures[0], params.width, params.height, self.output_megapixels
            )
            b, h, w = params.batch_size, out_pixels.shape[-2] // 8, out_pixels.shape[-1] // 8
            if params.denoise < 1.0:  # img2img from image 1, as the workflow's VAEEncode latent
                latent = encode_images(self.vae, out_pixels).unsqueeze(2).cpu().expand(b, -1, -1, -1, -1)
            else:  # only the shape matters: sampling starts from pure noise
                latent = torch.zeros(b, 16, 1, h, w)
            refs = [r.to(self.device) for r in refs]

        steps_s: list[float] = []
        tick = [time.perf_counter()]

        def model_fn(x: torch.Tensor, sigma: torch.Tensor, use_uncond: bool) -> torch.Tensor:
            context = (uncond if use_uncond else cond).expand(x.shape[0], -1, -1)
            velocity = comfy_forward(self.transformer, x, sigma, context, refs)
            return x0_from_flow(x, sigma, velocity)

        def on_step(i: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
            _sync(self.device)
            now = time.perf_counter()
            steps_s.append(now - tick[0])
            tick[0] = now
            if callback is not None:
                callback(i + 1, total, denoised)

        samples = sample(
            model_fn, latent, seed=params.seed, steps=params.steps, cfg=params.cfg,
            sampler_name=params.sampler_name, scheduler=params.scheduler, denoise=params.denoise,
            shift=params.shift, device=self.device, callback=on_step, cancel=cancel,
        )  # fmt: skip
        timings["steps"] = steps_s

        with self._stage("vae_decode", timings, self.vae):
            from .vae import decode_latents

            pixels = decode_latents(self.vae, samples)
        images_out = [Image.fromarray(a) for a in conditioning.to_uint8(pixels)]
        timings["total"] = time.perf_counter() - start
        parameters = {**params.to_dict(), "loras": self.loras, "size": list(images_out[0].size)}
        return EditResult(images_out, params.seed, parameters, timings)

    def _encode(self, prompt: str, pictures: list[Image.Image]) -> torch.Tensor:
        from .tokenizer import encode_edit_prompt

        return encode_edit_prompt(self.text_encoder, self.tokenizer, prompt, pictures).to(self.device)

    @contextmanager
    def _stage(self, name: str, timings: dict, module: torch.nn.Module):
        """Time a stage; with offload="model", bring its module to the GPU for it and back after."""
        if self.offload == "model":
            module.to(self.device)
        _sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            timings[name] = time.perf_counter() - start
            if self.offload == "model":
                module.to("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _open_images(images) -> list[Image.Image]:
    if isinstance(images, (Image.Image, str, Path, bytes)):
        images = [images]
    images = list(images)
    if not 1 <= len(images) <= MAX_IMAGES:
        raise ParameterError("images", f"give 1 to {MAX_IMAGES} images, got {len(images)}")
    opened = []
    for i, image in enumerate(images):
        try:
            opened.append(conditioning.open_image(image))
        except (OSError, TypeError, ValueError) as exc:
            raise ParameterError(f"images[{i}]", f"cannot be read as an image ({exc})") from exc
    return opened


def find_tokenizer(text_encoder: Path) -> Path:
    """The tokenizer folder for a text encoder file: beside it, or in the Hugging Face cache."""
    base = text_encoder if text_encoder.is_dir() else text_encoder.parent
    for candidate in (base / "qwen25_tokenizer", base / "tokenizer", base.parent / "tokenizer", base):
        if (candidate / "vocab.json").is_file() and (candidate / "merges.txt").is_file():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(
            snapshot_download(
                "Qwen/Qwen-Image-Edit-2509", allow_patterns=["tokenizer/*"], local_files_only=True
            )
        )
        if (snapshot / "tokenizer" / "vocab.json").is_file():
            return snapshot / "tokenizer"
    except Exception:  # not cached (or no hub access): fall through to the error below
        pass
    raise FileNotFoundError(
        f"no Qwen2.5 tokenizer found beside {text_encoder} (looked for qwen25_tokenizer/ and tokenizer/ "
        "holding vocab.json and merges.txt) nor in the Hugging Face cache. Pass tokenizer=<folder>, or run "
        "`qwen-edit download`, which fetches Qwen/Qwen-Image-Edit-2509's tokenizer/ folder."
    )
