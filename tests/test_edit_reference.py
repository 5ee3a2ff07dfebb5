"""The whole edit against a reference this test wires itself, on the tiny demo model on the CPU.

The reference follows the ComfyUI graph node by node (nunchaku-tech/ComfyUI-nunchaku@dbfd194,
example_workflows/nunchaku-qwen-image-edit-2509.json; node semantics from Comfy-Org/ComfyUI@a125cd8):

    LoadImage x3 -> ImageScaleToTotalPixels(image1, lanczos)
    TextEncodeQwenImageEditPlus(prompt, scaled image1, image2, image3, vae)          positive
    TextEncodeQwenImageEditPlus(negative prompt, the same images, vae)              negative
    VAEEncode(scaled image1) (or EmptySD3LatentImage with an explicit size)
    ModelSamplingAuraFlow(shift) -> CFGNorm(1) -> KSampler(euler, simple, seed, cfg, denoise)
    VAEDecode -> SaveImage

It calls the library's *stage* functions (prompt encoding, VAE encode/decode, the sigma schedule, the DiT
forward) but none of pipeline.py's wiring: the images each node sees, the noise, the start state, the model
function with its cond/uncond passes, CFG on x0, CFGNorm, the Euler steps and the 8-bit conversion are all
written out here. `QwenEditPipeline.edit` must agree with it exactly.

Why exactly: both sides run the same CPU kernels on the same tensors in the same order (the reference
repeats ComfyUI's expressions, which the library also follows operation by operation), and CPU kernels
are deterministic for a given shape and thread count. So any difference is a wiring difference, however
small; a tolerance would only blur that. The comparison covers every step's x0 (the `callback` latent,
after CFG and CFGNorm) and the final 8-bit images.

tests/mutate_pipeline.py applies one-line wiring mutants to pipeline.py and checks that this file fails
for each of them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_edit import QwenEditPipeline, conditioning
from qwen_edit.model import comfy_forward
from qwen_edit.sampling import FlowModelSampling, get_sigmas
from qwen_edit.tokenizer import encode_edit_prompt
from qwen_edit.vae import decode_latents, encode_images


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(demo_dir):
    return QwenEditPipeline.demo(cache_dir=demo_dir)  # the session's demo files (conftest)


@torch.no_grad()
def reference_edit(
    pipe: QwenEditPipeline,
    images: list[Image.Image],
    prompt: str,
    *,
    negative_prompt: str,
    seed: int,
    steps: int,
    cfg: float,
    denoise: float,
    shift: float = 3.0,
    width: int | None = None,
    height: int | None = None,
    batch_size: int = 1,
) -> tuple[list[torch.Tensor], np.ndarray]:
    """(x0 of every step, uint8 images [B, H, W, 3]) of the ComfyUI graph above."""
    te, vae, dit = pipe.text_encoder, pipe.vae, pipe.transformer
    # LoadImage (EXIF, RGB), then ImageScaleToTotalPixels on image1 only (the demo's budget stands for the
    # workflow's 1 megapixel): PIL Lanczos on the 8-bit pixels (comfy/utils.py:854-859).
    loaded = [conditioning.open_image(im) for im in images]
    w1, h1 = conditioning.megapixel_size(*loaded[0].size, pipe.output_megapixels)
    image1 = loaded[0].resize((w1, h1), Image.Resampling.LANCZOS)
    node_images = [image1, *loaded[1:]]

    def text_encode(text: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """TextEncodeQwenImageEditPlus: hidden states, and the reference latents it attaches to this
        conditioning (comfy_extras/nodes_qwen.py:77-104), "area"-resized to the reference budget."""
        hidden = encode_edit_prompt(te, pipe.tokenizer, text, node_images)
        refs = []
        for im in node_images:
            scale = math.sqrt(pipe.reference_area / (im.width * im.height))
            w, h = round(im.width * scale / 8) * 8, round(im.height * scale / 8) * 8
            pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
            pixels = torch.nn.functional.interpolate(pixels, size=(h, w), mode="area")
            # encode_images normalizes, as QwenImage.extra_conds does with process_latent_in
            refs.append(encode_images(vae, pixels * 2 - 1).unsqueeze(2))
        return hidden, refs

    positive = text_encode(prompt)
    negative = text_encode(negative_prompt)

    # The KSampler latent: VAEEncode of the scaled image1 (its crop to multiples of 8 happens inside), or
    # with an explicit size image1 resized to exactly it for img2img / EmptySD3LatentImage for pure noise.
    if width is None:
        pixels = torch.from_numpy(np.asarray(image1, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        latent = encode_images(vae, pixels * 2 - 1)
    elif denoise < 1:
        resized = loaded[0].resize((width, height), Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        latent = encode_images(vae, pixels * 2 - 1)
    else:
        latent = torch.zeros(1, 16, height // 8, width // 8)
    latent = latent.unsqueeze(2).expand(batch_size, -1, -1, -1, -1)  # [B, 16, 1, h, w]

    # prepare_noise (comfy/sample.py:8-25): one float32 draw of the whole batch from the seeded CPU generator.
    noise = torch.randn(latent.shape, dtype=torch.float32, generator=torch.Generator("cpu").manual_seed(seed))
    sigmas = get_sigmas(FlowModelSampling(shift=shift), "simple", steps, denoise)
    # CONST.noise_scaling (comfy/model_sampling.py:70-72); the latent is already process_latent_in'd.
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * latent

    def x0(x: torch.Tensor, sigma: torch.Tensor, conds: tuple) -> torch.Tensor:
        """One DiT pass for one conditioning: its own context and reference latents, x0 = x - v * sigma."""
        hidden, refs = conds
        velocity = comfy_forward(dit, x, sigma, hidden.expand(x.shape[0], -1, -1), refs)
        return x - velocity.float() * sigma.reshape(-1, 1, 1, 1, 1)

    steps_x0 = []
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i] * torch.ones(x.shape[0])
        cond = x0(x, sigma, positive)
        # sampling_function (comfy/samplers.py:377-395): no negative pass at cfg 1; its slot holds zeros.
        uncond = torch.zeros_like(cond) if math.isclose(cfg, 1.0) else x0(x, sigma, negative)
        denoised = uncond + (cond - uncond) * cfg  # cfg_function (:360-374), on x0
        # CFGNorm(strength=1) (comfy_extras/nodes_cfg.py:51-78): per latent pixel, over the 16 channels.
        norm_cond = torch.norm(cond, dim=1, keepdim=True)
        norm_pred = torch.norm(denoised, dim=1, keepdim=True)
        denoised = denoised * (norm_cond / (norm_pred + 1e-8)).clamp(min=0.0, max=1.0) * 1.0
        steps_x0.append(denoised)
        # euler (comfy/k_diffusion/sampling.py:184-206), s_churn 0
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    # VAEDecode (process_latent_out, decode, clamp((x + 1) / 2)), SaveImage's truncating 8-bit conversion.
    pixels = ((decode_latents(vae, x).float() + 1.0) / 2.0).clamp(0.0, 1.0)
    out = np.clip(255.0 * pixels.permute(0, 2, 3, 1).numpy(), 0, 255).astype(np.uint8)
    return steps_x0, out


CASES = {
    # cfg 1: the negative pass skipped; no explicit size: the VAEEncode latent of the scaled image1
    "1 image, cfg 1": dict(
        images=[(200, 150)], prompt="make it blue", negative_prompt="ignored", seed=7, steps=3, cfg=1.0,
        denoise=1.0,
    ),
    # img2img from the scaled image1, CFG with a negative prompt and CFGNorm, two references
    "2 images, cfg 3.5, denoise 0.6": dict(
        images=[(180, 120), (96, 144)], prompt="swap the two", negative_prompt="blurry, low quality", seed=11,
        steps=4, cfg=3.5, denoise=0.6,
    ),
    # three references, the workflow's empty negative prompt, an explicit size and a batch of two
    "3 images, cfg 2.5, explicit size, batch 2": dict(
        images=[(160, 160), (120, 90), (72, 128)], prompt="put them together", negative_prompt="", seed=3,
        steps=3, cfg=2.5, denoise=0.75, width=64, height=48, batch_size=2,
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_edit_equals_the_reference_wired_from_the_stages(pipe, case):
    kwargs = dict(CASES[case])
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(kwargs.pop("images"))]
    seen: list[torch.Tensor] = []
    result = pipe.edit(images, callback=lambda step, total, x0: seen.append(x0.clone()), **kwargs)
    expected_x0, expected_images = reference_edit(pipe, images, **kwargs)

    assert len(seen) == len(expected_x0) == kwargs["steps"]
    for step, (got, want) in enumerate(zip(seen, expected_x0, strict=True)):
        assert torch.equal(got, want), f"step {step + 1}: x0 differs, max {(got - want).abs().max():.3g}"
    got_images = np.stack([np.asarray(im) for im in result.images])
    assert got_images.shape == expected_images.shape
    assert np.array_equal(got_images, expected_images), "8-bit images differ"
