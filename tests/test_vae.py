"""The Qwen-Image VAE: ComfyUI key mapping, strict loading, encode/decode parity with diffusers, tiling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qwen_edit.vae
from qwen_edit.testing.vae import write_comfy_vae
from qwen_edit.vae import (
    AUTO_TILE_PIXELS,
    CONFIG_PATH,
    CompileRepeatedShapes,
    VAEFormatError,
    build_vae,
    comfy_key_map,
    compile_vae,
    crop_to_multiple,
    decode_latents,
    denormalize_latents,
    detect_layout,
    encode_images,
    latent_stats,
    load_vae,
    match_vae_keys,
    normalize_latents,
    vae_config,
)

# ComfyUI's Wan21 latent format (Comfy-Org/ComfyUI@a125cd8:comfy/latent_formats.py), typed in independently.
WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip

TINY = 8  # base_dim of the test VAE (the real one is 96)


@pytest.fixture(scope="module")
def manifest(shared_dir: Path) -> dict:
    return json.loads((shared_dir / "data" / "manifests" / "qwen_image_vae.json").read_text())


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny ComfyUI-format VAE, plus the same weights as diffusers' layout made by diffusers itself."""
    root = tmp_path_factory.mktemp("vae")
    comfy = write_comfy_vae(root / "qwen_image_vae.safetensors", base_dim=TINY, diffusers_dir=root / "ours")
    # The reference goes through diffusers' own Wan-2.1 converter, an implementation independent of ours.
    reference = AutoencoderKLQwenImage.from_config({**vae_config(), "base_dim": TINY})
    reference.load_state_dict(convert_wan_vae_to_diffusers(load_file(comfy)), strict=True)
    reference.save_pretrained(root / "repo" / "vae")
    return {"comfy": comfy, "ours": root / "ours", "repo": root / "repo"}


@pytest.fixture(scope="module")
def tiny_vae(tiny_files) -> AutoencoderKLQwenImage:
    return load_vae(tiny_files["comfy"], dtype=torch.float32)


def photo(width: int = 96, height: int = 64) -> Image.Image:
    """A deterministic picture: gradients, shapes and some noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * xx / width, 255 * yy / height, 128 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0)], -1)
    rgb += np.random.default_rng(0).normal(0, 8, rgb.shape)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 4, height // 4, width // 2, height // 2 + 10), fill=(250, 30, 40))
    draw.rectangle((width // 2, 5, width - 8, height // 3), fill=(20, 40, 220))
    return image


def as_pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2.0 - 1.0


# ------------------------------------------------------------------------------ the real file's layout


def test_every_real_tensor_fills_a_parameter_of_the_right_shape(manifest):
    model = build_vae()  # the shipped (real) config, on the meta device
    params = model.state_dict()
    assert all(t.is_meta for t in params.values())
    shapes = {name: entry["shape"] for name, entry in manifest["tensors"].items()}
    assert len(shapes) == manifest["tensor_count"] == 194

    mapping = match_vae_keys(shapes, model, "manifest")

    assert set(mapping) == set(shapes)  # every file tensor is used ...
    assert sorted(mapping.values()) == sorted(params)  # ... once, and every parameter is filled
    for key, name in mapping.items():
        assert list(params[name].shape) == shapes[key], key
    assert sum(t.numel() for t in params.values()) == 126_892_531
    assert {entry["dtype"] for entry in manifest["tensors"].values()} == {"BF16"}


def test_mapping_equals_diffusers_own_wan_converter(manifest):
    # Tag each tensor with a distinct object so swaps between same-shaped tensors would show.
    tagged = {name: torch.empty(0) for name in manifest["tensors"]}
    converted = convert_wan_vae_to_diffusers(tagged)
    theirs = {id(tensor): name for name, tensor in converted.items()}
    ours = comfy_key_map(build_vae())
    assert {key: theirs[id(tagged[key])] for key in tagged} == ours


def test_shipped_config_is_the_manifest_config(shared_dir):
    configs = shared_dir / "data" / "manifests" / "qwen_image_edit_2509_configs.json"
    configs = json.loads(configs.read_text())
    assert json.loads(CONFIG_PATH.read_text()) == configs["vae"]["value"]
    assert vae_config()["latents_mean"] == WAN21_MEAN
    assert vae_config()["latents_std"] == WAN21_STD


def test_loads_a_full_size_file_with_the_real_names(manifest, tmp_path):
    # Zeros with the real 194 names, shapes and dtype: the loader must infer base_dim=96 and take it strictly.
    path = tmp_path / "qwen_image_vae.safetensors"
    tensors = {name: torch.zeros(e["shape"], dtype=torch.bfloat16) for name, e in manifest["tensors"].items()}
    save_file(tensors, str(path))
    try:
        model = load_vae(path)
        assert model.config.base_dim == 96
        assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
        assert not any(p.requires_grad for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) == 126_892_531
    finally:
        path.unlink()


def test_written_file_has_the_real_names_dtypes_and_scaled_shapes(manifest, tiny_files):
    with safe_open(str(tiny_files["comfy"]), framework="pt") as f:
        header = {key: (f.get_slice(key).get_shape(), f.get_slice(key).get_dtype()) for key in f.keys()}  # noqa: SIM118
        assert not f.metadata()
    assert set(header) == set(manifest["tensors"])
    for key, entry in manifest["tensors"].items():
        # Widths are multiples of 96 in the real file; latent (16/32), RGB (3) and kernel sizes stay.
        scaled = [d * TINY // 96 if d % 96 == 0 else d for d in entry["shape"]]
        assert header[key] == (scaled, entry["dtype"]), key


# ------------------------------------------------------------------ parity with diffusers' own loading


def test_round_trip_matches_diffusers_from_pretrained(tiny_files, tiny_vae):
    reference = AutoencoderKLQwenImage.from_pretrained(tiny_files["repo"] / "vae", torch_dtype=torch.float32)
    ours = tiny_vae.state_dict()
    assert set(ours) == set(reference.state_dict())
    assert all(torch.equal(ours[name], p) for name, p in reference.state_dict().items())

    image = photo(64, 48)
    latents = encode_images(tiny_vae, image)
    assert latents.shape == (1, 16, 6, 8) and latents.dtype == torch.float32

    # diffusers' QwenImageEditPlusPipeline: posterior mode, (z - mean) / std; decodes z / (1/std) + mean.
    mean = torch.tensor(reference.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(reference.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        raw = reference.encode(as_pixels(image)[:, :, None]).latent_dist.mode()
        expected = ((raw - mean) / torch.tensor(reference.config.latents_std).view(1, 16, 1, 1, 1))[:, :, 0]
        expected_image = reference.decode(expected[:, :, None] / inv_std + mean).sample[:, :, 0]
    assert torch.equal(latents, expected)

    decoded = decode_latents(tiny_vae, latents)
    assert decoded.shape == (1, 3, 48, 64) and decoded.dtype == torch.float32
    assert decoded.abs().max() <= 1.0
    # z * std + mean (ComfyUI) vs z / (1/std) + mean (diffusers) differ by float rounding only.
    torch.testing.assert_close(decoded, expected_image, rtol=0, atol=1e-5)


def test_diffusers_layouts_load_to_the_same_model(tiny_files, tiny_vae):
    image = photo(32, 24)
    expected = encode_images(tiny_vae, image)
    sources = [
        tiny_files["repo"],  # repository root with vae/
        tiny_files["repo"] / "vae",  # the vae/ folder
        tiny_files["repo"] / "vae" / "diffusion_pytorch_model.safetensors",  # one diffusers-named file
        tiny_files["ours"],  # written by write_comfy_vae(diffusers_dir=...)
    ]
    for source in sources:
        vae = load_vae(source, dtype=torch.float32)
        assert vae.config.base_dim == TINY
        assert torch.equal(encode_images(vae, image), expected), source


def test_bf16_default_runs_close_to_float32(tiny_files, tiny_vae):
    vae = load_vae(tiny_files["comfy"])
    assert vae.dtype == torch.bfloat16
    image = photo(32, 24)
    latents = encode_images(vae, image)
    assert latents.dtype == torch.float32
    torch.testing.assert_close(latents, encode_images(tiny_vae, image), rtol=0.05, atol=0.05)
    decoded = decode_latents(vae, latents)
    assert decoded.dtype == torch.float32 and decoded.shape == (1, 3, 24, 32)
    torch.testing.assert_close(decoded, decode_latents(tiny_vae, latents), rtol=0.05, atol=0.05)


def test_encode_inputs_batches_crops_and_shapes(tiny_vae):
    image = photo(48, 32)
    from_pil = encode_images(tiny_vae, image)
    assert torch.equal(encode_images(tiny_vae, as_pixels(image)), from_pil)
    assert torch.equal(encode_images(tiny_vae, image.convert("RGBA")), from_pil)  # alpha dropped
    batch = encode_images(tiny_vae, [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert batch.shape == (2, 16, 4, 6)
    torch.testing.assert_close(batch[:1], from_pil, rtol=0, atol=1e-5)  # images are encoded independently
    assert not torch.allclose(batch[1:], from_pil, atol=1e-2)

    # ComfyUI's VAEEncode centre-crop: 53x38 -> 48x32 from offset ((53 % 8) // 2, (38 % 8) // 2) = (2, 3).
    big = photo(53, 38)
    cropped = big.crop((2, 3, 50, 35))
    assert torch.equal(encode_images(tiny_vae, big), encode_images(tiny_vae, cropped))
    assert crop_to_multiple(torch.zeros(1, 3, 70, 101)).shape == (1, 3, 64, 96)

    # 5-D latents as the model uses them internally decode like 4-D ones.
    assert torch.equal(decode_latents(tiny_vae, from_pil[:, :, None]), decode_latents(tiny_vae, from_pil))


# ------------------------------------------------------------------------------------- normalization


def test_normalization_is_comfy_wan21_and_round_trips(tiny_vae):
    z = torch.randn(2, 16, 3, 5)
    mean, std = (torch.tensor(v).view(1, 16, 1, 1) for v in (WAN21_MEAN, WAN21_STD))
    assert torch.equal(normalize_latents(z, tiny_vae), (z - mean) * 1.0 / std)  # Wan21.process_in
    assert torch.equal(denormalize_latents(z, tiny_vae), z * std / 1.0 + mean)  # Wan21.process_out
    assert torch.equal(normalize_latents(z), normalize_latents(z, tiny_vae))  # default: shipped config
    torch.testing.assert_close(denormalize_latents(normalize_latents(z)), z, rtol=0, atol=1e-6)
    torch.testing.assert_close(normalize_latents(denormalize_latents(z)), z, rtol=0, atol=1e-6)

    five = z[:, :, None]
    assert torch.equal(normalize_latents(five)[:, :, 0], normalize_latents(z))
    assert torch.equal(normalize_latents(mean.expand(1, 16, 2, 2)), torch.zeros(1, 16, 2, 2))
    half = normalize_latents(z.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert latent_stats()[0].tolist() == pytest.approx(WAN21_MEAN)
    with pytest.raises(ValueError, match="latents must be"):
        normalize_latents(torch.zeros(1, 4, 8, 8))


# -------------------------------------------------------------------------------------------- tiling


class LocalDecoder(torch.nn.Module):
    """A stand-in VAE whose decode is per latent pixel, so a correct tiled decode must equal the whole one."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)))
        self.config = {"latents_mean": WAN21_MEAN, "latents_std": WAN21_STD}
        self.calls: list[tuple[int, ...]] = []

    @property
    def device(self):
        return self.mix.device

    @property
    def dtype(self):
        return self.mix.dtype

    def decode(self, z):
        self.calls.append(tuple(z.shape))
        rgb = torch.tanh(torch.einsum("oc,bcthw->bothw", self.mix, z) / 8)
        # Position-free, pixel-local: each latent pixel becomes an 8x8 block with a fixed pattern.
        pattern = torch.linspace(-0.1, 0.1, 64).view(8, 8)
        out = rgb.repeat_interleave(8, -2).repeat_interleave(8, -1) + pattern.repeat(z.shape[-2], z.shape[-1])
        return type("Out", (), {"sample": out})()


@pytest.mark.parametrize(
    ("h", "w", "tile", "overlap"),
    [(13, 21, 64, 16), (16, 16, 64, 32), (9, 30, 96, 40), (16, 16, 64, 48), (8, 20, 64, 0), (8, 8, 64, 0)],
)
def test_tiled_blending_is_exact_for_a_local_decoder(h, w, tile, overlap):
    vae = LocalDecoder()
    z = torch.randn(2, 16, h, w)
    whole = decode_latents(vae, z, tiled=False)
    vae.calls.clear()
    tiled = decode_latents(vae, z, tiled=True, tile_size=tile, overlap=overlap)
    assert tiled.shape == whole.shape == (2, 3, 8 * h, 8 * w)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)
    assert all(shape[-2] <= tile // 8 and shape[-1] <= tile // 8 for shape in vae.calls)
    assert len(vae.calls) > 1 or (h <= tile // 8 and w <= tile // 8)


def test_tiled_decode_is_close_to_whole_decode(tiny_vae):
    z = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(1))
    whole = decode_latents(tiny_vae, z, tiled=False)
    # One tile covering everything is the whole decode, bit for bit.
    assert torch.equal(decode_latents(tiny_vae, z, tiled=True, tile_size=96, overlap=32), whole)
    # 2x2 tiles of 64 px (8 latents) overlapping by 32 px. The tiny random VAE sees ~17 latents around each
    # pixel (3x3 convs at four scales plus global attention), far more than a tile, so tiles only
    # approximate; measured: mean |diff| 0.027, max 0.33, against an image std of 0.28.
    tiled = decode_latents(tiny_vae, z, tiled=True, tile_size=64, overlap=32)
    diff = (tiled - whole).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.5
    assert diff.mean() < 0.2 * whole.std()


def test_auto_tiling_threshold_and_oom_fallback(monkeypatch):
    assert AUTO_TILE_PIXELS == 2048 * 2048
    monkeypatch.setattr(qwen_edit.vae, "AUTO_TILE_PIXELS", 128 * 128)
    vae = LocalDecoder()
    decode_latents(vae, torch.zeros(1, 16, 16, 16), tile_size=64, overlap=32)  # exactly the threshold
    assert vae.calls == [(1, 16, 1, 16, 16)]
    vae.calls.clear()
    decode_latents(vae, torch.zeros(1, 16, 16, 17), tile_size=64, overlap=32)  # above: tiled
    assert len(vae.calls) > 1 and all(shape[-1] <= 8 for shape in vae.calls)

    real_decode = vae.decode

    def fails_when_whole(z):
        if z.shape[-1] > 8:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return real_decode(z)

    monkeypatch.setattr(vae, "decode", fails_when_whole)
    z = torch.randn(1, 16, 8, 16)
    out = decode_latents(vae, z, tile_size=64, overlap=32)  # auto: falls back to tiles
    torch.testing.assert_close(out, decode_latents(vae, z, tiled=True, tile_size=64, overlap=32))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        decode_latents(vae, z, tiled=False)


def test_decode_argument_errors():
    vae = LocalDecoder()
    with pytest.raises(ValueError, match="multiples of 8"):
        decode_latents(vae, torch.zeros(1, 16, 4, 4), tiled=True, tile_size=60)
    with pytest.raises(ValueError, match="overlap < tile_size"):
        decode_latents(vae, torch.zeros(1, 16, 4, 4), tiled=True, tile_size=64, overlap=64)
    with pytest.raises(ValueError, match="single-frame"):
        decode_latents(vae, torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="latents must be"):
        decode_latents(vae, torch.zeros(16, 4, 4))


# --------------------------------------------------------------------------------------------- errors


def test_missing_paths_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors.*qwen_image_vae\.safetensors"):
        load_vae(tmp_path / "nowhere.safetensors")
    with pytest.raises(FileNotFoundError, match="no VAE config.json"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(vae_config()))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_vae(tmp_path)


def test_wrong_files_are_refused_with_a_reason(tmp_path):
    transformer = tmp_path / "qwen_image_edit_2509.safetensors"
    dit = {"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4), "img_in.weight": torch.zeros(4, 4)}
    save_file(dit, str(transformer))
    with pytest.raises(VAEFormatError, match="not a Qwen-Image VAE.*diffusion transformer"):
        load_vae(transformer)

    checkpoint = tmp_path / "checkpoint.safetensors"
    save_file({"first_stage_model." + "decoder.middle.0.residual.0.gamma": torch.zeros(4)}, str(checkpoint))
    with pytest.raises(VAEFormatError, match="prefix 'first_stage_model.'"):
        load_vae(checkpoint)

    wan22 = tmp_path / "wan2.2_vae.safetensors"
    save_file({"decoder.middle.0.residual.0.gamma": torch.zeros(4, 1, 1, 1),
               "decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(1)}, str(wan22))  # fmt: skip
    with pytest.raises(VAEFormatError, match="Wan-2.2"):
        load_vae(wan22)

    pickle = tmp_path / "vae.pt"
    pickle.write_bytes(b"not safetensors")
    with pytest.raises(VAEFormatError, match="not a .safetensors file"):
        load_vae(pickle)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(VAEFormatError, match="not a readable safetensors file"):
        load_vae(broken)

    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(VAEFormatError, match="AutoencoderKLWan, expected AutoencoderKLQwenImage"):
        load_vae(folder)


def test_strict_loading_lists_missing_unexpected_and_misshapen_keys(tiny_files, tmp_path):
    tensors = load_file(tiny_files["comfy"])
    del tensors["decoder.upsamples.7.time_conv.weight"]
    tensors["decoder.extra.weight"] = torch.zeros(1)
    tensors["encoder.head.2.bias"] = torch.zeros(31)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    with pytest.raises(VAEFormatError) as info:
        load_vae(bad)
    message = str(info.value)
    assert "1 missing: decoder.upsamples.7.time_conv.weight" in message
    assert "1 unexpected: decoder.extra.weight" in message
    assert "encoder.head.2.bias [31] (needs [32])" in message

    # A diffusers folder whose config disagrees with its weights is refused the same way.
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**vae_config(), "base_dim": 16}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (tiny_files["repo"] / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(VAEFormatError, match="wrong shape"):
        load_vae(folder)


def test_encode_input_errors(tiny_vae):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        encode_images(tiny_vae, torch.full((1, 3, 16, 16), 255.0))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        encode_images(tiny_vae, torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="share a size"):
        encode_images(tiny_vae, [photo(16, 16), photo(24, 16)])
    with pytest.raises(TypeError):
        encode_images(tiny_vae, ["not an image"])


def test_other_project_files_are_recognised_as_not_a_vae(shared_dir):
    manifests = shared_dir / "data" / "manifests"
    for name, hint in [
        ("qwen_2.5_vl_7b_fp8_scaled.json", "text encoder"),
        ("svdq_int4_r32_qwen_image_edit_2509.json", "diffusion transformer"),
    ]:
        keys = json.loads((manifests / name).read_text())["tensors"]
        with pytest.raises(VAEFormatError, match=hint):
            detect_layout(keys, name)


# ------------------------------------------------------------------------------------------- compile


def test_a_shape_is_compiled_from_its_second_use_and_the_compiled_set_is_bounded():
    compiled_for = []

    def recording_compile(fn):
        compiled_for.append(len(calls))
        return lambda x: ("compiled", fn(x)[1])

    calls = []
    policy = CompileRepeatedShapes(
        lambda x: ("eager", calls.append(x.shape) or x.shape), 2, recording_compile
    )
    runs = [policy(torch.zeros(n))[0] for n in (1, 2, 1, 1, 3, 2, 4, 4, 3)]
    # size 1: eager, then compiled; size 3 first seen: eager; 2 again: compiled (the set is now full);
    # 4 and 3 come back but the bound of 2 keeps them eager.
    assert runs == ["eager", "eager", "compiled", "compiled", "eager", "compiled", "eager", "eager", "eager"]
    assert len(compiled_for) == 2 and len(policy.compiled) == 2 and not policy.seen  # counting stopped

    # Shapes seen once are remembered up to MAX_SEEN; a stream of one-off sizes never grows it past that.
    policy = CompileRepeatedShapes(lambda x: ("eager", None), 2, recording_compile)
    for n in range(1, 3 * CompileRepeatedShapes.MAX_SEEN):
        assert policy(torch.zeros(n))[0] == "eager"
    assert len(policy.seen) <= CompileRepeatedShapes.MAX_SEEN and not policy.compiled


def test_compile_vae_gives_eager_numbers_with_channels_last_weights(tiny_files):
    """compile_vae's own changes (weights' layout, the per-shape wrapper) with a stand-in compiler that
    runs the function as it is: the numbers are eager's exactly; the real torch.compile runs in
    tests/test_gpu.py::test_compiled_demo_pipeline_matches_eager_and_takes_new_prompt_lengths."""
    eager_vae = load_vae(tiny_files["comfy"], dtype=torch.float32)
    vae = load_vae(tiny_files["comfy"], dtype=torch.float32)
    compiles = []
    compile_vae(vae, compile=lambda fn: compiles.append(fn) or fn)
    conv = vae.encoder.conv_in.weight
    assert conv.dim() == 5 and conv.is_contiguous(memory_format=torch.channels_last_3d)
    pixels = as_pixels(photo())
    for _ in range(3):
        latents = encode_images(vae, pixels)
        torch.testing.assert_close(latents, encode_images(eager_vae, pixels), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            decode_latents(vae, latents), decode_latents(eager_vae, latents), rtol=1e-5, atol=1e-5
        )
    assert len(compiles) == 2  # encoder and decoder, each once: at their input shape's second use
