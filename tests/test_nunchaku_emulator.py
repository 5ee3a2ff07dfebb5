"""The kernel emulator (tests/nunchaku_emulator.py) against exact references, through Nunchaku's real code.

References are float64 and built from *dense* tensors (shared/data/svdq_layout_vectors: the originals that
Nunchaku's reference packer packed; or random layers packed here), never from the emulator's unpacking.
Two references per layer:
- "exact": no activation quantization, as `NAME.expected_output_fp32` is defined;
- "faithful": the activations fake-quantized with the kernel's rules (x̂ = bf16(bf16(x + shift) / λ), per
  token and group: int4 s = amax·(1/7) or, unsigned, amax·(1/15) stored as bf16, q = round-half-even(x̂/s)
  saturated; nvfp4 s = min(amax·(1/6), 448) stored as e4m3, q = nearest e2m1 with ties to even).

Tolerances (relative L2 error over the whole output), measured with seeds 0-2:
- emulator vs faithful < TIGHT = 1e-2. What is left is the bf16 rounding of the output and of the GEMM's
  intermediate results (2^-9 per element). Measured 2.7e-3 to 3.3e-3 for every layer and stage.
- emulator vs exact < 1.1 * err(faithful vs exact) + TIGHT, err(faithful vs exact) measured in the test:
  activation quantization is the only error the emulator may add. Measured err(faithful vs exact): int4_a
  0.144, int4_b 0.157, nvfp4_tensor 0.089, nvfp4_channel 0.094 (random inputs, no smoothing calibration);
  the data's int4 fc2 behind a GELU 0.050; fused MLPs 0.093-0.095 (int4) and 0.131-0.132 (nvfp4). The
  emulator is within 0.001 of each. Leaving out the fc2 shift gives 0.27.
- AWQ W4A16 vs exact < 1e-2 (bf16 weights q*s + z, bf16 products, bf16 output); measured 3.0e-3.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys

import nunchaku_emulator as emu
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

TIGHT = 1e-2
SHIFT = 0.171875
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BF16 = torch.bfloat16


@pytest.fixture(scope="module", autouse=True)
def _root_logger_restored():
    """Importing nunchaku configures the root logger (see test_importing_nunchaku_configures_root_logger);
    keep that from leaking into other test files."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.fixture
def nk():
    return emu.install("1.0.1")


@pytest.fixture(scope="module")
def vectors(shared_dir):
    path = shared_dir / "data" / "svdq_layout_vectors.safetensors"
    with safe_open(str(path), "pt") as f:
        cases = json.loads(f.metadata()["cases"])
    tensors = load_file(str(path))
    return {
        name: (case, {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        for name, case in cases.items()
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8 if t.element_size() == 1 else torch.int16)


# -- float64 references from dense tensors --------------------------------------------------------------


def e2m1_value(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float64)
    return table[codes.long()]


def nearest_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e2m1 value, ties to the even code, saturating at 6."""
    grid = torch.tensor(E2M1, dtype=torch.float64)
    dist = (v.abs().clamp(max=6.0)[..., None] - grid).abs()
    dist = dist + 1e-12 * (torch.arange(8) % 2)  # an exact tie goes to the even code
    return grid[dist.argmin(dim=-1)] * v.sign()


def fake_quant(xhat: torch.Tensor, fp4: bool, unsigned: bool) -> torch.Tensor:
    """Dequantized 4-bit activations of x̂ [M, K] (float64 holding 16-bit values), by the kernel's rules."""
    m, k = xhat.shape
    group = 16 if fp4 else 64
    x = xhat.reshape(m, k // group, group)
    amax = x.abs().amax(dim=-1, keepdim=True)
    # in fp32 as the kernel writes it: s = amax * (1/qmax), v = x * (1/s) (gemm_w4a4.cuh:134-137, 476-496);
    # exact ties (x = (j + 1/2) * amax / 7) go the way these fp32 roundings send them
    qmax = 6 if fp4 else 15 if unsigned else 7
    s = amax.float() * torch.tensor(1 / qmax, dtype=torch.float32)
    s = s.clamp(max=448.0) if fp4 else s
    stored = s.to(torch.float8_e4m3fn if fp4 else BF16).double()
    v = torch.where(s > 0, x.float() * torch.reciprocal(s), 0.0).double()
    q = nearest_e2m1(v) if fp4 else torch.round(v).clamp(0 if unsigned else -8, 15 if unsigned else 7)
    return (q * stored).reshape(m, k)


def residual(dense: dict[str, torch.Tensor], fp4: bool) -> torch.Tensor:
    """R [N, K] float64: int4 codes·scales, nvfp4 e2m1(codes)·micro·outer."""
    if fp4:
        micro = dense["micro_scales"].double().repeat_interleave(16, dim=1)
        return e2m1_value(dense["codes"]) * micro * dense["outer_scale"].double().reshape(-1, 1)
    return dense["codes"].double() * dense["scales"].double().repeat_interleave(64, dim=1)


def svdq_reference(
    x: torch.Tensor, dense: dict[str, torch.Tensor], fp4: bool, shift: float = 0.0, faithful: bool = False
) -> torch.Tensor:
    """((x + shift)/λ)·Rᵀ + (x·Dᵀ)·Uᵀ + bias as the data defines it; `faithful` fake-quantizes the input."""
    x = x.double()
    smooth = dense["smooth"].double()
    if faithful:
        xhat = ((x + shift).to(BF16).double() / smooth).to(BF16).double()
        main = fake_quant(xhat, fp4, unsigned=shift != 0)
    else:
        main = (x + shift) / smooth
    low_rank = (x @ dense["lora_down"].double().t()) @ dense["lora_up"].double().t()
    return main @ residual(dense, fp4).t() + low_rank + dense["bias"].double()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def svdq_cases(vectors, shifted: bool):
    for name, (case, t) in vectors.items():
        if case["kind"] == "svdq_w4a4" and (case["act_shift"] != 0) == shifted:
            yield name, case, t


def dense_parts(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("dense.") :]: v for k, v in t.items() if k.startswith("dense.")}


def linear_from_packed(nk, case: dict, t: dict[str, torch.Tensor], act_unsigned: bool = False):
    """Nunchaku's SVDQW4A4Linear with the checkpoint tensors as they are in the file."""
    from nunchaku.models.linear import SVDQW4A4Linear

    layer = SVDQW4A4Linear(
        case["k"], case["n"], rank=case["rank"], precision=case["precision"], act_unsigned=act_unsigned
    )
    for name in ("qweight", "wscales", "bias", "smooth_factor", "proj_down", "proj_up"):
        getattr(layer, name).data = t[f"packed.{name}"].clone()
    if "packed.wcscales" in t:
        layer.wcscales.data = t["packed.wcscales"].clone()
    if "packed.wtscale" in t:
        layer.wtscale = t["packed.wtscale"].item()
    return layer


# -- packing random layers (doc §3, the writer's direction; the emulator only unpacks) ---------------------


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    q = (q.to(torch.int16) & 0xF).to(torch.uint8).reshape(-1, 2)
    return (q[:, 0] | (q[:, 1] << 4)).view(torch.int8)


def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] -> int8 [N, K/2]: (nt, np, ns, nl | kt, ks, kl, j) stored as (nt, kt, np, nl, kl, ns, ks, j)."""
    n, k = codes.shape
    q = codes.reshape(n // 128, 8, 2, 8, k // 64, 2, 4, 8).permute(0, 4, 1, 3, 6, 2, 5, 7)
    return pack_nibbles(q).reshape(n, k // 2)


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """[N, G] -> [G, N] stored [N/128][G][a][b][c][d], n = a*16 + c*8 + b*2 + d."""
    n, g = scales.shape
    s = scales.t().reshape(g, n // 128, 8, 2, 4, 2).permute(1, 0, 2, 4, 3, 5)
    return s.reshape(g, n).contiguous()


def pack_vector(v: torch.Tensor) -> torch.Tensor:
    return pack_scales(v.reshape(-1, 1)).reshape(-1)


def pack_micro_scales(micro: torch.Tensor) -> torch.Tensor:
    """e4m3 [N, K/16] -> [K/16, N] stored [N/128][K/64][r][q][s][u], n = s*32 + q*8 + r, g = 4t + u."""
    n, g = micro.shape
    m = micro.view(torch.uint8).t().reshape(g // 4, 4, n // 128, 4, 4, 8).permute(2, 0, 5, 4, 3, 1)
    return m.reshape(g, n).contiguous().view(torch.float8_e4m3fn)


def pack_proj_down(down: torch.Tensor) -> torch.Tensor:
    """lora_down [R, K] -> [K, R] stored [K/16][R/16][nl][kl][np][kp][reg] (rank = np*8 + nl)."""
    r, k = down.shape
    d = down.reshape(r // 16, 2, 8, k // 16, 2, 4, 2).permute(3, 0, 2, 5, 1, 4, 6)
    return d.reshape(k, r).contiguous()


def pack_proj_up(up: torch.Tensor) -> torch.Tensor:
    """lora_up [N, R] -> [N, R] stored [N/16][R/16][nl][kl][np][kp][reg] (n = np*8 + nl)."""
    n, r = up.shape
    return up.reshape(n // 16, 2, 8, r // 16, 2, 4, 2).permute(0, 3, 2, 5, 1, 4, 6).reshape(n, r).contiguous()


def random_layer(n: int, k: int, rank: int, fp4: bool, weight_std: float, per_channel: bool = False) -> dict:
    """Dense parts of a random SVDQ layer (same keys as the data's `dense.*`), weights ~ weight_std."""
    dense = {
        "smooth": torch.empty(k).uniform_(0.5, 2.0).to(BF16),
        "bias": (torch.randn(n) * 0.1).to(BF16),
        "lora_down": (torch.randn(rank, k) / math.sqrt(k)).to(BF16),
        "lora_up": (torch.randn(n, rank) * 0.3 * weight_std * math.sqrt(k / rank)).to(BF16),  # ~0.3 x main
    }
    if fp4:
        dense["codes"] = torch.randint(0, 16, (n, k), dtype=torch.int8)
        dense["micro_scales"] = torch.empty(n, k // 16).uniform_(1.0, 4.0).to(torch.float8_e4m3fn)
        outer = torch.empty(n if per_channel else 1).uniform_(0.5, 1.0) * weight_std / 7.0
        dense["outer_scale"] = outer.to(BF16)
    else:
        dense["codes"] = torch.randint(-8, 8, (n, k), dtype=torch.int8)
        dense["scales"] = (torch.empty(n, k // 64).uniform_(0.5, 1.5) * weight_std / 4.6).to(BF16)
    return dense


def load_layer(layer, dense: dict, fp4: bool, file_bias: torch.Tensor) -> None:
    """Set a Nunchaku SVDQW4A4Linear's parameters from dense parts, packed as a checkpoint has them."""
    layer.qweight.data = pack_qweight(dense["codes"])
    if fp4:
        layer.wscales.data = pack_micro_scales(dense["micro_scales"])
        if dense["outer_scale"].numel() == 1:
            layer.wtscale = dense["outer_scale"].item()
            layer.wcscales.data = torch.ones(layer.out_features, dtype=BF16)  # as a file without wcscales
        else:
            layer.wcscales.data = pack_vector(dense["outer_scale"])
    else:
        layer.wscales.data = pack_scales(dense["scales"])
    layer.bias.data = pack_vector(file_bias)
    layer.smooth_factor.data = pack_vector(dense["smooth"])
    layer.proj_down.data = pack_proj_down(dense["lora_down"])
    layer.proj_up.data = pack_proj_up(dense["lora_up"])


def shift_bias(dense: dict, fp4: bool) -> torch.Tensor:
    """The file bias of an int4 fc2: the kernel adds 0.171875 to the main branch's input, the bias takes it
    back out (deepcompressor convert.py:49-56): bias - shift·Σ_k R/λ."""
    if fp4:
        return dense["bias"]
    shift_term = SHIFT * (residual(dense, fp4) / dense["smooth"].double()).sum(dim=1)
    return (dense["bias"].double() - shift_term).to(BF16)


# -- the packed layouts ------------------------------------------------------------------------------


def test_unpacked_weights_are_the_dense_originals_bit_for_bit(vectors):
    for name, case, t in [*svdq_cases(vectors, False), *svdq_cases(vectors, True)]:
        fp4 = case["precision"] == "nvfp4"
        assert torch.equal(emu.unpack_qweight(t["packed.qweight"], fp4).to(torch.int8), t["dense.codes"]), (
            name
        )
        if fp4:
            micro = emu.unpack_micro_scales(t["packed.wscales"])
            assert torch.equal(bits(micro.t()), bits(t["dense.micro_scales"])), name
            outer = emu.unpack_vector(t["packed.wcscales"]) if case["per_channel"] else t["packed.wtscale"]
            assert torch.equal(bits(outer), bits(t["dense.outer_scale"])), name
        else:
            assert torch.equal(bits(emu.unpack_wscales(t["packed.wscales"]).t()), bits(t["dense.scales"])), (
                name
            )
        assert torch.equal(bits(emu.unpack_vector(t["packed.bias"])), bits(t["dense.bias"])), name
        assert torch.equal(bits(emu.unpack_vector(t["packed.smooth_factor"])), bits(t["dense.smooth"])), name
        down = emu.unpack_proj_down(t["packed.proj_down"])
        assert torch.equal(bits(down.t()), bits(t["dense.lora_down"])), name
        assert torch.equal(bits(emu.unpack_proj_up(t["packed.proj_up"])), bits(t["dense.lora_up"])), name
    case, t = vectors["awq_mod"]
    n, k = case["n"], case["k"]
    # the file is in Nunchaku's interleaved order: file channel c*6 + s is diffusers channel s*n/6 + c
    interleave = torch.arange(n).reshape(6, n // 6).t().reshape(-1)
    assert torch.equal(emu.unpack_awq_qweight(t["packed.qweight"]), t["dense.codes_unsigned"][interleave])
    assert torch.equal(bits(t["packed.wscales"][: k // 64].t()), bits(t["dense.scales"][interleave]))


def test_the_test_packers_invert_the_emulators_unpacking():
    codes = torch.randint(-8, 8, (256, 512), dtype=torch.int8)
    assert torch.equal(emu.unpack_qweight(pack_qweight(codes)), codes)
    fp4_codes = torch.randint(0, 16, (128, 256), dtype=torch.int8)
    assert torch.equal(emu.unpack_qweight(pack_qweight(fp4_codes), fp4=True).to(torch.int8), fp4_codes)
    scales = torch.randn(384, 4).to(BF16)
    assert torch.equal(emu.unpack_wscales(pack_scales(scales)), scales.t())
    micro = torch.rand(256, 32).to(torch.float8_e4m3fn)
    assert torch.equal(bits(emu.unpack_micro_scales(pack_micro_scales(micro))), bits(micro.t()))
    down, up = torch.randn(48, 256).to(BF16), torch.randn(384, 48).to(BF16)
    assert torch.equal(emu.unpack_proj_down(pack_proj_down(down)), down.t())
    assert torch.equal(emu.unpack_proj_up(pack_proj_up(up)), up)


def test_e2m1_encoding_rounds_to_nearest_even_and_saturates():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.3, -5.0, 0.0, float("nan")])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.5, -4.0, 0.0, 0.0]
    assert emu.e2m1_to_float(emu.float_to_e2m1(x)).tolist() == expected


# -- Nunchaku's layers on the reference packer's data -------------------------------------------------


def test_svdq_linear_matches_the_reference_outputs(nk, vectors):
    for name, case, t in svdq_cases(vectors, False):
        fp4 = case["precision"] == "nvfp4"
        dense = dense_parts(t)
        exact = svdq_reference(t["input"], dense, fp4)
        assert rel(exact, t["expected_output_fp32"]) < 1e-6, name  # the reference is the data's definition
        faithful = svdq_reference(t["input"], dense, fp4, faithful=True)
        quant_err = rel(faithful, exact)

        y = linear_from_packed(nk, case, t)(t["input"][None])[0]

        assert y.dtype == BF16 and y.shape == (t["input"].shape[0], case["n"]), name
        assert rel(y, faithful) < TIGHT, (name, rel(y, faithful))
        assert rel(y, t["expected_output_fp32"]) < 1.1 * quant_err + TIGHT, (name, quant_err)


def test_awq_linear_matches_the_reference_output(nk, vectors):
    from nunchaku.models.linear import AWQW4A16Linear

    case, t = vectors["awq_mod"]
    n, k = case["n"], case["k"]
    layer = AWQW4A16Linear(k, n)
    for name in ("qweight", "wscales", "wzeros", "bias"):
        # the file's scale/zero rows are padded past k/64 (16 rows for k = 256); the kernel reads k/64 of them
        setattr(layer, name, torch.nn.Parameter(t[f"packed.{name}"].clone(), requires_grad=False))
    y = layer(t["input"])

    trimmed = AWQW4A16Linear(k, n)
    trimmed.load_state_dict(
        {name: t[f"packed.{name}"][: k // 64] for name in ("wscales", "wzeros")}, strict=False
    )
    trimmed.load_state_dict({name: t[f"packed.{name}"] for name in ("qweight", "bias")}, strict=False)
    assert torch.equal(trimmed(t["input"]), y)

    batch = y.shape[0]
    diffusers_order = y.double().view(batch, -1, 6).transpose(1, 2).reshape(batch, -1)
    folded_ones = torch.zeros(6, n // 6, dtype=torch.float64)
    folded_ones[[1, 4]] = 1.0  # the +1 of the two scale chunks is folded into the file's bias
    expected = t["expected_output_fp32_diffusers_order"]
    assert rel(diffusers_order - folded_ones.reshape(-1), expected) < 1e-2


def test_fused_mlp_shift_path_feeds_the_reference_fc2(nk, vectors):
    """The data's int4 fc2 (its bias compensates the 0.171875 shift) behind an fc1 and a GELU, through
    `fused_gelu_mlp`: fc2's input is quantized by the GEMM's epilogue, shifted and unsigned."""
    from nunchaku.models.linear import SVDQW4A4Linear
    from nunchaku.ops.fused import fused_gelu_mlp

    (name, case, t), *_ = svdq_cases(vectors, True)
    fc2_dense = dense_parts(t)
    # the data's definition: shift before smoothing, on the main branch only
    exact_on_data = svdq_reference(t["input"], fc2_dense, fp4=False, shift=SHIFT)
    assert rel(exact_on_data, t["expected_output_fp32"]) < 1e-6

    fc1_dense = random_layer(case["k"], 256, 32, fp4=False, weight_std=0.08)
    fc1 = SVDQW4A4Linear(256, case["k"], rank=32)
    load_layer(fc1, fc1_dense, fp4=False, file_bias=fc1_dense["bias"])
    fc2 = linear_from_packed(nk, case, t, act_unsigned=True)
    x = torch.randn(1, 300, 256).to(BF16)

    y = fused_gelu_mlp(x, fc1, fc2)[0]

    g = gelu_tanh(fc1(x)[0].double()).to(BF16).double()  # fc1 was checked on its own above
    exact = svdq_reference(g, fc2_dense, fp4=False, shift=SHIFT)
    faithful = svdq_reference(g, fc2_dense, fp4=False, shift=SHIFT, faithful=True)
    assert rel(y, faithful) < TIGHT, rel(y, faithful)
    assert rel(y, exact) < 1.1 * rel(faithful, exact) + TIGHT
    assert rel(y, svdq_reference(g, fc2_dense, fp4=False)) > 10 * TIGHT  # without the shift: wrong


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_nunchaku_feed_forward_equals_an_unfused_float64_mlp(nk, precision):
    from diffusers.models.attention import FeedForward
    from nunchaku.models.attention import NunchakuFeedForward

    fp4 = precision == "nvfp4"
    dim, hidden, rank = 256, 1024, 32
    fc1_dense = random_layer(hidden, dim, rank, fp4, weight_std=0.08, per_channel=True)
    fc2_dense = random_layer(dim, hidden, rank, fp4, weight_std=0.05)
    with torch.device("meta"):
        ff = FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate").to(BF16)
    mlp = NunchakuFeedForward(ff, precision=precision, rank=rank).to_empty(device="cpu")
    fc1, fc2 = mlp.net[0].proj, mlp.net[2]
    assert fc2.act_unsigned == (not fp4)
    load_layer(fc1, fc1_dense, fp4, file_bias=fc1_dense["bias"])
    load_layer(fc2, fc2_dense, fp4, file_bias=shift_bias(fc2_dense, fp4))
    x = torch.randn(2, 150, dim).to(BF16)  # 300 tokens: the kernels pad M to 512

    y = mlp(x)

    assert y.shape == x.shape and y.dtype == BF16
    y, flat = y.reshape(-1, dim), x.reshape(-1, dim)
    fc2_file = dict(fc2_dense, bias=shift_bias(fc2_dense, fp4))
    shift = 0.0 if fp4 else SHIFT
    # Stage by stage: fc1 alone (unfused), then the fused epilogue and fc2 from fc1's actual output. (A
    # chained faithful reference is looser: one bf16 step of difference in g flips fc2's quantization.)
    y1 = fc1(x).reshape(-1, hidden)
    assert rel(y1, svdq_reference(flat, fc1_dense, fp4, faithful=True)) < TIGHT
    g = gelu_tanh(y1.double()).to(BF16).double()
    faithful = svdq_reference(g, fc2_file, fp4, shift=shift, faithful=True)
    assert rel(y, faithful) < TIGHT, rel(y, faithful)
    # End to end against the unfused float64 MLP: W_eff = R/λ + U·D, fc2's true bias (the file's plus the
    # shift term); the error may not exceed what activation quantization of both layers explains.
    exact = svdq_reference(gelu_tanh(svdq_reference(flat, fc1_dense, fp4)), fc2_file, fp4, shift=shift)
    g_faithful = gelu_tanh(svdq_reference(flat, fc1_dense, fp4, faithful=True)).to(BF16).double()
    quant_err = rel(svdq_reference(g_faithful, fc2_file, fp4, shift=shift, faithful=True), exact)
    assert rel(y, exact) < 1.1 * quant_err + TIGHT, (rel(y, exact), quant_err)


def test_the_qwen_image_block_runs_on_cpu(nk):
    """Nunchaku's own block (AWQ modulation, fused q/k/v, joint attention, fused MLPs) on the emulator."""
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
    from nunchaku.models.linear import AWQW4A16Linear, SVDQW4A4Linear
    from nunchaku.models.transformers.transformer_qwenimage import NunchakuQwenImageTransformerBlock

    with torch.device("meta"):
        block = QwenImageTransformerBlock(dim=256, num_attention_heads=2, attention_head_dim=128).to(BF16)
    block = NunchakuQwenImageTransformerBlock(block, scale_shift=0, precision="int4", rank=32)
    block = block.to_empty(device="cpu")
    for module in block.modules():
        if isinstance(module, SVDQW4A4Linear):
            dense = random_layer(module.out_features, module.in_features, 32, fp4=False, weight_std=0.05)
            bias = shift_bias(dense, fp4=False) if module.act_unsigned else dense["bias"]
            load_layer(module, dense, fp4=False, file_bias=bias)
        elif isinstance(module, AWQW4A16Linear):
            module.qweight.data = torch.randint(-(2**31), 2**31 - 1, module.qweight.shape, dtype=torch.int32)
            module.wscales.data.fill_(0.002)
            module.wzeros.data.fill_(-0.014)
            module.bias.data.normal_(0, 0.1)
        else:  # the q/k RMSNorms: the only other parameters
            for name, param in module.named_parameters(recurse=False):
                param.data.fill_(1.0 if name == "weight" else 0.0)
    img, txt = torch.randn(1, 64, 256).to(BF16), torch.randn(1, 7, 256).to(BF16)
    freqs = (
        torch.polar(torch.ones(64, 64), torch.rand(64, 64)),
        torch.polar(torch.ones(7, 64), torch.rand(7, 64)),
    )

    txt_out, img_out = block(img, txt, None, torch.randn(1, 256).to(BF16), image_rotary_emb=freqs)

    assert img_out.shape == img.shape and txt_out.shape == txt.shape
    assert img_out.isfinite().all() and txt_out.isfinite().all()
    assert rel(img_out, img) > 1e-2  # the block did something


# -- the C++ asserts ----------------------------------------------------------------------------------


def gemm_call(m: int = 256, n: int = 128, k: int = 128, rank: int = 16, fp4: bool = False) -> dict:
    """Valid arguments of ops.gemm_w4a4 for a plain linear layer (all-zero data)."""
    group = 16 if fp4 else 64
    scale_dtype = torch.float8_e4m3fn if fp4 else BF16
    return dict(
        act=torch.zeros(m, k // 2, dtype=torch.uint8),
        wgt=torch.zeros(n, k // 2, dtype=torch.int8),
        out=torch.empty(m, n, dtype=BF16),
        ascales=torch.ones(k // group, m, dtype=scale_dtype),
        wscales=torch.ones(k // group, n, dtype=scale_dtype),
        lora_act_in=torch.zeros(m, rank, dtype=torch.float32),
        lora_up=torch.zeros(n, rank, dtype=BF16),
        bias=torch.zeros(n, dtype=BF16),
        fp4=fp4,
        wcscales=torch.ones(n, dtype=BF16) if fp4 else None,
    )


def run_gemm(**changes):
    from nunchaku.ops.gemm import svdq_gemm_w4a4_cuda

    fp4 = changes.pop("fp4", False)
    args = gemm_call(fp4=fp4)
    args.update(changes)
    svdq_gemm_w4a4_cuda(**args)
    return args


def test_a_valid_gemm_call_passes(nk):
    assert torch.equal(run_gemm()["out"], torch.zeros(256, 128, dtype=BF16))
    run_gemm(fp4=True, alpha=0.5)
    big = dict(lora_act_in=torch.zeros(256, 1024), lora_up=torch.zeros(128, 1024, dtype=BF16))
    run_gemm(**big)  # rank 1024 = MAX_RANK is the largest that fits


def test_lora_scales_weigh_each_group_of_16_ranks(nk):
    """lora.cuh:154: lora_act[:, r] * scales[r / 16], and a missing scale counts as 0 (launch:222-224).
    (Nunchaku's wrapper passes ones when given none, ops/gemm.py:125-127.)"""
    lora_act = torch.tensor([1.0, 2.0, 4.0]).repeat_interleave(16).expand(256, 48).contiguous()
    lora_up = torch.ones(128, 48, dtype=BF16)  # packed or not, all ones
    for scales, expected in (([1.0, 0.5, 0.25], 16 * 3.0), ([2.0], 16 * 2.0), (None, 16 * 7.0)):
        out = run_gemm(lora_act_in=lora_act, lora_up=lora_up, lora_scales=scales)["out"]
        assert torch.all(out == expected), scales


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # lora.cuh:41, std::array<float, MAX_RANK / 16>: rank 1040 overflows it
        (
            dict(lora_act_in=torch.zeros(256, 1040), lora_up=torch.zeros(128, 1040, dtype=BF16)),
            "rank_up <= MAX_RANK",
        ),
        (dict(alpha=2.0), r"alpha == 1\.0f"),
        (dict(ascales=torch.ones(2, 256, dtype=torch.float8_e4m3fn)), r"ascales\.dtype\(\) is FP16 or BF16"),
        (dict(fp4=True, ascales=torch.ones(8, 256, dtype=BF16)), r"ascales\.dtype\(\) == Tensor::FP8_E4M3"),
        (
            dict(wgt=torch.zeros(192, 64, dtype=torch.int8), lora_up=torch.zeros(192, 16, dtype=BF16)),
            "N % BLOCK_N",
        ),
        (
            dict(act=torch.zeros(200, 64, dtype=torch.uint8), out=torch.empty(200, 128, dtype=BF16)),
            "M % BLOCK_M",
        ),
        (dict(wgt=torch.zeros(128, 128, dtype=torch.int8)), r"K == wgt\.shape\[1\] \* 2"),
        (
            dict(lora_act_in=torch.zeros(256, 24), lora_up=torch.zeros(128, 24, dtype=BF16)),
            "rank_up % 16 == 0",
        ),
        (dict(lora_act_in=torch.zeros(512, 16)), r"lora_act_in\.shape\[0\] == M"),
        (dict(lora_act_in=None), r"lora_up\.valid\(\) == lora_act_in\.valid\(\)"),
        (dict(bias=torch.zeros(256, dtype=BF16)), r"bias\.numel\(\) == N"),
        (dict(fp4=True, wcscales=torch.ones(64, dtype=BF16)), r"wcscales\.numel\(\) == N"),
        (dict(wcscales=torch.ones(128, dtype=BF16)), "int4 has no wcscales"),
        (dict(fp4=True, act_unsigned=True), "!act_unsigned"),
        (dict(out=torch.empty(256, 256, dtype=BF16)[:, :128]), r"out\.is_contiguous\(\)"),
        (dict(out=torch.empty(256, 128, dtype=torch.float16)), "out is half_t"),
    ],
)
def test_gemm_asserts_fire(nk, changes, message):
    with pytest.raises(AssertionError, match=message):
        run_gemm(**changes)


def test_fused_gemm_checks_the_next_layers_buffers(nk):
    fused = dict(
        qout=torch.empty(256, 64, dtype=torch.uint8),
        oscales=torch.empty(2, 256, dtype=BF16),
        smooth_factor=torch.ones(128, dtype=BF16),
        lora_down=torch.zeros(128, 16, dtype=BF16),
        lora_act_out=torch.zeros(256, 16),
    )
    run_gemm(**fused)
    with pytest.raises(AssertionError, match=r"oscales\.numel\(\) == M \* N / WARP_K"):
        run_gemm(**dict(fused, oscales=torch.empty(1, 256, dtype=BF16)))
    with pytest.raises(AssertionError, match="isTypeMatch<half_t>"):
        run_gemm(**dict(fused, oscales=torch.empty(2, 256, dtype=torch.float16)))
    with pytest.raises(AssertionError, match=r"lora_act_out\.shape\[1\] == rank_down"):
        run_gemm(**dict(fused, lora_act_out=torch.zeros(256, 32)))


def test_quantize_asserts_fire(nk):
    from nunchaku.ops.quantize import svdq_quantize_w4a4_act_fuse_lora_cuda as quantize

    x, smooth = torch.randn(5, 256).to(BF16), torch.ones(256, dtype=BF16)
    act, ascales, lora_act = quantize(x, lora_down=torch.zeros(256, 16, dtype=BF16), smooth=smooth)
    assert act.shape == (256, 128) and ascales.shape == (4, 256) and lora_act.shape == (256, 16)
    with pytest.raises(AssertionError, match="rank % 16 == 0"):
        quantize(x, lora_down=torch.zeros(256, 8, dtype=BF16), smooth=smooth)
    with pytest.raises(AssertionError, match=r"lora_down\.shape\[0\] == N"):
        quantize(x, lora_down=torch.zeros(128, 16, dtype=BF16), smooth=smooth)
    with pytest.raises(AssertionError, match="FP8_E4M3"):
        quantize(x, lora_down=torch.zeros(256, 16, dtype=BF16), smooth=smooth, fp4=True, oscales=ascales)
    with pytest.raises(AssertionError, match=r"output\.shape\[-1\] == N / 2"):
        quantize(
            torch.randn(5, 192).to(BF16), lora_down=torch.zeros(192, 16, dtype=BF16), smooth=smooth[:192]
        )


def test_gemv_asserts_fire(nk):
    from nunchaku.ops.gemv import awq_gemv_w4a16_cuda as gemv

    qweight = torch.zeros(32, 64, dtype=torch.int32)
    scales, zeros = torch.ones(2, 128, dtype=BF16), torch.zeros(2, 128, dtype=BF16)
    assert gemv(torch.randn(8, 128).to(BF16), qweight, scales, zeros, 8, 128, 128).shape == (8, 128)
    with pytest.raises(AssertionError, match="m <= 8"):
        gemv(torch.randn(9, 128).to(BF16), qweight, scales, zeros, 9, 128, 128)
    with pytest.raises(AssertionError, match="group_size == GROUP_SIZE"):
        gemv(torch.randn(1, 128).to(BF16), qweight, scales, zeros, 1, 128, 128, group_size=128)
    with pytest.raises(AssertionError, match="isTypeMatch<half_t>"):
        gemv(torch.randn(1, 128).half(), qweight, scales, zeros, 1, 128, 128)


def test_unused_features_and_other_entry_points_are_not_emulated(nk):
    from nunchaku._C import QuantizedFluxModel, ops, utils

    with pytest.raises(NotImplementedError, match="norm_q"):
        run_gemm(norm_q=torch.ones(128, dtype=BF16))
    with pytest.raises(NotImplementedError, match="fuse_silu"):
        run_gemm(fuse_silu=True)
    with pytest.raises(NotImplementedError, match="fuse_glu"):
        ops.quantize_w4a4_act_fuse_lora(None, None, None, None, None, None, True, False)
    for call in (QuantizedFluxModel, ops.gemm_awq, ops.attention_fp16, utils.set_log_level):
        with pytest.raises(NotImplementedError, match="not emulated"):
            call()


# -- install ----------------------------------------------------------------------------------------


def test_both_releases_import_through_install():
    try:
        for version in ("1.1.0", "1.0.1"):
            package = emu.install(version)
            assert emu.install(version) is package  # a second install is a no-op
            from nunchaku.__version__ import __version__
            from nunchaku.models.linear import SVDQW4A4Linear

            assert __version__ == version
            assert package.NunchakuQwenImageTransformer2DModel
            assert str(emu.package_root(version)) in sys.path
            assert SVDQW4A4Linear.__module__ == "nunchaku.models.linear"
            assert str(emu.package_root(version)) in sys.modules["nunchaku.models.linear"].__file__
            assert sys.modules["nunchaku._C"].ops.gemm_w4a4 is emu.gemm_w4a4
        emu.uninstall()
        assert not [name for name in sys.modules if name == "nunchaku" or name.startswith("nunchaku.")]
        assert str(emu.package_root("1.0.1")) not in sys.path
    finally:
        emu.install("1.0.1")


def test_importing_nunchaku_configures_root_logger():
    """Not hidden by the emulator: nunchaku calls logging.basicConfig at import (first in
    models/text_encoders/t5_encoder.py:24, then lora/flux/*, models/transformers/utils.py and
    transformer_flux.py), which gives a bare root logger a stderr handler at LOG_LEVEL (default INFO)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    emu.uninstall()
    root.handlers[:] = []
    try:
        emu.install("1.0.1")
        assert [type(h) for h in root.handlers] == [logging.StreamHandler]
        assert root.level == getattr(logging, os.getenv("LOG_LEVEL", "INFO").upper(), logging.INFO)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
