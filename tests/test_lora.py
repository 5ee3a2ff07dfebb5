"""LoRAs on the quantized transformer, against dense references with W + strength*scale*B@A by hand."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from twins import dense_twin, forward_inputs

from qwen_edit import lora as lora_mod
from qwen_edit.lora import LoraError, apply_loras, parse_lora_state_dict, read_lora
from qwen_edit.svdq import layout, svdq_dense
from qwen_edit.testing.transformer import quantize_awq_linear, quantize_svdq_linear, write_tiny_transformer
from qwen_edit.transformer import load_transformer

RANK = 4


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_transformer(tmp_path_factory.mktemp("lora") / "tiny.safetensors", precision="int4")


def canonical_lora(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """{diffusers module: (A [r,in], B [out,r], alpha)}: every kind of target, q/k/v only in part."""
    gen = torch.Generator().manual_seed(seed)
    d, f, j = 128, 512, 64
    shapes = {
        "transformer_blocks.0.attn.to_q": (d, d),
        "transformer_blocks.0.attn.to_k": (d, d),
        "transformer_blocks.0.attn.to_v": (d, d),
        "transformer_blocks.0.attn.to_out.0": (d, d),
        "transformer_blocks.0.img_mlp.net.0.proj": (f, d),
        "transformer_blocks.0.img_mlp.net.2": (d, f),
        "transformer_blocks.0.img_mod.1": (6 * d, d),
        "transformer_blocks.0.txt_mod.1": (6 * d, d),
        "transformer_blocks.1.attn.to_q": (d, d),  # only q of the image stream
        "transformer_blocks.1.attn.add_k_proj": (d, d),  # k and v of the text stream, not q
        "transformer_blocks.1.attn.add_v_proj": (d, d),
        "transformer_blocks.1.txt_mlp.net.2": (d, f),
        "img_in": (d, 64),
        "txt_in": (d, j),
        "proj_out": (64, d),
        "norm_out.linear": (2 * d, d),
        "time_text_embed.timestep_embedder.linear_2": (d, d),
    }
    out = {}
    for name, (n, k) in shapes.items():
        a = torch.randn(RANK, k, generator=gen) / k**0.5
        b = torch.randn(n, RANK, generator=gen) * 0.3
        out[name] = (a, b, 2.0 if seed % 2 else None)
    return out


def write_lora(path, canon, fmt: str):
    tensors = {}
    for name, (a, b, alpha) in canon.items():
        if fmt == "diffusers":
            tensors[f"transformer.{name}.lora_A.weight"] = a
            tensors[f"transformer.{name}.lora_B.weight"] = b
        elif fmt == "peft":
            tensors[f"{name}.lora_A.default.weight"] = a
            tensors[f"{name}.lora_B.default.weight"] = b
        elif fmt == "comfyui":
            tensors[f"diffusion_model.{name}.lora_A.weight"] = a
            tensors[f"diffusion_model.{name}.lora_B.weight"] = b
        elif fmt == "comfyui_model":  # the full ComfyUI model path, "model.diffusion_model."
            tensors[f"model.diffusion_model.{name}.lora_down.weight"] = a
            tensors[f"model.diffusion_model.{name}.lora_up.weight"] = b
        elif fmt == "kohya":
            flat = "lora_unet_" + name.replace(".", "_")
            tensors[f"{flat}.lora_down.weight"] = a
            tensors[f"{flat}.lora_up.weight"] = b
        if alpha is not None:
            prefixes = {"diffusers": "transformer.", "peft": "", "comfyui": "diffusion_model."}
            prefix = {**prefixes, "comfyui_model": "model.diffusion_model."}.get(fmt)
            key = (
                f"{prefix}{name}.alpha"
                if prefix is not None
                else "lora_unet_" + name.replace(".", "_") + ".alpha"
            )
            tensors[key] = torch.tensor(alpha)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(path))
    return path


def reference(path, loras: list[tuple[dict, float]]):
    """The dense twin with every delta added to its weights by hand (ComfyUI's alpha/rank scale)."""
    model = dense_twin(path)
    with torch.no_grad():
        for canon, strength in loras:
            for name, (a, b, alpha) in canon.items():
                a, b = a.bfloat16().float(), b.bfloat16().float()  # as stored in the file
                scale = 1.0 if alpha is None else alpha / a.shape[0]
                model.get_submodule(name).weight += strength * scale * (b @ a)
    return model


def _run(model):
    with torch.no_grad():
        return model(**forward_inputs())[0]


@pytest.fixture(scope="module")
def portable(tiny_path):
    return load_transformer(tiny_path, backend="portable", compute="bf16", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "comfyui", "comfyui_model", "kohya"])
@pytest.mark.parametrize("seed", [1, 2])  # odd seeds carry .alpha keys (scale 2/4), even ones don't
def test_each_format_matches_the_dense_reference(tiny_path, portable, tmp_path, fmt, seed):
    canon = canonical_lora(seed)
    path = write_lora(tmp_path / f"{fmt}.safetensors", canon, fmt)
    report = apply_loras(portable, [(path, 0.8)])
    assert report.applied[path.stem] == len(canon) and not report.unmatched[path.stem]
    y = _run(portable)
    y_ref = _run(reference(tiny_path, [(canon, 0.8)]))
    y_base = _run(dense_twin(tiny_path))
    apply_loras(portable, [])
    assert (y - y_base).norm() > 0.05 * y_base.norm()  # the LoRA really changes the output
    assert (y - y_ref).abs().max() < 1e-4 * y_ref.abs().max()  # float32 both sides


def test_alpha_is_scaled_as_comfyui_does(tmp_path):
    canon = canonical_lora(1)
    fmt, layers = parse_lora_state_dict(
        {
            f"diffusion_model.{n}.{s}": t
            for n, (a, b, al) in canon.items()
            for s, t in (("lora_A.weight", a), ("lora_B.weight", b), ("alpha", torch.tensor(al)))
        }
    )
    assert fmt == "ComfyUI/ai-toolkit"
    assert all(w.scale == 2.0 / RANK for w in layers.values())


def test_diffusers_own_loader_agrees_for_the_peft_format(tiny_path, portable, tmp_path):
    pytest.importorskip("peft")
    canon = canonical_lora(2)  # no alpha: diffusers and ComfyUI agree on the scale
    # diffusers' adapter loader handles the block linears; it has no place for img_mod/top-level here.
    canon = {k: v for k, v in canon.items() if k.startswith("transformer_blocks") and "_mod" not in k}
    path = write_lora(tmp_path / "peft.safetensors", canon, "diffusers")
    twin = dense_twin(tiny_path)
    state = {k.removeprefix("transformer."): v.float() for k, v in load_file(str(path)).items()}
    twin.load_lora_adapter(state, adapter_name="x", prefix=None)
    twin.set_adapters(["x"], weights=[0.7])
    apply_loras(portable, [(path, 0.7)])
    y, y_diffusers = _run(portable), _run(twin)
    apply_loras(portable, [])
    assert (y - y_diffusers).abs().max() < 1e-4 * y_diffusers.abs().max()


def test_strength_zero_and_removal_restore_the_base_exactly(portable, tmp_path):
    path = write_lora(tmp_path / "a.safetensors", canonical_lora(1), "comfyui")
    base = _run(portable)
    apply_loras(portable, [(path, 0.0)])
    assert torch.equal(_run(portable), base)
    apply_loras(portable, [(path, 1.0)])
    assert not torch.equal(_run(portable), base)
    apply_loras(portable, [])
    assert torch.equal(_run(portable), base)


def test_two_loras_compose_and_strengths_change_without_touching_weights(tiny_path, portable, tmp_path):
    a, b = canonical_lora(1), canonical_lora(2)
    pa = write_lora(tmp_path / "a.safetensors", a, "kohya")
    pb = write_lora(tmp_path / "b.safetensors", b, "diffusers")
    weights = {n: p.data_ptr() for n, p in portable.named_parameters()}
    apply_loras(portable, [(pa, 0.5), (pb, 1.2)])
    y = _run(portable)
    assert (y - _run(reference(tiny_path, [(a, 0.5), (b, 1.2)]))).abs().max() < 1e-4 * y.abs().max()
    start = time.perf_counter()
    report = apply_loras(portable, [(pa, -0.3), (pb, 0.4)])  # files are parsed once, then cached
    seconds = time.perf_counter() - start
    y2 = _run(portable)
    apply_loras(portable, [])
    assert (y2 - _run(reference(tiny_path, [(a, -0.3), (b, 0.4)]))).abs().max() < 1e-4 * y2.abs().max()
    assert {n: p.data_ptr() for n, p in portable.named_parameters()} == weights
    assert report.seconds < 1.0 and seconds < 1.0, seconds
    assert read_lora(pa) is read_lora(pa)


def test_bf16_model_with_lora_stays_close(tiny_path, tmp_path):
    model = load_transformer(tiny_path, backend="portable", compute="bf16", device="cpu")
    canon = canonical_lora(1)
    path = write_lora(tmp_path / "a.safetensors", canon, "peft")
    apply_loras(model, [(path, 1.0)])
    inputs = {
        k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in forward_inputs().items()
    }
    with torch.no_grad():
        y = model(**inputs)[0].float()
    y_ref = _run(reference(tiny_path, [(canon, 1.0)]))
    assert (y - y_ref).norm() / y_ref.norm() < 0.03


@pytest.mark.parametrize(
    "key, kind",
    [
        ("lycoris_transformer_blocks_0_attn_to_q.lokr_w1", "LoKr"),
        ("transformer_blocks.0.attn.to_q.hada_w1_a", "LoHa"),
        ("transformer_blocks.0.attn.to_q.dora_scale", "DoRA"),
        ("diffusion_model.transformer_blocks.0.attn.to_q.diff", r"full-weight difference \(diff\)"),
        ("model.diffusion_model.transformer_blocks.0.attn.to_q.diff", r"full-weight difference \(diff\)"),
        ("model.diffusion_model.transformer_blocks.0.attn.to_q.diff_b", r"difference \(diff_b\)"),
        ("transformer.transformer_blocks.0.attn.to_q.lora_B.bias", "bias deltas"),
    ],
)
def test_unsupported_formats_are_named(tmp_path, key, kind):
    path = tmp_path / "x.safetensors"
    save_file({key: torch.zeros(2, 2)}, str(path))
    with pytest.raises(LoraError, match=kind):
        read_lora(path)


@pytest.mark.parametrize(
    "magnitude",
    [
        "base_model.model.transformer_blocks.0.attn.to_q.lora_magnitude_vector",  # PEFT's saved name
        "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector.weight",
        "transformer_blocks.0.attn.to_q.lora_magnitude_vector.default.weight",
    ],
)
def test_peft_dora_is_named_not_called_unknown_keys(magnitude):
    """A PEFT/diffusers DoRA: ordinary lora_A/lora_B plus a magnitude vector per module. Applying only
    the A/B part would be wrong, so it is refused, and the refusal says it is DoRA."""
    module = magnitude.split(".lora_magnitude_vector")[0]
    tensors = {
        f"{module}.lora_A.weight": torch.zeros(4, 8),
        f"{module}.lora_B.weight": torch.zeros(8, 4),
        magnitude: torch.ones(8),
    }
    with pytest.raises(LoraError, match=r"is a DoRA \(PEFT lora_magnitude_vector\) adapter"):
        parse_lora_state_dict(tensors, source="dora.safetensors")


def test_module_paths_holding_a_marker_are_not_refused():
    """Markers are a key's own parts, never a piece of its module path: the "model.diffusion_model."
    prefix holds ".diff", and it is a LoRA like any other."""
    fmt, layers = parse_lora_state_dict(
        {
            "model.diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
            "model.diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4),
            "model.diffusion_model.transformer_blocks.0.attn.to_q.alpha": torch.tensor(2.0),
        }
    )
    assert fmt == "ComfyUI/ai-toolkit"
    assert (
        list(layers) == ["transformer_blocks.0.attn.to_q"]
        and layers["transformer_blocks.0.attn.to_q"].scale == 0.5
    )


def test_unmatched_modules_are_reported_never_dropped(portable, tmp_path):
    canon = canonical_lora(2)
    canon["transformer_blocks.7.attn.to_q"] = canon["transformer_blocks.0.attn.to_q"]  # no block 7
    path = write_lora(tmp_path / "extra.safetensors", canon, "diffusers")
    with pytest.warns(UserWarning, match=r"1 modules.*transformer_blocks\.7\.attn\.to_q"):
        report = apply_loras(portable, [(path, 1.0)])
    apply_loras(portable, [])
    assert report.unmatched["extra"] == ["transformer_blocks.7.attn.to_q"]
    flux = tmp_path / "flux.safetensors"
    save_file(
        {
            "double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 8),
            "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(8, 4),
        },
        str(flux),
    )
    with pytest.raises(LoraError, match="another model"):
        apply_loras(portable, [(flux, 1.0)])


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        read_lora(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(LoraError, match="not a readable"):
        read_lora(bad)
    half = tmp_path / "half.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8)}, str(half))
    with pytest.raises(LoraError, match="needs both A and B"):
        read_lora(half)


def test_the_parse_cache_is_bounded_by_bytes_least_recently_used_first(tmp_path, monkeypatch):
    """Parsed LoRAs are kept up to LORA_CACHE_BYTES (a rank-64 LoRA parses to GiBs), never by count."""
    paths = [write_lora(tmp_path / f"{name}.safetensors", canonical_lora(1), "peft") for name in "abcd"]
    lora_mod.clear_lora_cache()
    size = lora_mod.lora_bytes(read_lora(paths[0]))
    assert size > 0
    monkeypatch.setattr(lora_mod, "LORA_CACHE_BYTES", 2 * size + size // 2)  # room for two
    lora_mod.clear_lora_cache()
    a, b = read_lora(paths[0]), read_lora(paths[1])
    assert read_lora(paths[0]) is a  # a hit makes `a` the most recently used
    c = read_lora(paths[2])  # evicts b, not a
    assert read_lora(paths[0]) is a and read_lora(paths[2]) is c
    assert read_lora(paths[1]) is not b  # parsed again, which evicts the oldest (a)
    assert lora_mod.cached_lora_bytes() == 2 * size <= lora_mod.LORA_CACHE_BYTES
    assert read_lora(paths[0]) is not a
    # A file larger than the whole budget is parsed for each use and never kept.
    monkeypatch.setattr(lora_mod, "LORA_CACHE_BYTES", size - 1)
    d = read_lora(paths[3])
    assert read_lora(paths[3]) is not d and lora_mod.cached_lora_bytes() == 0
    lora_mod.clear_lora_cache()


def test_a_file_changed_in_place_is_read_again_and_its_old_parse_dropped(tmp_path):
    path = write_lora(tmp_path / "a.safetensors", canonical_lora(1), "peft")
    lora_mod.clear_lora_cache()
    first = read_lora(path)
    write_lora(path, {k: v for k, v in list(canonical_lora(2).items())[:3]}, "peft")
    second = read_lora(path)
    assert second is not first and len(second.layers) == 3
    assert lora_mod.cached_lora_bytes() == lora_mod.lora_bytes(second)
    lora_mod.clear_lora_cache()


# -- the Nunchaku backend's layers: their packed tensors, driven through the same code ----------


class PackedSVDQ(nn.Module):
    """Holds an SVDQW4A4Linear's file tensors under Nunchaku's attribute names (no kernels needed)."""

    def __init__(self, tensors):
        super().__init__()
        for name, t in tensors.items():
            setattr(self, name, nn.Parameter(t, requires_grad=False))
        self.rank = self.proj_down.shape[1]

    def tensors(self):
        return {n: p.data for n, p in self.named_parameters()}


def test_nunchaku_svdq_lora_appends_to_the_packed_low_rank_branch():
    torch.manual_seed(0)
    weight = torch.randn(256, 128) / 128**0.5
    layer = PackedSVDQ(quantize_svdq_linear(weight, torch.zeros(256), precision="fp4", rank=16))
    original = {n: t.clone() for n, t in layer.tensors().items()}
    w0, _ = svdq_dense(layer.tensors(), "fp4")
    a, b = torch.randn(5, 128, dtype=torch.bfloat16), torch.randn(256, 5, dtype=torch.bfloat16)
    lora_mod._set_branch(layer, (a.float(), b.float()))
    assert layer.proj_down.shape == (128, 32) and layer.rank == 32  # 16 + 5, padded to 32
    w1, _ = svdq_dense(layer.tensors(), "fp4")
    assert torch.allclose(w1, w0 + b.float() @ a.float(), atol=1e-5)
    lora_mod._set_branch(layer, None)
    assert all(torch.equal(layer.tensors()[n], t) for n, t in original.items())


class PackedAWQ(nn.Module):
    """An AWQW4A16Linear's file tensors; forward gives the raw (interleaved) output, as the kernel does."""

    def __init__(self, tensors):
        super().__init__()
        for name, t in tensors.items():
            setattr(self, name, nn.Parameter(t, requires_grad=False))

    def forward(self, x):
        k = x.shape[-1]
        q = layout.unpack_awq_qweight(self.qweight).float()
        s = self.wscales[: k // 64].float().t().repeat_interleave(64, 1)
        z = self.wzeros[: k // 64].float().t().repeat_interleave(64, 1)
        return x @ (q * s + z).t() + self.bias.float()


def test_nunchaku_awq_lora_lands_in_the_right_modulation_channels():
    torch.manual_seed(0)
    layer = PackedAWQ(quantize_awq_linear(torch.randn(768, 128) * 0.05, torch.zeros(768)))
    x = torch.randn(2, 128)
    base = layout.deinterleave_modulation(layer(x).t()).t()  # what the block sees, diffusers order
    a, b = torch.randn(4, 128), torch.randn(768, 4)
    lora_mod._set_branch(layer, (a, b))
    delta = layout.deinterleave_modulation(layer(x).t()).t() - base
    expected = x @ a.bfloat16().float().t() @ b.bfloat16().float().t()
    assert (delta - expected).norm() / expected.norm() < 1e-2  # bf16 branch; wrong channels give ~1.4
    lora_mod._set_branch(layer, None)
    assert torch.equal(layout.deinterleave_modulation(layer(x).t()).t(), base)
