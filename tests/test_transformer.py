"""The SVDQ transformer: checkpoint spec vs the real files' manifests, the writer, and load_transformer."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from twins import dense_twin, forward_inputs

from qwen_edit.hardware import DeviceInfo, UnsupportedHardwareError
from qwen_edit.header import DTYPES
from qwen_edit.model import build_model
from qwen_edit.nunchaku_backend import NunchakuStatus
from qwen_edit.svdq import expected_tensors, read_checkpoint, svdq_dense
from qwen_edit.svdq.checkpoint import FUSED_PARTS, CheckpointError, quantized_layer_kinds
from qwen_edit.testing.transformer import (
    TINY_TRANSFORMER_CONFIG,
    quantize_svdq_linear,
    tiny_reference_transformer,
    write_tiny_transformer,
)
from qwen_edit.transformer import (
    NunchakuUnavailableError,
    choose_backend,
    choose_compute,
    load_transformer,
)

MANIFESTS = ["svdq_fp4_r128", "svdq_fp4_r32", "svdq_int4_r128", "svdq_int4_r32"]


def _manifest(shared_dir, name):
    return json.loads((shared_dir / "data" / "manifests" / f"{name}_qwen_image_edit_2509.json").read_text())


@pytest.mark.parametrize("name", MANIFESTS)
def test_spec_equals_real_file_manifest(shared_dir, name):
    manifest = _manifest(shared_dir, name)
    meta = manifest["metadata_parsed"]
    precision = "fp4" if "fp4" in meta["quantization_config"]["weight"]["dtype"] else "int4"
    spec = expected_tensors(meta["config"], precision, meta["quantization_config"]["rank"])
    real = {k: (tuple(v["shape"]), DTYPES[v["dtype"]]) for k, v in manifest["tensors"].items()}
    assert spec == real


@pytest.mark.parametrize("name", ["svdq_fp4_r128", "svdq_int4_r32"])
def test_every_manifest_tensor_maps_onto_the_real_model(shared_dir, name):
    """Built from the real config on the meta device: each tensor has a home of the right size."""
    manifest = _manifest(shared_dir, name)
    config = manifest["metadata_parsed"]["config"]
    reference = _meta_diffusers_model(config)
    model = build_model(config)
    params = dict(model.named_parameters())
    kinds = quantized_layer_kinds(config["num_layers"], "int4")
    covered = set()
    for key, entry in manifest["tensors"].items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in kinds:
            # The quantized layer replaces diffusers Linear(s): check its in/out sizes against them.
            block, _, layer = prefix.partition(".")[2].partition(".")
            parts = FUSED_PARTS.get(layer, (layer,))
            linears = [reference.get_submodule(f"transformer_blocks.{block}.{p}") for p in parts]
            n, k = sum(lin.out_features for lin in linears), linears[0].in_features
            if leaf == "qweight":
                expected = [n, k // 2] if entry["dtype"] == "I8" else [n // 4, k // 2]
                assert entry["shape"] == expected, key
            elif leaf in ("proj_down", "smooth_factor", "smooth_factor_orig"):
                assert entry["shape"][0] == k, key
            elif leaf in ("proj_up", "bias", "wcscales"):
                assert entry["shape"][0] == n, key
            covered.update(f"transformer_blocks.{block}.{p}.{w}" for p in parts for w in ("weight", "bias"))
        else:
            assert list(params[key].shape) == entry["shape"], key
            covered.add(key)
    assert set(dict(reference.named_parameters())) == covered  # nothing left unfilled


def _meta_diffusers_model(config):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return QwenImageTransformer2DModel.from_config({k: v for k, v in config.items() if k[0] != "_"})


@pytest.fixture(scope="module", params=["int4", "fp4"])
def tiny_file(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("svdq") / f"tiny_{request.param}.safetensors"
    return request.param, write_tiny_transformer(path, precision=request.param, rank=16)


def test_writer_output_matches_the_real_layout(tiny_file):
    precision, path = tiny_file
    ckpt = read_checkpoint(path)
    assert (ckpt.precision, ckpt.rank) == (precision, 16)
    assert ckpt.tensors == expected_tensors(TINY_TRANSFORMER_CONFIG, precision, 16)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["model_class"] == "NunchakuQwenImageTransformer2DModel"
    quant = json.loads(meta["quantization_config"])
    assert quant["weight"]["dtype"] == {"int4": "int4", "fp4": "fp4_e2m1_all"}[precision]
    assert quant["rank"] == 16
    assert json.loads(meta["config"])["num_layers"] == 2


@pytest.mark.parametrize("precision", ["int4", "fp4"])
def test_quantize_then_dequantize_recovers_the_weight(precision):
    torch.manual_seed(0)
    weight = torch.randn(256, 512) / 512**0.5
    weight[:, 3] *= 20  # an outlier channel, which smoothing and the low-rank branch must absorb
    bias = torch.randn(256) * 0.1
    for shift in (0.0, 0.171875) if precision == "int4" else (0.0,):
        packed = quantize_svdq_linear(weight, bias, precision=precision, rank=32, act_shift=shift)
        w, b = svdq_dense(packed, precision, shift)
        assert (w - weight).norm() / weight.norm() < 0.12
        assert (b - bias).abs().max() < 2e-2  # bf16 storage of the bias, after the shift compensation


@torch.no_grad()
def test_portable_forward_matches_dense_diffusers_model(tiny_file):
    precision, path = tiny_file
    model = load_transformer(path, backend="portable", compute="bf16", device="cpu", dtype=torch.float32)
    assert model.qwen_edit_info.backend == "portable"
    inputs = forward_inputs(batch=2)
    y = model(**inputs)[0]
    y_dense = dense_twin(path)(**inputs)[0]
    # float32 end to end, same weights: only summation order differs (fused vs separate q/k/v GEMMs).
    assert (y - y_dense).abs().max() < 1e-4 * y_dense.abs().max()
    # Against the unquantized model: the 4-bit quantization error of rank-16 SVDQ on random weights.
    y_orig = tiny_reference_transformer()(**inputs)[0]
    assert (y - y_orig).norm() / y_orig.norm() < 0.1


@torch.no_grad()
def test_bf16_and_fp8_modes_error_is_bounded(tiny_file):
    precision, path = tiny_file
    inputs = forward_inputs()
    reference = load_transformer(path, backend="portable", compute="bf16", device="cpu", dtype=torch.float32)
    y_ref = reference(**inputs)[0]
    errors = {}
    for compute in ("bf16", "fp8"):
        model = load_transformer(
            path, backend="portable", compute=compute, device="cpu", dtype=torch.bfloat16
        )
        bf16_inputs = {
            **inputs,
            "hidden_states": inputs["hidden_states"].bfloat16(),
            "encoder_hidden_states": inputs["encoder_hidden_states"].bfloat16(),
        }
        y = model(**bf16_inputs)[0].float()
        errors[compute] = ((y - y_ref).norm() / y_ref.norm()).item()
    # bf16 activations through 2 blocks: ~1e-2; fp8 weights+activations (3-bit mantissa): a few 1e-2.
    assert errors["bf16"] < 0.03, errors
    assert errors["fp8"] < 0.1, errors
    assert errors["fp8"] > errors["bf16"]  # fp8 really quantizes (the mode is not silently bf16)


def test_fp8_mode_halves_the_weight_bytes(tiny_file):
    _, path = tiny_file
    sizes = {}
    for compute in ("bf16", "fp8"):
        model = load_transformer(path, backend="portable", compute=compute, device="cpu")
        sizes[compute] = sum(
            p.numel() * p.element_size()
            for n, p in model.named_parameters()
            if n.startswith("transformer_blocks")
        )
    assert sizes["fp8"] < 0.52 * sizes["bf16"]


def _rewrite(path, tmp_path, edit):
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    edit(tensors)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return out


def test_missing_unexpected_and_misshapen_tensors_are_named(tiny_file, tmp_path):
    _, path = tiny_file
    missing = _rewrite(path, tmp_path, lambda t: t.pop("transformer_blocks.1.img_mlp.net.2.qweight"))
    with pytest.raises(
        CheckpointError, match=r"1 tensors missing.*transformer_blocks\.1\.img_mlp\.net\.2\.qweight"
    ):
        load_transformer(missing, backend="portable", device="cpu")
    extra = _rewrite(
        path, tmp_path, lambda t: t.update({"transformer_blocks.0.attn.to_q.lora_A": torch.zeros(2)})
    )
    with pytest.raises(CheckpointError, match=r"no place for: transformer_blocks\.0\.attn\.to_q\.lora_A"):
        load_transformer(extra, backend="portable", device="cpu")
    wrong = _rewrite(
        path, tmp_path, lambda t: t.update({"proj_out.bias": torch.zeros(3, dtype=torch.bfloat16)})
    )
    with pytest.raises(CheckpointError, match=r"proj_out\.bias is \(3,\)"):
        load_transformer(wrong, backend="portable", device="cpu")


def test_wrong_or_missing_file_gets_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="svdq-fp4_r128"):
        load_transformer(tmp_path / "nope.safetensors", device="cpu")
    vae_like = tmp_path / "vae.safetensors"
    save_file({"decoder.conv1.weight": torch.zeros(2, 2)}, str(vae_like))
    with pytest.raises(CheckpointError, match="text encoder or VAE"):
        load_transformer(vae_like, device="cpu")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_transformer(junk, device="cpu")


def _card(name, capability):
    return DeviceInfo(torch.device("cuda", 0), name, capability, 32 << 30)


OK, MISSING = NunchakuStatus("ok", "1.0.1"), NunchakuStatus("missing")


def test_backend_choice_per_card():
    rtx5090, rtx4090, h100 = _card("RTX 5090", (12, 0)), _card("RTX 4090", (8, 9)), _card("H100", (9, 0))
    assert choose_backend("auto", rtx5090, "fp4", OK)[0] == "nunchaku"
    assert choose_backend("auto", rtx4090, "int4", OK)[0] == "nunchaku"
    assert choose_backend("auto", h100, "fp4", OK)[0] == "portable"
    assert choose_backend("auto", rtx5090, "fp4", MISSING)[0] == "portable"
    cpu = DeviceInfo(torch.device("cpu"), "cpu", None, None)
    assert choose_backend("auto", cpu, "int4", MISSING)[0] == "portable"
    # The wrong precision for the card: the error names the card, the file's precision and the fixes.
    with pytest.raises(
        UnsupportedHardwareError, match=r"RTX 5090 \(SM 120\).*this file is int4.*svdq-fp4_r128.*portable"
    ):
        choose_backend("auto", rtx5090, "int4", OK)
    with pytest.raises(UnsupportedHardwareError, match=r"H100 \(SM 90\) has no Nunchaku.*backend='portable'"):
        choose_backend("nunchaku", h100, "fp4", OK)
    with pytest.raises(NunchakuUnavailableError, match="github.com/nunchaku-tech/nunchaku/releases"):
        choose_backend("nunchaku", rtx5090, "fp4", MISSING)
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("fast", h100, "fp4", MISSING)
    assert choose_compute("auto", h100) == "fp8"
    assert choose_compute("auto", _card("A100", (8, 0))) == "bf16"
    assert choose_compute("auto", cpu) == "bf16"


def test_auto_on_this_machine_without_nunchaku_is_portable(tiny_file):
    _, path = tiny_file
    model = load_transformer(path, device="cpu")
    assert model.qwen_edit_info.backend == "portable"
    assert model.qwen_edit_info.compute == "bf16"


def test_fused_mlp_forward_falls_back_to_diffusers_off_the_gpu(tiny_file):
    """The fused fp8 MLP only runs on CUDA (Triton kernel); elsewhere its forward is diffusers' own."""
    _, path = tiny_file
    import types

    from qwen_edit.model import _fused_fp8_mlp

    model = load_transformer(path, backend="portable", compute="fp8", device="cpu")
    mlp = model.transformer_blocks[0].img_mlp
    assert "forward" not in mlp.__dict__  # not fused on a CPU
    x = torch.randn(1, 5, mlp.net[0].proj.in_features, dtype=torch.bfloat16)
    expected = mlp(x)
    mlp.forward = types.MethodType(_fused_fp8_mlp, mlp)
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)
