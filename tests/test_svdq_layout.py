"""Pack/unpack against layers packed by Nunchaku's reference packer (shared/data/svdq_layout_vectors)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qwen_edit.svdq import AWQLinear, SVDQLinear, awq_dense, layout, svdq_dense


@pytest.fixture(scope="module")
def vectors(shared_dir):
    path = shared_dir / "data" / "svdq_layout_vectors.safetensors"
    with safe_open(str(path), "pt") as f:
        cases = json.loads(f.metadata()["cases"])
    return cases, load_file(str(path))


def _case(vectors, kind):
    cases, tensors = vectors
    for name, case in cases.items():
        if case["kind"] == kind:
            yield name, case, {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t.view(torch.int16)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def test_every_case_is_covered(vectors):
    cases, _ = vectors
    kinds = {
        (c["kind"], c.get("precision"), c.get("per_channel"), c.get("act_shift", 0) != 0)
        for c in cases.values()
    }
    # int4 plain and fc2-shifted, nvfp4 per-tensor and per-channel, AWQ: all present in the data.
    assert len(kinds) == 5


def test_svdq_unpack_and_pack_match_reference_packer(vectors):
    for name, case, t in _case(vectors, "svdq_w4a4"):
        signed = case["precision"] == "int4"
        assert torch.equal(layout.unpack_qweight(t["packed.qweight"], signed), t["dense.codes"]), name
        assert _same_bits(layout.pack_qweight(t["dense.codes"]), t["packed.qweight"]), name
        if signed:
            assert torch.equal(layout.unpack_scales(t["packed.wscales"]), t["dense.scales"]), name
            assert _same_bits(layout.pack_scales(t["dense.scales"]), t["packed.wscales"]), name
        else:
            assert _same_bits(layout.unpack_micro_scales(t["packed.wscales"]), t["dense.micro_scales"]), name
            assert _same_bits(layout.pack_micro_scales(t["dense.micro_scales"]), t["packed.wscales"]), name
            if case["per_channel"]:
                assert _same_bits(layout.unpack_vector(t["packed.wcscales"]), t["dense.outer_scale"]), name
                assert _same_bits(layout.pack_vector(t["dense.outer_scale"]), t["packed.wcscales"]), name
            else:
                assert _same_bits(t["packed.wtscale"], t["dense.outer_scale"]), name
        for packed, dense in (("bias", "bias"), ("smooth_factor", "smooth")):
            assert _same_bits(layout.unpack_vector(t[f"packed.{packed}"]), t[f"dense.{dense}"]), name
            assert _same_bits(layout.pack_vector(t[f"dense.{dense}"]), t[f"packed.{packed}"]), name
        assert _same_bits(layout.unpack_proj_down(t["packed.proj_down"]), t["dense.lora_down"]), name
        assert _same_bits(layout.pack_proj_down(t["dense.lora_down"]), t["packed.proj_down"]), name
        assert _same_bits(layout.unpack_proj_up(t["packed.proj_up"]), t["dense.lora_up"]), name
        assert _same_bits(layout.pack_proj_up(t["dense.lora_up"]), t["packed.proj_up"]), name


def test_awq_unpack_and_pack_match_reference_packer(vectors):
    for name, case, t in _case(vectors, "awq_w4a16_adanorm"):
        file_order = layout.interleave_modulation(t["dense.codes_unsigned"])
        assert torch.equal(layout.unpack_awq_qweight(t["packed.qweight"]), file_order), name
        assert _same_bits(layout.pack_awq_qweight(file_order), t["packed.qweight"]), name
        groups = case["k"] // 64
        assert t["packed.wscales"].shape[0] == layout.awq_group_rows(case["k"])
        dense_scales = layout.interleave_modulation(t["dense.scales"])
        assert _same_bits(t["packed.wscales"][:groups].t().contiguous(), dense_scales.contiguous()), name


def test_svdq_dense_reproduces_expected_outputs(vectors):
    # Expected outputs were computed in float64 from the dense originals and stored as float32, so
    # the only error left is the float32 rounding of the stored result (~1e-7 relative).
    for name, case, t in _case(vectors, "svdq_w4a4"):
        precision = {"int4": "int4", "nvfp4": "fp4"}[case["precision"]]
        tensors = {k[len("packed.") :]: v for k, v in t.items() if k.startswith("packed.")}
        weight, bias = svdq_dense(tensors, precision, case["act_shift"])
        y = t["input"].double() @ weight.double().t() + bias.double()
        expected = t["expected_output_fp32"].double()
        assert (y - expected).abs().max() <= 1e-6 * expected.abs().max(), name


def test_svdq_fc2_shift_is_not_optional(vectors):
    name, case, t = next(c for c in _case(vectors, "svdq_w4a4") if c[1]["act_shift"])
    tensors = {k[len("packed.") :]: v for k, v in t.items() if k.startswith("packed.")}
    weight, bias = svdq_dense(tensors, "int4", 0.0)  # forgetting the shift
    y = t["input"].double() @ weight.double().t() + bias.double()
    assert (y - t["expected_output_fp32"].double()).abs().max() > 1e-2


def test_awq_dense_reproduces_expected_outputs(vectors):
    for name, _, t in _case(vectors, "awq_w4a16_adanorm"):
        tensors = {k[len("packed.") :]: v for k, v in t.items() if k.startswith("packed.")}
        weight, bias = awq_dense(tensors)
        y = t["input"].double() @ weight.double().t() + bias.double()
        expected = t["expected_output_fp32_diffusers_order"].double()
        assert (y - expected).abs().max() <= 1e-6 * expected.abs().max(), name


@pytest.mark.parametrize("compute, tolerance", [("bf16", 5e-3), ("fp8", 6e-2)])
def test_layers_match_expected_outputs(vectors, compute, tolerance):
    # bf16: the effective weight and the input are rounded to bf16 (8 bits of mantissa, ~2e-3 relative
    # per output). fp8: e4m3 weights and per-token activations (3 bits of mantissa, ~3.5e-2 measured).
    for name, case, t in _case(vectors, "svdq_w4a4"):
        precision = {"int4": "int4", "nvfp4": "fp4"}[case["precision"]]
        tensors = {k[len("packed.") :]: v for k, v in t.items() if k.startswith("packed.")}
        layer = SVDQLinear.from_packed(
            tensors, precision=precision, act_shift=case["act_shift"], compute=compute
        )
        expected = t["expected_output_fp32"]
        error = (layer(t["input"]).float() - expected).norm() / expected.norm()
        assert error < tolerance, (name, compute, error)
    for name, _, t in _case(vectors, "awq_w4a16_adanorm"):
        tensors = {k[len("packed.") :]: v for k, v in t.items() if k.startswith("packed.")}
        layer = AWQLinear.from_packed(tensors, compute=compute)
        expected = t["expected_output_fp32_diffusers_order"]
        error = (layer(t["input"]).float() - expected).norm() / expected.norm()
        assert error < tolerance, (name, compute, error)


def test_e2m1_rounding_is_nearest_even_and_saturates():
    x = torch.tensor([0.2, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.3, -5.0, -100.0])
    expected = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.5, -4.0, -6.0])
    assert torch.equal(layout.e2m1_to_float(layout.float_to_e2m1(x)), expected)


def test_layouts_reject_untileable_shapes():
    with pytest.raises(ValueError, match="out % 128"):
        layout.pack_qweight(torch.zeros(100, 128, dtype=torch.int8))
