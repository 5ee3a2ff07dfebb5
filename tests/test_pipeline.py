"""QwenEditPipeline end to end on the tiny demo model (real file formats, CPU)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from qwen_edit import QwenEditPipeline, conditioning
from qwen_edit.errors import EditCancelled
from qwen_edit.params import MAX_PROMPT, ParameterError
from qwen_edit.sampling import SamplingCancelled


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(demo_dir):
    return QwenEditPipeline.demo(cache_dir=demo_dir)


def test_output_megapixels_sets_the_default_size(pipe):
    image = picture(320, 240)
    result = pipe.edit(image, "p", steps=1, output_megapixels=image.width * image.height / 2**20)
    assert result.images[0].size == (320, 240)  # the picture's own size: scaled by exactly 1


def test_one_image_default_size_and_timings(pipe):
    result = pipe.edit(picture(320, 240), "make it blue", seed=3)
    # Default output: image 1 at the pipeline's megapixel budget, sides multiples of 8.
    w, h = conditioning.scale_to_megapixels(picture(320, 240), pipe.output_megapixels).size
    assert result.images[0].size == (w // 8 * 8, h // 8 * 8)
    assert set(result.timings) == {"text_encode", "vae_encode", "steps", "vae_decode", "total"}
    assert len(result.timings["steps"]) == 4 and all(t > 0 for t in result.timings["steps"])
    assert result.seed == 3 and result.parameters["sampler_name"] == "euler"


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_one_to_three_images_with_cfg_and_negative(pipe, n_images):
    images = [picture(160 + 32 * i, 128, seed=i) for i in range(n_images)]
    result = pipe.edit(images, "swap them", negative_prompt="blurry", cfg=2.5, seed=1, width=96, height=64)
    assert [im.size for im in result.images] == [(96, 64)]


def test_batch_denoise_and_explicit_size(pipe):
    result = pipe.edit([picture(200, 150)], "x", seed=5, batch_size=2, denoise=0.6, width=64, height=48)
    assert [im.size for im in result.images] == [(64, 48), (64, 48)]
    assert len(result.timings["steps"]) == 4  # 4 of int(4 / 0.6) = 6 steps are run
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))  # per-image noise


def test_same_seed_same_images_other_seed_different(pipe):
    image = picture(128, 96)
    a = pipe.edit([image], "p", seed=11, width=64, height=64)
    b = pipe.edit([image], "p", seed=11, width=64, height=64)
    c = pipe.edit([image], "p", seed=12, width=64, height=64)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))


def test_negative_prompt_is_only_encoded_when_cfg_is_not_one(pipe, monkeypatch):
    prompts = []
    original = pipe._encode
    monkeypatch.setattr(
        pipe,
        "_encode",
        lambda prompt, pictures, check: prompts.append(prompt) or original(prompt, pictures, check),
    )
    pipe.edit([picture(64, 64)], "pos", negative_prompt="neg", cfg=1.0, width=32, height=32)
    assert prompts == ["pos"]
    prompts.clear()
    pipe.edit([picture(64, 64)], "pos", negative_prompt="neg", cfg=3.0, width=32, height=32)
    assert prompts == ["pos", "neg"]


def test_progress_callback_and_cancel(pipe):
    seen = []
    pipe.edit(
        [picture(64, 64)],
        "p",
        steps=3,
        width=32,
        height=32,
        callback=lambda step, total, preview: seen.append((step, total, tuple(preview.shape))),
    )
    assert [(s, t) for s, t, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert seen[0][2] == (1, 16, 1, 4, 4)
    calls = []
    with pytest.raises(SamplingCancelled):
        pipe.edit(
            [picture(64, 64)],
            "p",
            steps=4,
            width=32,
            height=32,
            cancel=lambda: len(calls) >= 2,
            callback=lambda *a: calls.append(a),
        )
    assert len(calls) == 2  # stopped before the third step


def test_cancel_is_checked_before_every_stage_and_between_their_pieces(pipe):
    """cancel() stops an edit in text encoding (before it, between the prompts and the encoder's layers),
    VAE encoding (between the references), sampling and decoding, naming the stage: a deadline covers
    them all, not only the steps."""

    def edit(cancel):
        pipe.edit([picture(64, 64), picture(48, 48)], "p", negative_prompt="n", cfg=2.0, steps=2,
                  width=32, height=32, cancel=cancel)  # fmt: skip

    checks = []
    edit(lambda: checks.append(1) and False)
    stages = []
    for n in range(len(checks)):  # stop at the n-th check, for each n
        calls = []
        with pytest.raises(EditCancelled) as info:
            edit(lambda calls=calls, n=n: calls.append(1) or len(calls) > n)
        stages.append(info.value.stage)
    order = ["text_encode", "vae_encode", "sampling", "vae_decode"]
    assert sorted(set(stages), key=order.index) == order and stages == sorted(stages, key=order.index)
    layers = len(pipe.text_encoder.language_model.layers)
    assert stages.count("text_encode") > 2 * layers  # before the stage, the prompts and every layer
    assert stages.count("vae_encode") == 2 and stages.count("sampling") == 2  # per reference, per step
    assert stages[-1] == "vae_decode"


def test_prompts_are_capped_and_must_be_unicode_text(pipe):
    for kwargs in ({"prompt": "x" * (MAX_PROMPT + 1)}, {"prompt": "p", "negative_prompt": "\ud800"}):
        with pytest.raises(ParameterError) as info:
            pipe.edit([picture(64, 64)], **kwargs)
        assert info.value.field == next(k for k, v in kwargs.items() if v != "p")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"steps": 0}, "steps"),
        ({"cfg": -1}, "cfg"),
        ({"sampler_name": "ddim"}, "sampler_name"),
        ({"scheduler": "linear"}, "scheduler"),
        ({"denoise": 1.5}, "denoise"),
        ({"width": 100, "height": 96}, "width"),
        ({"width": 96}, "height"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"shift": float("nan")}, "shift"),
        ({"output_megapixels": 0}, "output_megapixels"),
        ({"output_megapixels": 17.0}, "output_megapixels"),
    ],
)
def test_bad_parameters_name_the_field(pipe, kwargs, field):
    with pytest.raises(ParameterError) as info:
        pipe.edit([picture(64, 64)], "p", **kwargs)
    assert info.value.field == field


def test_bad_images_name_the_field(pipe):
    with pytest.raises(ParameterError, match="give 1 to 3 images"):
        pipe.edit([], "p")
    with pytest.raises(ParameterError, match="give 1 to 3 images"):
        pipe.edit([picture(32, 32)] * 4, "p")
    with pytest.raises(ParameterError, match=r"images\[1\]: cannot be read"):
        pipe.edit([picture(32, 32), b"not an image"], "p")


def test_png_carries_the_parameters(pipe, tmp_path):
    result = pipe.edit([picture(64, 64)], "hello", seed=7, width=32, height=32, batch_size=2)
    paths = result.save(tmp_path / "out.png")
    assert [p.name for p in paths] == ["out_0.png", "out_1.png"]
    params = conditioning.read_png_parameters(paths[1].read_bytes())
    assert params["prompt"] == "hello" and params["seed"] == 7 and params["batch_index"] == 1
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(result.images[0]))


def test_from_config_resolves_names_in_comfyui_folders(demo_dir, tmp_path):
    from qwen_edit.testing.demo import demo_files

    te_config = demo_files(demo_dir)["text_encoder_config"]  # writes the demo files if not there yet
    models = tmp_path / "models"
    files = {
        "diffusion_models": "svdq-int4_r16-demo.safetensors",
        "clip": "qwen_2.5_vl_demo_fp8_scaled.safetensors",
        "vae": "qwen_image_vae_demo.safetensors",
    }
    for folder, name in files.items():
        (models / folder).mkdir(parents=True)
        shutil.copy(demo_dir / name, models / folder / name)
    shutil.copytree(demo_dir / "qwen25_tokenizer", models / "clip" / "qwen25_tokenizer")

    config = {
        "model_paths": {
            "volume": {
                "base_path": str(models),
                "diffusion_models": "diffusion_models",
                "clip": "clip",
                "vae": "vae",
            }
        },
        "models": {
            "transformer": files["diffusion_models"],
            "text_encoder": files["clip"],
            "vae": files["vae"],
        },
        "device": "cpu",
        "backend": "portable",
    }
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(config))
    pipe = QwenEditPipeline.from_config(path, text_encoder_config=te_config, compute="bf16")
    assert pipe.transformer.qwen_edit_info.backend == "portable"
    result = pipe.edit([picture(64, 64)], "p", width=32, height=32)
    assert result.images[0].size == (32, 32)


def test_conditioning_sizes_follow_comfyui():
    # TextEncodeQwenImageEditPlus reference: ~1024^2 pixels, sides rounded to multiples of 8.
    assert conditioning.reference_size(1536, 1024) == (1256, 840)  # comfy-semantics.md 1.6 worked example
    assert conditioning.reference_size(1254, 836) == (1256, 840)
    # ImageScaleToTotalPixels(1 MP) then VAEEncode's crop: 1536x1024 -> 1254x836 -> 1248x832.
    out = conditioning.output_pixels(picture(1536, 1024), None, None)
    assert tuple(out.shape[-2:]) == (832, 1248)
    # a pure-noise edit only needs the size, which must be the one the pixels would have had
    for size, explicit in [((1536, 1024), (None, None)), ((333, 517), (None, None)), ((64, 64), (100, 60))]:
        pixels = conditioning.output_pixels(picture(*size), *explicit)
        assert conditioning.output_size(picture(*size), *explicit) == (pixels.shape[-1], pixels.shape[-2])


def test_the_automatic_output_size_is_capped_like_an_explicit_one():
    """4000x16 at one megapixel would be 16190x64; no side goes over 4096 (params.MAX_SIDE), aspect kept."""
    from qwen_edit.params import MAX_SIDE

    assert conditioning.MAX_OUTPUT_SIDE == MAX_SIDE
    cases = [((4000, 16), 1.0), ((16, 4000), 1.0), ((4000, 16), 0.0625), ((9000, 3000), 16.0)]
    for size, megapixels in cases:
        w, h = conditioning.output_size(picture(*size), None, None, megapixels)
        assert max(w, h) <= MAX_SIDE and w % 8 == 0 and h % 8 == 0
        assert abs(w / h - size[0] / size[1]) / (size[0] / size[1]) < 0.15  # the aspect (within rounding)
        pixels = conditioning.output_pixels(picture(*size), None, None, megapixels)
        assert (pixels.shape[-1], pixels.shape[-2]) == (w, h)
    assert conditioning.output_size(picture(1536, 1024), None, None) == (1248, 832)  # under the cap


def test_save_picks_the_format_by_suffix(pipe, tmp_path):
    result = pipe.edit([picture(64, 64)], "hello", seed=7, width=32, height=32)
    for name, kind in [("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.jpeg", "JPEG"), ("d.webp", "WEBP")]:
        (path,) = result.save(tmp_path / name)
        with Image.open(path) as image:
            assert image.format == kind and image.size == (32, 32)
        embedded = conditioning.read_png_parameters(path.read_bytes()) if kind == "PNG" else None
        assert embedded is None or embedded["prompt"] == "hello"
    assert result.png_bytes(0) == (tmp_path / "a.png").read_bytes()
    with pytest.raises(ParameterError, match="unknown image suffix"):
        result.save(tmp_path / "e.tiff")


def test_reference_pixels_on_another_device_are_the_same():
    image = picture(300, 200)
    cpu = conditioning.reference_pixels(image)
    w, h = conditioning.reference_size(300, 200)
    assert cpu.device.type == "cpu" and cpu.shape == (1, 3, h, w)
    if torch.cuda.is_available():
        torch.testing.assert_close(conditioning.reference_pixels(image, device="cuda").cpu(), cpu)


def test_8bit_output_truncates_like_saveimage():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert conditioning.to_uint8(x)[0, 0, :, 0].tolist() == [0, 63, 127, 254, 255, 255]
