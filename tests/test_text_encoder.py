"""Loading the Qwen2.5-VL text encoder: the real 7B key layout, tiny files in the real formats, errors."""

from __future__ import annotations

import inspect
import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwen_edit import text_encoder as te
from qwen_edit.fp8 import FP8
from qwen_edit.testing import text_encoder as te_files
from qwen_edit.tokenizer import preprocess_vision_image, vision_token_count

IMAGE_PAD = 151655


def manifest_specs(shared_dir, name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    tensors = json.loads((shared_dir / "data" / "manifests" / name).read_text())["tensors"]
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in tensors.items()}


def file_specs(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118


def estimate_parameter_bytes(model, plan, specs, *, compute: str, dtype: torch.dtype) -> int:
    """Bytes the loaded parameters will take, from the file header alone (no tensor data read): the
    loader's dtype rules (te._stored_dtype) applied to the header, checked against what loading takes."""
    roles = te._roles(model)
    total = 0
    for name, key in plan.params.items():
        file_dtype, shape = specs[key]
        stored = te._stored_dtype(roles.get(name, "other"), te._ST_DTYPES[file_dtype], compute, dtype)
        total += math.prod(shape) * stored.itemsize
        if stored == FP8 and not file_dtype.startswith("F8"):
            total += shape[0] * 4  # per-channel float32 scales made at load
    total += sum(4 * max(1, math.prod(specs[k][1])) for k in plan.scales.values())
    return total


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same random tiny model in every accepted format (same seed, so the same float weights)."""
    root = tmp_path_factory.mktemp("text_encoder")
    paths = {
        "fp8": root / "tiny_fp8_scaled.safetensors",
        "comfy_quant": root / "tiny_comfy_quant.safetensors",
        "bf16": root / "tiny_bf16.safetensors",
        "hf_legacy": root / "repo" / "text_encoder",
        "hf_v5": root / "hf_v5",
    }
    config = te_files.write_comfy_text_encoder(paths["fp8"])
    te_files.write_comfy_text_encoder(paths["comfy_quant"], quant_format="comfy_quant")
    te_files.write_comfy_text_encoder(paths["bf16"], fp8=False)
    te_files.write_hf_text_encoder(paths["hf_legacy"], shards=2)
    te_files.write_hf_text_encoder(paths["hf_v5"], layout="v5", shards=3)
    return paths, config


@pytest.fixture(scope="module")
def model_7b():
    """The 7B model on the meta device: no memory, no init; planning does not change it."""
    return te.empty_text_encoder()


@pytest.fixture(scope="module")
def inputs():
    """Text, image 1 (4x6 merged tokens), text, image 2 (8x4), text: exercises M-RoPE across two images."""
    gen = torch.Generator().manual_seed(0)
    images = [preprocess_vision_image(torch.rand(60, 90, 3, generator=gen))]
    images.append(preprocess_vision_image(torch.rand(120, 64, 3, generator=gen)))
    n1, n2 = (vision_token_count(grid) for _, grid in images)
    ids = [151644, 872, 198, 151652] + [IMAGE_PAD] * n1 + [151653, 100, 200, 151652]
    ids += [IMAGE_PAD] * n2 + [151653, 9, 10, 11]
    spans = [(4, n1), (4 + n1 + 4, n2)]
    return ids, images, spans


# ---------------------------------------------------------------------------------------- the real 7B layout


def test_real_file_maps_onto_the_7b_model(shared_dir, model_7b):
    """Every tensor of qwen_2.5_vl_7b_fp8_scaled.safetensors has a place of the right shape, and every
    parameter of the 7B model (built on the meta device: no memory, no init) gets one."""
    specs = manifest_specs(shared_dir, "qwen_2.5_vl_7b_fp8_scaled.json")
    assert len(specs) == 1446
    model = model_7b
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values())
    assert sum(p.numel() for p in params.values()) == 7_747_169_280  # 8.29B minus the 0.545B lm_head

    plan = te.plan_load(model, specs, "manifest")
    assert set(plan.params) == set(params)  # no parameter unfilled
    for name, key in plan.params.items():
        assert tuple(params[name].shape) == specs[key][1], key
    linears = {n for n, m in model.named_modules() if isinstance(m, te.ScaledLinear)}
    assert set(plan.scales) == linears and len(linears) == 358  # 28*7 LLM + 32*5 ViT + 2 merger
    used = set(plan.params.values()) | set(plan.scales.values()) | set(plan.unused)
    assert used == set(specs)  # every file key accounted for
    assert sorted(k for k in plan.unused if not k.endswith(".scale_input")) == [
        "lm_head.weight",
        "scaled_fp8",
    ]
    # the file's dtypes are what the loader's roles assume: fp8 exactly for the Linear weights
    fp8_keys = {k for k, (dtype, _) in specs.items() if dtype == "F8_E4M3" and k != "scaled_fp8"}
    assert fp8_keys == {plan.params[f"{n}.weight"] for n in linears}

    # Memory of the loaded weights, from the header alone: fp8 file vs the same model in bf16.
    fp8_bytes = estimate_parameter_bytes(model, plan, specs, compute="upcast", dtype=torch.bfloat16)
    bf16_specs = {k: ("BF16", s) for k, (_, s) in specs.items() if k in plan.params.values()}
    bf16_plan = te.plan_load(model, bf16_specs, "bf16")
    bf16_bytes = estimate_parameter_bytes(
        model, bf16_plan, bf16_specs, compute="upcast", dtype=torch.bfloat16
    )
    print(f"7B text encoder weights: fp8 {fp8_bytes / 1e9:.2f} GB, bf16 {bf16_bytes / 1e9:.2f} GB")
    assert 8.2e9 < fp8_bytes < 8.4e9 and 15.4e9 < bf16_bytes < 15.6e9


def test_transformers_v5_names_map_too(shared_dir, model_7b):
    """The same tensors under Qwen2_5_VLForConditionalGeneration's >= 4.52 names (model.visual.*,
    model.language_model.*), as a diffusers folder saved by newer transformers would hold them."""

    def v5_name(key):
        if key.startswith("visual."):
            return "model." + key
        if key.startswith("model."):
            return "model.language_model." + key[len("model.") :]
        return key

    specs = manifest_specs(shared_dir, "qwen_2.5_vl_7b_fp8_scaled.json")
    legacy = te.plan_load(model_7b, specs)
    v5 = te.plan_load(model_7b, {v5_name(k): spec for k, spec in specs.items()})
    assert v5.params == {name: v5_name(key) for name, key in legacy.params.items()}
    assert v5.scales == {name: v5_name(key) for name, key in legacy.scales.items()}


def test_tiny_files_follow_the_real_naming(shared_dir, files):
    """Same key patterns, dtypes and ranks as the real file, only smaller (block indices folded)."""

    def patterns(specs):
        return {re.sub(r"\.(blocks|layers)\.\d+\.", r".\1.N.", k): (d, len(s)) for k, (d, s) in specs.items()}

    real = patterns(manifest_specs(shared_dir, "qwen_2.5_vl_7b_fp8_scaled.json"))
    paths, _ = files
    assert patterns(file_specs(paths["fp8"])) == real
    # the bf16 single file: the same names without scales and marker, everything bf16
    unscaled = {
        k: ("BF16", rank) for k, (_, rank) in real.items() if not k.endswith(("_input", "_weight", "fp8"))
    }
    assert patterns(file_specs(paths["bf16"])) == unscaled
    with safe_open(str(paths["fp8"]), framework="pt") as f:
        assert f.metadata() is None  # the real file has no __metadata__ either
        assert f.get_tensor("scaled_fp8").shape == (0,)


# ------------------------------------------------------------------------------------------ numerical parity


def dequantized_reference(path, config):
    """transformers' own Qwen2_5_VLModel holding the file's weights dequantized by hand (fp32)."""
    from transformers import Qwen2_5_VLModel

    sd = load_file(str(path))
    state = {}
    for key, value in sd.items():
        if key.endswith((".scale_weight", ".scale_input")) or key in ("scaled_fp8", "lm_head.weight"):
            continue
        if value.dtype == FP8:  # ComfyUI's rule: W = fp8.to(float32) * scale_weight (ops.py:405-410)
            value = value.float() * sd[key[: -len("weight")] + "scale_weight"]
        name = key if key.startswith("visual.") else "language_model." + key[len("model.") :]
        state[name] = value.float()
    model = Qwen2_5_VLModel(te.text_encoder_config(config)).eval()
    model.load_state_dict(state, strict=True)
    return model


def reference_states(model, inputs):
    ids, images, _ = inputs
    x = torch.tensor([ids])
    kwargs = {
        "input_ids": x,
        "pixel_values": torch.cat([p for p, _ in images]),
        "image_grid_thw": torch.cat([g for _, g in images]),
    }
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers v5
        kwargs["mm_token_type_ids"] = (x == IMAGE_PAD).int()
    with torch.no_grad():
        return model(**kwargs).last_hidden_state


def rel_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_file_matches_transformers_on_dequantized_weights(files, inputs):
    """Tolerances: compute="upcast" in fp32 does the reference's arithmetic in fp32 (exact fp8 -> fp32 cast,
    same attention) except that the scale multiplies each layer's output instead of its weight, so it must
    agree to fp32 rounding: 1e-5 (measured ~5e-7 relative). compute="fp8" also rounds every activation to
    e4m3 (3 mantissa bits, ~2-3% error per value): a few % relative error after the layers (measured
    ~5.6%), so 10%. bf16 activations (8 mantissa bits): measured ~1.1%, so 3%."""
    paths, config = files
    ids, images, spans = inputs
    reference = reference_states(dequantized_reference(paths["fp8"], config), inputs)

    model = te.load_text_encoder(paths["fp8"], config=config, dtype=torch.float32, compute="upcast")
    q_proj = model.language_model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == FP8 and q_proj.scale_weight.dtype == torch.float32
    assert q_proj.scale_weight.shape == ()
    out = te.encode_tokens(model, ids, images=images, image_spans=spans)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)

    fp8 = te.load_text_encoder(paths["fp8"], config=config, dtype=torch.float32, compute="fp8")
    assert fp8.qwen_edit_info.compute == "fp8" and fp8.language_model.layers[0].mlp.up_proj.fp8_matmul
    assert not fp8.visual.blocks[0].mlp.up_proj.fp8_matmul  # 40 wide: not a multiple of 16, dequantized
    err = rel_error(te.encode_tokens(fp8, ids, images=images, image_spans=spans), reference)
    assert 1e-3 < err < 0.1, err

    bf16 = te.load_text_encoder(paths["fp8"], config=config, dtype=torch.bfloat16, compute="upcast")
    out16 = te.encode_tokens(bf16, ids, images=images, image_spans=spans)
    assert out16.dtype == torch.bfloat16
    assert rel_error(out16, reference) < 0.03


def test_every_format_gives_the_same_states(files, inputs):
    """bf16 single file, diffusers folders in both key layouts, and the newer ComfyUI quant spelling."""
    paths, config = files
    ids, images, spans = inputs

    def run(name, **kwargs):
        model = te.load_text_encoder(paths[name], dtype=torch.float32, **kwargs)
        return model, te.encode_tokens(model, ids, images=images, image_spans=spans)

    bf16_model, bf16 = run("bf16", config=config)
    assert bf16_model.qwen_edit_info.kind == "comfy_bf16"
    assert bf16_model.language_model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # cast per use
    for name in ("hf_legacy", "hf_v5"):
        model, out = run(name)  # config.json from the folder
        assert model.qwen_edit_info.kind == "hf_folder"
        torch.testing.assert_close(out, bf16, rtol=0, atol=0)
    model = te.load_text_encoder(paths["hf_legacy"].parent, dtype=torch.float32)  # the repository root
    assert model.qwen_edit_info.path == str(paths["hf_legacy"])

    _, fp8 = run("fp8", config=config)
    _, comfy_quant = run("comfy_quant", config=config)
    torch.testing.assert_close(comfy_quant, fp8, rtol=0, atol=0)
    assert 1e-3 < rel_error(fp8, bf16) < 0.1  # fp8 weight rounding

    quantized, out = run("bf16", config=config, compute="fp8")  # bf16 file quantized at load
    up = quantized.language_model.layers[0].mlp.up_proj
    assert up.weight.dtype == FP8 and up.scale_weight.shape == (up.out_features,)
    assert rel_error(out, bf16) < 0.1


def test_memory_fp8_vs_bf16(tmp_path):
    """Parameter bytes after loading, with a small vocabulary so the Linear layers dominate as in the 7B."""
    config = te_files.write_comfy_text_encoder(tmp_path / "fp8.safetensors", vocab_size=512)
    te_files.write_comfy_text_encoder(tmp_path / "bf16.safetensors", fp8=False, vocab_size=512)
    sizes = {}
    for name in ("fp8", "bf16"):
        path = tmp_path / f"{name}.safetensors"
        model = te.load_text_encoder(path, config=config, dtype=torch.bfloat16)
        linear = sum(
            m.weight.numel() * m.weight.element_size()
            for m in model.modules()
            if isinstance(m, te.ScaledLinear)
        )
        sizes[name] = (te.parameter_bytes(model), linear)
        assert model.qwen_edit_info.parameter_bytes == sizes[name][0]
        specs = file_specs(path)
        plan = te.plan_load(te.empty_text_encoder(config), specs)
        estimate = estimate_parameter_bytes(model, plan, specs, compute="upcast", dtype=torch.bfloat16)
        assert estimate == sizes[name][0]  # the 7B estimate in test_real_file_maps_onto_the_7b_model is exact
    print(f"tiny text encoder parameter bytes: fp8 {sizes['fp8']}, bf16 {sizes['bf16']}")
    n_linears = 2 * 7 + 2 * 5 + 2  # float32 scalar scales only in the fp8 model
    assert sizes["fp8"][1] * 2 == sizes["bf16"][1]  # every Linear weight at half the bytes
    assert sizes["bf16"][0] - sizes["fp8"][0] == sizes["bf16"][1] // 2 - 4 * n_linears  # nothing else changed


def test_mrope_positions_follow_comfyui(inputs):
    """mrope_position_ids against a port of ComfyUI's Qwen25_7BVLI.forward (llama.py:481-504)."""
    ids, images, spans = inputs
    grids = [g for _, g in images]
    n = len(ids)
    position_ids = None
    offset = 0
    for (start, size), grid in zip(spans, grids, strict=True):
        if position_ids is None:
            position_ids = torch.zeros((3, n))
            position_ids[:, :start] = torch.arange(0, start)
        end = size + start
        len_max = int(grid.max()) // 2
        start_next = len_max + start
        position_ids[:, end:] = torch.arange(start_next + offset, start_next + (n - end) + offset)
        position_ids[0, start:end] = start + offset
        max_d = int(grid[0][1]) // 2
        rows = torch.arange(start + offset, start + max_d + offset).unsqueeze(1)
        position_ids[1, start:end] = rows.repeat(1, math.ceil((end - start) / max_d)).flatten(0)[
            : end - start
        ]
        max_d = int(grid[0][2]) // 2
        cols = torch.arange(start + offset, start + max_d + offset).unsqueeze(0)
        position_ids[2, start:end] = cols.repeat(math.ceil((end - start) / max_d), 1).flatten(0)[
            : end - start
        ]
        offset += len_max - (end - start)
    ours = te.mrope_position_ids(n, spans, [g.reshape(-1).tolist() for g in grids])
    assert ours.shape == (3, 1, n)
    assert torch.equal(ours[:, 0], position_ids.long())
    text_only = te.mrope_position_ids(5, [], [])
    assert torch.equal(text_only[:, 0], torch.arange(5).expand(3, 5))


# ------------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"text encoder not found: .*nope.safetensors.*qwen_2.5_vl_7b"
    ):
        te.load_text_encoder(tmp_path / "nope.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without config.json"):
        te.load_text_encoder(tmp_path / "folder")


def test_missing_shard(files, tmp_path):
    paths, _ = files
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    for f in paths["hf_v5"].iterdir():
        if not f.name.startswith("model-00002"):
            (folder / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match="1 are missing: model-00002-of-00003"):
        te.load_text_encoder(folder)


def test_vae_passed_as_text_encoder(shared_dir, tmp_path):
    # the real VAE's tensor names (shapes shrunk to 1 element: the names decide)
    vae = manifest_specs(shared_dir, "qwen_image_vae.json")
    save_file(
        {k: torch.zeros(1, dtype=torch.bfloat16) for k in vae}, str(tmp_path / "qwen_image_vae.safetensors")
    )
    with pytest.raises(te.TextEncoderFileError) as err:
        te.load_text_encoder(tmp_path / "qwen_image_vae.safetensors")
    message = str(err.value)
    assert "0 of 728 parameters found" in message and "194 file tensors match no model parameter" in message
    assert "VAE file such as qwen_image_vae.safetensors (pass it to load_vae)" in message
    assert "qwen_2.5_vl_7b_fp8_scaled.safetensors" in message


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "te.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    with pytest.raises(te.TextEncoderFileError, match="not a readable .safetensors file.*GGUF"):
        te.load_text_encoder(tmp_path / "te.gguf")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"),
            r"1 model parameters are not in the file: language_model\.layers\.1\.mlp\.up_proj\.weight\n",
        ),
        (
            lambda sd: sd.pop("visual.blocks.0.attn.qkv.scale_weight"),
            r"not in the file: visual\.blocks\.0\.attn\.qkv\.scale_weight \(the weight is fp8\)",
        ),
        (
            lambda sd: sd.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(1)}),
            r"1 file tensors match no model parameter: model\.layers\.9\.mlp\.up_proj\.weight",
        ),
        (
            lambda sd: sd.update({"model.norm.weight": torch.ones(48, dtype=torch.bfloat16)}),
            r"1 tensors have the wrong shape: model\.norm\.weight \[48\] \(model: \[32\]\)",
        ),
    ],
)
def test_strict_loading(files, tmp_path, edit, expected):
    paths, config = files
    sd = load_file(str(paths["fp8"]))
    edit(sd)
    save_file(sd, str(tmp_path / "edited.safetensors"))
    with pytest.raises(te.TextEncoderFileError, match=expected) as err:
        te.load_text_encoder(tmp_path / "edited.safetensors", config=config)
    assert "incomplete or modified Qwen2.5-VL file" in str(err.value)


def test_other_model_size(files):
    paths, _ = files
    with pytest.raises(
        te.TextEncoderFileError, match="another size .*hidden size 32.*needs the 7B one"
    ) as err:
        te.load_text_encoder(paths["fp8"])  # a tiny file with the real 7B config
    assert "tensors have the wrong shape" in str(err.value)


def test_comfyuis_numbers_are_the_default_on_an_fp8_card(files, inputs, monkeypatch):
    """ComfyUI multiplies the fp8 encoder's weights upcast to the activation dtype (fp8 matmuls only with
    its --fast option), so an fp8-capable card keeps "upcast" unless "fp8" is asked for: on this tiny
    real-format file fp8 activations move the states ~5.6% from the reference, upcast bf16 ~1.1%
    (test_fp8_file_matches_transformers_on_dequantized_weights)."""
    from qwen_edit.hardware import DeviceInfo

    hopper = DeviceInfo(torch.device("cpu"), "NVIDIA H200 (faked)", (9, 0), 141 << 30)
    monkeypatch.setattr(te, "describe_device", lambda device=None: hopper)
    paths, config = files
    ids, images, spans = inputs
    default = te.load_text_encoder(paths["fp8"], config=config)
    opted = te.load_text_encoder(paths["fp8"], config=config, compute="fp8")
    assert default.qwen_edit_info.compute == "upcast" and opted.qwen_edit_info.compute == "fp8"
    assert not default.language_model.layers[0].mlp.up_proj.fp8_matmul
    assert opted.language_model.layers[0].mlp.up_proj.fp8_matmul
    reference = reference_states(dequantized_reference(paths["fp8"], config), inputs)
    moved = {
        name: rel_error(te.encode_tokens(model, ids, images=images, image_spans=spans).float(), reference)
        for name, model in (("upcast", default), ("fp8", opted))
    }
    assert moved["upcast"] < 0.03 < moved["fp8"] < 0.1, moved


def test_bad_options(files):
    paths, config = files
    with pytest.raises(ValueError, match="compute must be one of"):
        te.load_text_encoder(paths["fp8"], config=config, compute="int8")
    with pytest.raises(ValueError, match="compute must be one of"):  # no "auto": upcast is the default
        te.load_text_encoder(paths["fp8"], config=config, compute="auto")
    with pytest.raises(ValueError, match="activations overflow float16"):
        te.load_text_encoder(paths["fp8"], config=config, dtype=torch.float16)
    with pytest.raises(ValueError, match="2 images but 1 image spans"):
        te.encode_tokens(
            te.load_text_encoder(paths["fp8"], config=config),
            [1, 2],
            images=[None, None],
            image_spans=[(0, 1)],
        )


def test_vision_attention_in_one_call_matches_transformers_per_window(files):
    """The vision tower with `_masked_window_attention` (one SDPA, block-diagonal mask) against
    transformers' own per-window loop, on an image of several windows (11x7 merged tokens, windows of
    4x4: 6 of them, some partial) in fp32: equal to rounding."""
    paths, config = files
    model = te.load_text_encoder(paths["fp8"], config=config, dtype=torch.float32, compute="upcast")
    image = torch.rand(300, 200, 3, generator=torch.Generator().manual_seed(1))
    pixels, grid = preprocess_vision_image(image)
    assert grid.tolist() == [[1, 22, 14]]
    assert all("forward" in block.attn.__dict__ for block in model.visual.blocks)  # patched at load
    ours = te.image_embeddings(model, pixels, grid)
    for block in model.visual.blocks:
        del block.attn.forward  # back to transformers' own method
    theirs = te.image_embeddings(model, pixels, grid)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and the window mask matters: full attention everywhere gives other numbers
    te.use_masked_window_attention(model)
    full = torch.tensor([0, pixels.shape[0]], dtype=torch.int32)
    full_blocks = model.visual.fullatt_block_indexes
    window_blocks = [b for i, b in enumerate(model.visual.blocks) if i not in full_blocks]
    hidden = torch.randn(pixels.shape[0], model.visual.config.hidden_size)
    cos_sin = (torch.ones(pixels.shape[0], 16), torch.zeros(pixels.shape[0], 16))
    windows = torch.tensor([0, 16, pixels.shape[0]], dtype=torch.int32)
    attn = window_blocks[0].attn
    assert not torch.allclose(attn(hidden, cu_seqlens=windows, position_embeddings=cos_sin),
                              attn(hidden, cu_seqlens=full, position_embeddings=cos_sin))  # fmt: skip


# ------------------------------------------------------------------------------- a literal <|endoftext|>


def test_literal_endoftext_and_what_follows_are_masked_as_keys(files):
    """ComfyUI masks the first <|endoftext|> (its pad id for this encoder) and every text token after it
    as attention keys (Comfy-Org/ComfyUI@a125cd8 comfy/sd1_clip.py:170-200, text_encoders/llama.py:391-400).
    Reference: transformers' own model on the dequantized weights, given the additive mask exactly as
    llama.py builds it; fp32 on both sides, so the 1e-5 of the unmasked comparison above."""
    paths, config = files
    ids = [151644, 872, 198, 100, 200, 300, te.END_OF_TEXT_ID, 400, 500, 151645, 198]
    n = len(ids)
    keys = te.comfy_attention_mask(ids)
    assert keys == [1] * 6 + [0] * 5
    mask = 1.0 - torch.tensor(keys, dtype=torch.float32).reshape(1, 1, 1, n).expand(1, 1, n, n)
    mask = mask.masked_fill(mask.bool(), float("-inf")) + torch.full((n, n), float("-inf")).triu(1)
    with torch.no_grad():
        reference = (
            dequantized_reference(paths["fp8"], config)
            .language_model(
                input_ids=torch.tensor([ids]),
                attention_mask=mask,
                position_ids=torch.arange(n).expand(3, 1, n),
            )
            .last_hidden_state
        )
    model = te.load_text_encoder(paths["fp8"], config=config, dtype=torch.float32, compute="upcast")
    out = te.encode_tokens(model, ids)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    # A token after the pad is no key for anyone: changing it changes its own row and nothing else.
    other = te.encode_tokens(model, ids[:7] + [401] + ids[8:])
    rest = [i for i in range(n) if i != 7]
    torch.testing.assert_close(other[:, rest], out[:, rest], rtol=0, atol=0)
    assert not torch.equal(other[:, 7], out[:, 7])
    assert te.comfy_attention_mask(ids[:6]) is None  # no pad: no mask, the plain causal path


def test_image_tokens_after_the_pad_stay_attended():
    """ComfyUI splices image embeddings in with mask 1 wherever they sit (sd1_clip.py:232); only text
    tokens from the first pad on are masked, later pads included."""
    ids = [1, 2, te.END_OF_TEXT_ID, 3, IMAGE_PAD, IMAGE_PAD, 4, te.END_OF_TEXT_ID]
    assert te.comfy_attention_mask(ids, [(4, 2)]) == [1, 1, 0, 0, 1, 1, 0, 0]
    assert te.comfy_attention_mask(torch.tensor([[5, te.END_OF_TEXT_ID]])) == [1, 0]
