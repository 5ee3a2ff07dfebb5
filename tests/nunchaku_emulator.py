"""A CPU stand-in for Nunchaku's compiled extension `nunchaku._C`: Nunchaku's real Python code runs in CI.

`install()` registers an emulated `nunchaku._C` and imports the pure-Python package kept in
`shared/third_party/nunchaku/v{version}`. The three ops on the Qwen-Image path are computed in float32 on
CPU from the packed checkpoint layouts, and they check what the C++ checks:

- `ops.quantize_w4a4_act_fuse_lora`: the low-rank down projection and the 4-bit activations of one SVDQ
  layer (called by `SVDQW4A4Linear.quantize`);
- `ops.gemm_w4a4`: the W4A4 GEMM with its epilogues: bias (and the nvfp4 per-channel scale), LoRA-up,
  and for the fused GELU MLP (`nunchaku.ops.fused.fused_gelu_mlp`) GELU, the next layer's LoRA-down and
  the quantization of the next layer's input;
- `ops.gemv_awq`: the W4A16 GEMV of the modulation layers (`AWQW4A16Linear`).

Everything else in `nunchaku._C` (the Flux/Sana models, `gemm_awq` of the T5 encoder, the FP16
attention, `utils`) is a placeholder that raises NotImplementedError("... not emulated"). So are the
gemm features the Qwen path does not use (norm_q/norm_k/rotary_emb, out_q/k/v, out_vk/out_linearattn,
poolout, fuse_silu, fuse_glu): they raise, naming the argument, instead of being silently ignored.

Sources. Line numbers are in nunchaku-tech/nunchaku@3a3cc3d (shared/third_party/nunchaku/
nunchaku-main-3a3cc3d-src.tar.xz), under src/kernels/zgemm/ unless another path is given; "launch" is
gemm_w4a4_launch_impl.cuh. The math and the packed layouts are those of shared/docs/nunchaku-format.md
(§2 and §3); the unpacking below is written from that document, independently of qwen_edit.svdq.

Asserts. The extension is built with -UNDEBUG (setup.py:111), so a failed C++ `assert` aborts the
process. Here it raises AssertionError with the condition and the file:line. Checks marked "emulator
check" have no C++ assert: there the kernel would read or write out of bounds, or read garbage.

Activation-side buffers (quantized activations, their scales, lora_act) are opaque in the real kernel.
Here they are in natural order: act uint8 [M_pad, K/2], byte j = channel 2j (low nibble) | 2j+1 (high);
ascales [K/G, M_pad]; lora_act fp32 [M_pad, R] with ranks in natural order. Only this module's quantize
and gemm read them. The wrappers allocate them with the shapes the kernels expect.

Known differences from the GPU (all below one bf16 ulp per step, except the first):
- the int4 main GEMM accumulates in bf16 on the GPU (`fma_bf16(bf16(p), bf16(as*ws), acc)` per 64-group,
  gemm_base.cuh:398-401, USE_FP32_ACCUM=false at gemm_w4a4.cuh:1080); here it accumulates in float32 and
  rounds once. The GPU result is noisier by about 1e-2 relative;
- `rcp.approx`, `__fdividef` and `tanh.approx` (gemm_utils.cuh:260-264, 337-344, 252-258) are computed
  exactly in float32 here, which can move a value that sits on a rounding boundary by one step;
- the order of float32 additions differs (the LoRA atomics, the nvfp4 MMA).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import torch
from conftest import SHARED

__all__ = [
    "install",
    "uninstall",
    "package_root",
    "quantize_w4a4_act_fuse_lora",
    "gemm_w4a4",
    "gemv_awq",
    "unpack_qweight",
    "unpack_wscales",
    "unpack_micro_scales",
    "unpack_vector",
    "unpack_proj_down",
    "unpack_proj_up",
    "unpack_awq_qweight",
    "e2m1_to_float",
    "float_to_e2m1",
]

# Kernel constants (gemm_base.cuh:29-49 and lora.cuh:22).
BLOCK_M = 256  # tokens per thread block; M is padded to this
BLOCK_N = 128  # output channels per thread block
WARP_K = 64  # int4 group size; also K per MMA step
FP4_GROUP = 16  # nvfp4 micro-scale group
MAX_RANK = 1024  # lora.cuh:22, the LoRA scales are std::array<float, MAX_RANK / 16> (lora.cuh:41)
SHIFT_GELU = 0.171875  # launch:286, added to the int4 fc2 input so that it can be quantized unsigned
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7; 8..15 are the negatives (doc §3.7)

# -- install / uninstall -------------------------------------------------------------------------------

_installed: tuple[str, str] | None = None  # (version, sys.path entry)


def package_root(version: str) -> Path:
    """The folder that holds the pure-Python `nunchaku` package of that release."""
    return SHARED / "third_party" / "nunchaku" / f"v{version}"


def install(version: str = "1.0.1") -> types.ModuleType:
    """Import Nunchaku `version` from shared/ with the emulated `nunchaku._C`; returns the package.

    A second call with the same version does nothing; another version is swapped in. Importing nunchaku
    configures the root logger (logging.basicConfig(INFO), first in models/text_encoders/t5_encoder.py:24):
    that is left as it happens.
    """
    global _installed
    if _installed is not None and _installed[0] == version and "nunchaku" in sys.modules:
        return sys.modules["nunchaku"]
    uninstall()
    root = package_root(version)
    if not (root / "nunchaku" / "__init__.py").is_file():
        raise FileNotFoundError(f"no Nunchaku {version} package at {root} (set QWEN_EDIT_SHARED?)")
    sys.path.insert(0, str(root))
    _installed = (version, str(root))
    extension = _make_extension()
    sys.modules["nunchaku._C"] = extension
    sys.modules["nunchaku._C.ops"] = extension.ops
    sys.modules["nunchaku._C.utils"] = extension.utils
    try:
        package = importlib.import_module("nunchaku")
    except BaseException:
        uninstall()
        raise
    if Path(package.__file__).resolve().parent != (root / "nunchaku").resolve():
        uninstall()
        raise ImportError(f"imported nunchaku from {package.__file__}, not from {root}")
    package._C = extension  # what importing a real submodule does
    return package


def uninstall() -> None:
    """Forget every nunchaku module (the emulated extension included) and the sys.path entry."""
    global _installed
    for name in [n for n in sys.modules if n == "nunchaku" or n.startswith("nunchaku.")]:
        del sys.modules[name]
    if _installed is not None:
        while _installed[1] in sys.path:
            sys.path.remove(_installed[1])
    _installed = None
    importlib.invalidate_caches()


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "Emulated by tests/nunchaku_emulator.py")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__emulated__ = True
    return module


def _not_emulated_function(name: str):
    def placeholder(*args, **kwargs):
        raise NotImplementedError(f"nunchaku._C.{name}: not emulated")

    placeholder.__name__ = placeholder.__qualname__ = name.rsplit(".", 1)[-1]
    return placeholder


def _not_emulated_class(name: str) -> type:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"nunchaku._C.{name}: not emulated")

    return type(name, (), {"__init__": __init__, "__module__": "nunchaku._C"})


def _make_extension() -> types.ModuleType:
    """The module tree of nunchaku/csrc/pybind.cpp, with the Qwen-Image ops emulated."""
    ext = _module("nunchaku._C")
    for cls in ("QuantizedFluxModel", "QuantizedSanaModel", "QuantizedGEMM", "QuantizedGEMM88", "Tensor"):
        setattr(ext, cls, _not_emulated_class(cls))  # pybind.cpp:11-107, Flux/Sana/test models
    ops = _module("nunchaku._C.ops")  # pybind.cpp:109-116
    ops.gemm_w4a4 = gemm_w4a4
    ops.quantize_w4a4_act_fuse_lora = quantize_w4a4_act_fuse_lora
    ops.gemv_awq = gemv_awq
    for name in ("attention_fp16", "gemm_awq", "test_rmsnorm_rope", "test_pack_qkv"):
        setattr(ops, name, _not_emulated_function(f"ops.{name}"))
    utils = _module("nunchaku._C.utils")  # pybind.cpp:118-123
    for name in (
        "set_log_level",
        "set_cuda_stack_limit",
        "disable_memory_auto_release",
        "trim_memory",
        "set_faster_i2f_mode",
    ):
        setattr(utils, name, _not_emulated_function(f"utils.{name}"))
    ext.ops, ext.utils = ops, utils
    return ext


# -- value tables (doc §3.7) --------------------------------------------------------------------------


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes 0..15 -> float32 values (bit 3 is the sign)."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=codes.device)
    return table[codes.long()]


def float_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """float32 -> E2M1 codes (uint8), as `cvt.rn.satfinite.e2m1x2.f32` (gemm_utils.cuh:239-245):
    round to nearest, ties to the even code, saturate to +-6. NaN (0 * inf of an all-zero group) -> 0."""
    x = torch.nan_to_num(x.float(), nan=0.0)
    table = torch.tensor(E2M1_VALUES, device=x.device)
    mag = x.abs().clamp(max=6.0).contiguous()
    hi = torch.searchsorted(table, mag).clamp(max=7)  # first value >= mag
    lo = (hi - 1).clamp(min=0)
    up, down = table[hi] - mag, mag - table[lo]
    code = torch.where((up < down) | ((up == down) & (hi % 2 == 0)), hi, lo)
    return (code + 8 * (x < 0)).to(torch.uint8)


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to `dtype` (bf16/fp16/e4m3, nearest-even) and come back to float32."""
    return x.to(dtype).float()


# -- unpacking the checkpoint layouts (doc §3) ------------------------------------------------------


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Bytes -> their nibbles, low nibble first: [..., B] -> [..., 2B] uint8."""
    b = packed.contiguous().view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


def unpack_qweight(qweight: torch.Tensor, fp4: bool = False) -> torch.Tensor:
    """SVDQ `qweight` int8 [N, K/2] -> codes [N, K]: int8 in [-8, 7] (int4), or E2M1 codes 0..15 (fp4).

    Doc §3.1: the nibbles, 8 per 32-bit word, are stored in the order (nt, kt, np, nl, kl, ns, ks, j), with
    n = nt*128 + np*16 + ns*8 + nl and k = kt*64 + ks*32 + kl*8 + j (warp_n 128, insn_k 64).
    """
    n, k = qweight.shape[0], qweight.shape[1] * 2
    q = _nibbles(qweight).reshape(n // 128, k // 64, 8, 8, 4, 2, 2, 8)  # nt kt np nl kl ns ks j
    q = q.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k)  # nt np ns nl | kt ks kl j
    if fp4:
        return q
    return (q.to(torch.int8) ^ 8) - 8  # two's complement nibble -> [-8, 7]


def unpack_wscales(wscales: torch.Tensor) -> torch.Tensor:
    """int4 `wscales` [K/64, N] (bf16) -> per-group scales in natural order, [K/64, N].

    Doc §3.2: memory order [N/128][K/64][a=8][b=4][c=2][d=2] with n = nt*128 + a*16 + c*8 + b*2 + d.
    """
    g, n = wscales.shape
    s = wscales.contiguous().reshape(n // 128, g, 8, 4, 2, 2)  # nt g a b c d
    return s.permute(1, 0, 2, 4, 3, 5).reshape(g, n)  # g | nt a c b d


def unpack_vector(packed: torch.Tensor) -> torch.Tensor:
    """bias / smooth_factor / wcscales [N] -> natural order: doc §3.4, the §3.2 permutation with one group."""
    return unpack_wscales(packed.reshape(1, -1)).reshape(-1)


def unpack_micro_scales(wscales: torch.Tensor) -> torch.Tensor:
    """nvfp4 `wscales` [K/16, N] (e4m3) -> micro-scales in natural order, [K/16, N].

    Doc §3.3: memory order [N/128][K/64][r=8][q=4][s=4][u=4] with n = nt*128 + s*32 + q*8 + r, g = 4*t + u.
    """
    g, n = wscales.shape
    s = wscales.contiguous().view(torch.uint8).reshape(n // 128, g // 4, 8, 4, 4, 4)  # nt t r q s u
    s = s.permute(1, 5, 0, 4, 3, 2).reshape(g, n)  # t u | nt s q r
    return s.view(wscales.dtype)


def _unpack_lowrank(packed: torch.Tensor) -> torch.Tensor:
    """Doc §3.5: [C, R] is stored [C/16][R/16][nl=8][kl=4][np=2][kp=2][reg=2]; returns the axes
    (cp, np, nl, rp, kp, kl, reg): the 16-row index (np, nl) first, the 16-column index (kp, kl, reg) last."""
    c, r = packed.shape
    t = packed.contiguous().reshape(c // 16, r // 16, 8, 4, 2, 2, 2)  # cp rp nl kl np kp reg
    return t.permute(0, 4, 2, 1, 5, 3, 6)  # cp np nl | rp kp kl reg


def unpack_proj_down(proj_down: torch.Tensor) -> torch.Tensor:
    """`proj_down` [K, R] -> D [K, R] with ranks in natural order (the checkpoint's lora_down is D^T).

    In the down tile the 8-row index (np, nl) is the rank and (kp, kl, reg) the input channel."""
    k, r = proj_down.shape
    t = _unpack_lowrank(proj_down)  # cp np nl rp kp kl reg; the rank is rp*16 + np*8 + nl
    return t.permute(3, 1, 2, 0, 4, 5, 6).reshape(r, k).t().contiguous()


def unpack_proj_up(proj_up: torch.Tensor) -> torch.Tensor:
    """`proj_up` [N, R] -> U [N, R] in natural order: n = cp*16 + np*8 + nl, r = rp*16 + kp*8 + kl*2 + reg."""
    return _unpack_lowrank(proj_up).reshape(proj_up.shape)


def unpack_awq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """AWQ `qweight` int32 [N/4, K/2] -> unsigned codes uint8 [N, K] (doc §3.6, TinyChat's pack_w4).

    Row R holds output rows 4R..4R+3, stored [g=K/64][r=4][h=2][word w=4][nibble j=8]; nibble j of word w
    is k = g*64 + h*32 + (j%4)*8 + w*2 + j//4 (gemv_awq.cu:174-191 with dequantize.cuh's nibble order)."""
    rows, words = qweight.shape
    n, k = rows * 4, words * 2  # 8 nibbles per word, 4 output rows per packed row
    q = _nibbles(qweight.contiguous().view(torch.uint8)).reshape(
        rows, k // 64, 4, 2, 4, 2, 4
    )  # R g r h w jh jl
    return q.permute(0, 2, 1, 3, 6, 4, 5).reshape(n, k)  # R r | g h jl w jh


def _dense_weight(wgt: torch.Tensor, wscales: torch.Tensor, fp4: bool) -> torch.Tensor:
    """The 4-bit residual W [N, K] in float32: codes * group scale (exact in float32)."""
    codes = unpack_qweight(wgt, fp4)
    if fp4:
        scales = unpack_micro_scales(wscales).float()  # [K/16, N]
        return e2m1_to_float(codes) * scales.t().repeat_interleave(FP4_GROUP, dim=1)
    scales = unpack_wscales(wscales).float()  # [K/64, N]
    return codes.float() * scales.t().repeat_interleave(WARP_K, dim=1)


# -- activation quantization: gemm_w4a4.cuh:430-523 (int4) and 85-187 (nvfp4) ----------------------------


def _quantize_activations(
    xhat: torch.Tensor, fp4: bool, unsigned: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂ [M, K] (float32 holding bf16/fp16 values) -> (codes uint8 [M, K], scales [K/G, M] in scale_dtype)."""
    m, k = xhat.shape
    group = FP4_GROUP if fp4 else WARP_K
    x = xhat.reshape(m, k // group, group)
    amax = x.abs().amax(dim=-1)  # exact: max of 16-bit values
    if fp4:
        # s = min(amax * (1/6), 448) in fp32, stored as e4m3 (gemm_w4a4.cuh:134-142)
        s = torch.clamp(amax * torch.tensor(1 / 6, dtype=torch.float32), max=448.0)
    else:
        # s = amax * (1/7) or (1/15) in fp32, stored in the 16-bit type (gemm_w4a4.cuh:476-480)
        s = amax * torch.tensor(1 / 15 if unsigned else 1 / 7, dtype=torch.float32)
    # x * rcp(s) with the unrounded s (gemm_w4a4.cuh:137, 162 and 486, 496); all-zero groups give 0
    v = torch.where(s[..., None] > 0, x * torch.reciprocal(s)[..., None], torch.zeros((), device=x.device))
    if fp4:
        codes = float_to_e2m1(v)
    else:
        # cvt.rni (round half to even) then cvt.pack.sat.s4 / .u4 (gemm_utils.cuh:210-227)
        q = torch.round(v).clamp(0 if unsigned else -8, 15 if unsigned else 7)
        codes = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return codes.reshape(m, k), s.to(scale_dtype).t().contiguous()


def _dequantize_activations(
    act: torch.Tensor, ascales: torch.Tensor, m: int, k: int, fp4: bool, unsigned: bool
) -> torch.Tensor:
    """Read back this module's activation buffers: [M, K] float32 values q * scale."""
    codes = _nibbles(act).reshape(m, k)
    if fp4:
        values = e2m1_to_float(codes)
    elif unsigned:
        values = codes.float()
    else:
        values = ((codes.to(torch.int8) ^ 8) - 8).float()
    group = FP4_GROUP if fp4 else WARP_K
    scales = ascales.reshape(k // group, m).float().t()  # [M, K/G]
    return values * scales.repeat_interleave(group, dim=1)


def _store_activations(
    codes: torch.Tensor, scales: torch.Tensor, qout: torch.Tensor, oscales: torch.Tensor
) -> None:
    """Write codes (two per byte, low nibble first) and scales into the caller's buffers, in place."""
    qout.view(torch.uint8).view(-1).copy_((codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(-1))
    oscales.view(-1).copy_(scales.reshape(-1))


# -- checks ---------------------------------------------------------------------------------------------


def _check(condition: bool, what: str) -> None:
    """The C++ `assert(condition)`; `what` names the condition and where it is."""
    if not condition:
        raise AssertionError(f"assert({what}) failed")


def _check_tensors(**tensors: torch.Tensor | None) -> None:
    """Emulator check: the kernels take raw data pointers, ignoring strides and devices."""
    given = {name: t for name, t in tensors.items() if t is not None}
    for name, t in given.items():
        _check(t.is_contiguous(), f"{name}.is_contiguous() (emulator check: the kernel ignores strides)")
    devices = {t.device for t in given.values()}
    _check(len(devices) <= 1, f"all tensors on one device, got {sorted(map(str, devices))} (emulator check)")


def _is_byte(t: torch.Tensor) -> bool:
    return t.dtype in (torch.int8, torch.uint8)  # both map to Tensor::INT8 (interop/torch.cpp:25-26)


def _not_emulated(**features: object) -> None:
    for name, value in features.items():
        if value is not None and value is not False:
            raise NotImplementedError(f"{name}: not emulated (not used on the Qwen-Image path)")


def _half_type(dtype: torch.dtype, what: str) -> torch.dtype:
    # invoke_launch dispatches on FP16 / BF16 only, anything else is assert(false) (gemm_w4a4.cu:23-28)
    _check(dtype in (torch.float16, torch.bfloat16), f"{what} is FP16 or BF16, got {dtype} (gemm_w4a4.cu:28)")
    return dtype


# -- ops.quantize_w4a4_act_fuse_lora: launch:451-521 and gemm_w4a4.cuh:1124-1183 -------------------------


@torch.no_grad()  # the kernels are not differentiable
def quantize_w4a4_act_fuse_lora(
    input: torch.Tensor,
    output: torch.Tensor,
    oscales: torch.Tensor,
    lora_down: torch.Tensor,
    lora_act_out: torch.Tensor,
    smooth: torch.Tensor | None = None,
    fuse_glu: bool = False,
    fp4: bool = False,
) -> None:
    """LoRA-down of x, then quantize x / smooth to 4 bits; fills output, oscales and lora_act_out in place."""
    _not_emulated(fuse_glu=fuse_glu)
    _check_tensors(
        input=input,
        output=output,
        oscales=oscales,
        lora_down=lora_down,
        lora_act_out=lora_act_out,
        smooth=smooth,
    )
    half = _half_type(input.dtype, "input.dtype()")  # gemm_w4a4.cu:121
    actual_m, actual_k = input.numel() // input.shape[-1], input.shape[-1]
    m = -(-actual_m // BLOCK_M) * BLOCK_M  # launch:462
    k = -(-actual_k // BLOCK_N) * BLOCK_N  # launch:463 (the next GEMM's K, padded to 128)
    _check(_is_byte(output), "output.dtype() == Tensor::INT8 (launch:465)")
    _check(
        output.numel() // output.shape[-1] == m, f"output.numel() / output.shape[-1] == M={m} (launch:466)"
    )
    _check(output.shape[-1] == k // 2, f"output.shape[-1] == N / 2 = {k // 2} (launch:467)")
    if fp4:
        _check(oscales.dtype == torch.float8_e4m3fn, "oscales.dtype() == Tensor::FP8_E4M3 (launch:471)")
        _check(oscales.numel() == m * k // WARP_K * 4, "oscales.numel() == M * N / WARP_K * 4 (launch:472)")
    else:
        _check(oscales.dtype == half, f"isTypeMatch<half_t>(oscales.dtype()), half_t = {half} (launch:474)")
        _check(oscales.numel() == m * k // WARP_K, "oscales.numel() == M * N / WARP_K (launch:475)")
    rank = lora_down.shape[1]
    _check(rank % 16 == 0, f"rank % 16 == 0, rank = {rank} (launch:480)")
    _check(lora_down.shape[0] == k, f"lora_down.shape[0] == N = {k} (launch:482)")
    _check(lora_act_out.shape[0] == m, f"lora_act_out.shape[0] == M = {m} (launch:484)")
    _check(lora_act_out.shape[1] == rank, f"lora_act_out.shape[1] == rank = {rank} (launch:485)")
    _check(lora_act_out.dtype == torch.float32, "lora_act_out is FP32 (emulator check, launch:510)")
    _check(lora_down.dtype == half, f"lora_down.dtype == {half} (emulator check, launch:509)")
    # a missing smooth becomes nullptr (launch:506), which EpilogueQuantize reads (gemm_w4a4.cuh:959)
    _check(smooth is not None, "smooth.valid() (emulator check: the kernel reads it without a null check)")
    _check(smooth.dtype == half and smooth.numel() == k, "smooth is half_t [K] (emulator check)")
    # a K that is not a multiple of 128 would have the kernel read smooth and lora_down past their end
    _check(actual_k == k, f"K % 128 == 0, K = {actual_k} (emulator check)")

    # rows past actualM are loaded as 0 (gemm_base.cuh:625-629)
    x = torch.zeros(m, k, dtype=torch.float32, device=input.device)
    x[:actual_m] = input.reshape(actual_m, k).float()
    # LoRA-down on the raw (unsmoothed) x: bf16 operands, fp32 accumulation (gemm_w4a4.cuh:1161, lora.cuh:284)
    lora_act_out.zero_()  # launch:487
    lora_act_out += x @ unpack_proj_down(lora_down).float()
    # x̂ = half(x / smooth) (gemm_w4a4.cuh:990-993 with shift 0, 1181), then signed quantization
    xhat = _round(x / unpack_vector(smooth).float(), half)
    codes, scales = _quantize_activations(xhat, fp4, unsigned=False, scale_dtype=oscales.dtype)
    _store_activations(codes, scales, output, oscales)


# -- ops.gemm_w4a4: launch:7-424 -----------------------------------------------------------------------


@torch.no_grad()  # the kernels are not differentiable
def gemm_w4a4(
    act: torch.Tensor,
    wgt: torch.Tensor,
    out: torch.Tensor | None,
    qout: torch.Tensor | None,
    ascales: torch.Tensor,
    wscales: torch.Tensor,
    oscales: torch.Tensor | None,
    poolout: torch.Tensor | None,
    lora_act_in: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    lora_act_out: torch.Tensor | None,
    norm_q: torch.Tensor | None,
    norm_k: torch.Tensor | None,
    rotary_emb: torch.Tensor | None,
    bias: torch.Tensor | None,
    smooth_factor: torch.Tensor | None,
    out_vk: torch.Tensor | None,
    out_linearattn: torch.Tensor | None,
    act_unsigned: bool,
    lora_scales: Sequence[float],
    fuse_silu: bool,
    fp4: bool,
    alpha: float,
    wcscales: torch.Tensor | None,
    out_q: torch.Tensor | None,
    out_k: torch.Tensor | None,
    out_v: torch.Tensor | None,
    attn_tokens: int,
) -> None:
    """The W4A4 GEMM and its epilogues; fills `out` (linear layer) and/or `qout`, `oscales`, `lora_act_out`
    (fused GELU MLP: fc2's quantized input) in place."""
    _not_emulated(
        poolout=poolout,
        norm_q=norm_q,
        norm_k=norm_k,
        rotary_emb=rotary_emb,
        out_vk=out_vk,
        out_linearattn=out_linearattn,
        fuse_silu=fuse_silu,
        out_q=out_q,
        out_k=out_k,
        out_v=out_v,
    )
    _check_tensors(
        act=act,
        wgt=wgt,
        out=out,
        qout=qout,
        ascales=ascales,
        wscales=wscales,
        oscales=oscales,
        lora_act_in=lora_act_in,
        lora_up=lora_up,
        lora_down=lora_down,
        lora_act_out=lora_act_out,
        bias=bias,
        smooth_factor=smooth_factor,
        wcscales=wcscales,
    )
    # The 16-bit type: int4 takes it from ascales, fp4 from the others, which must agree (gemm_w4a4.cu:63-73)
    if fp4:
        dtypes = {t.dtype for t in (out, bias, lora_up, lora_down, wcscales) if t is not None}
        _check(
            len(dtypes) <= 1,
            f"dtype == tensor.dtype() for out/bias/lora/wcscales, got {dtypes} (gemm_w4a4.cu:69)",
        )
        half = _half_type(
            dtypes.pop() if dtypes else None, "the dtype of out/bias/lora_up/lora_down/wcscales"
        )
    else:
        half = _half_type(ascales.dtype, "ascales.dtype()")
    _check(_is_byte(act) and _is_byte(wgt), "act and wgt are INT8 (emulator check)")
    m, n, k = act.numel() // act.shape[-1], wgt.shape[0], act.shape[-1] * 2  # launch:46-48
    _check(
        k == wgt.shape[1] * 2, f"K == wgt.shape[1] * 2, K = {k}, wgt.shape[1] = {wgt.shape[1]} (launch:49)"
    )
    actual_m, actual_n = m, n
    if out is not None:
        actual_m, actual_n = out.numel() // out.shape[-1], out.shape[-1]
        _check(actual_m <= m and m - actual_m < BLOCK_M, "actualM <= M && M - actualM < BLOCK_M (launch:57)")
        _check(actual_n <= n and n - actual_n < BLOCK_N, "actualN <= N && N - actualN < BLOCK_N (launch:58)")
        _check(out.dtype == half, f"out is half_t = {half} (emulator check, launch:411)")
    _check(m % BLOCK_M == 0, f"M % BLOCK_M == 0, M = {m} (launch:73)")
    _check(n % BLOCK_N == 0, f"N % BLOCK_N == 0, N = {n} (launch:74)")
    group = FP4_GROUP if fp4 else WARP_K
    if fp4:
        _check(not act_unsigned, "!act_unsigned (launch:127)")
        _check(ascales.dtype == torch.float8_e4m3fn, "ascales.dtype() == Tensor::FP8_E4M3 (launch:146)")
        _check(wscales.dtype == torch.float8_e4m3fn, "wscales.dtype() == Tensor::FP8_E4M3 (launch:147)")
    else:
        _check(alpha == 1.0, f"alpha == 1.0f, alpha = {alpha} (launch:107)")
        _check(wscales.dtype == half, f"wscales is half_t = {half} (emulator check, launch:113)")
        _check(wcscales is None, "int4 has no wcscales (emulator check: the format has none, doc §2.1)")
    _check(ascales.numel() == k // group * m, "ascales holds [K/G, M] (emulator check)")
    _check(wscales.numel() == k // group * n, "wscales holds [K/G, N] (emulator check)")
    _check(bias is None or bias.numel() == n, f"!bias.valid() || bias.numel() == N = {n} (launch:173)")
    _check(
        wcscales is None or wcscales.numel() == n, "!wcscales.valid() || wcscales.numel() == N (launch:174)"
    )
    for name, t in (("bias", bias), ("wcscales", wcscales), ("lora_up", lora_up), ("lora_down", lora_down)):
        _check(t is None or t.dtype == half, f"{name} is half_t = {half} (emulator check)")

    # LoRA arguments (launch:196-252)
    _check((lora_up is None) == (lora_act_in is None), "lora_up.valid() == lora_act_in.valid() (launch:198)")
    _check(
        (lora_down is None) == (lora_act_out is None),
        "lora_down.valid() == lora_act_out.valid() (launch:199)",
    )
    rank_up = lora_up.shape[1] if lora_up is not None else 0  # launch:201
    rank_down = lora_down.shape[1] if lora_down is not None else 0  # launch:202
    if rank_up == 0:
        _check(rank_down == 0, "rank_down == 0 when rank_up == 0 (launch:205)")
    else:
        _check(rank_up % 16 == 0, f"rank_up % 16 == 0, rank_up = {rank_up} (launch:210)")
        _check(lora_up.shape[0] == n, f"lora_up.shape[0] == N = {n} (launch:212)")
        _check(lora_act_in.shape[0] == m, f"lora_act_in.shape[0] == M = {m} (launch:214)")
        _check(lora_act_in.shape[1] == rank_up, f"lora_act_in.shape[1] == rank_up = {rank_up} (launch:215)")
        _check(lora_act_in.dtype == torch.float32, "lora_act_in is FP32 (emulator check, launch:233)")
        # the scales live in std::array<float, MAX_RANK / 16> (lora.cuh:41) and are indexed by rank / 16
        # (lora.cuh:154): a larger rank reads and writes past the array
        _check(
            rank_up <= MAX_RANK,
            f"rank_up <= MAX_RANK, rank_up = {rank_up}, MAX_RANK = {MAX_RANK} (lora.cuh:22)",
        )
    if rank_up and rank_down:
        _check(rank_down % 16 == 0, f"rank_down % 16 == 0, rank_down = {rank_down} (launch:245)")
        _check(lora_down.shape[0] == n, f"lora_down.shape[0] == N = {n} (launch:247)")
        _check(lora_act_out.shape[0] == m, f"lora_act_out.shape[0] == M = {m} (launch:249)")
        _check(lora_act_out.shape[1] == rank_down, "lora_act_out.shape[1] == rank_down (launch:250)")
        _check(lora_act_out.dtype == torch.float32, "lora_act_out is FP32 (emulator check, launch:272)")

    fused = qout is not None and oscales is not None  # launch:282
    _check(fused or (qout is None and oscales is None), "qout and oscales come together (emulator check)")
    _check(fused or out is not None, "out.valid() when there is no qout (launch:422: assert(false))")
    if fused:
        # fc2's input buffers, as quantize_w4a4_act_fuse_lora checks them (launch:465-476)
        _check(
            _is_byte(qout) and qout.numel() == m * n // 2,
            "qout is INT8 [M, N/2] (emulator check, launch:465-467)",
        )
        if fp4:
            _check(oscales.dtype == torch.float8_e4m3fn, "oscales.dtype() == Tensor::FP8_E4M3 (launch:471)")
            _check(
                oscales.numel() == m * n // WARP_K * 4, "oscales.numel() == M * N / WARP_K * 4 (launch:472)"
            )
        else:
            _check(
                oscales.dtype == half, f"isTypeMatch<half_t>(oscales.dtype()), half_t = {half} (launch:474)"
            )
            _check(oscales.numel() == m * n // WARP_K, "oscales.numel() == M * N / WARP_K (launch:475)")
        _check(smooth_factor is not None and smooth_factor.numel() == n, "smooth_factor is [N] (launch:294)")
        _check(smooth_factor.dtype == half, f"smooth_factor is half_t = {half} (emulator check)")

    # Main GEMM. int4: exact int products per 64-group scaled by the two scales; nvfp4: block-scaled MMA
    # in fp32, then * alpha (gemm_w4a4.cuh:341-349); one rounding to the 16-bit type (gemm_w4a4.cuh:351).
    a = _dequantize_activations(act, ascales, m, k, fp4, act_unsigned)
    y = a @ _dense_weight(wgt, wscales, fp4).t()
    if fp4 and alpha != 1.0:
        y = y * torch.tensor(alpha, dtype=torch.float32)
    y = _round(y, half)

    # EpilogueBias: y*s + b as one bf16 fma, or y + b, or y*s (gemm_base.cuh:749-763)
    if bias is not None or wcscales is not None:
        y64 = y.double()
        if wcscales is not None:
            y64 = y64 * unpack_vector(wcscales).double()
        if bias is not None:
            y64 = y64 + unpack_vector(bias).double()
        y = _round(y64, half)

    # EpilogueLoraUp: y + sum_r half(lora_act * scale[r/16]) * U[n, r], fp32 accumulation (lora.cuh:145-221)
    if rank_up:
        lora_act = _round(lora_act_in.reshape(m, rank_up) * _rank_scales(lora_scales, rank_up), half)
        y = _round(y + lora_act @ unpack_proj_up(lora_up).float().t(), half)

    if not fused:  # EpilogueDefault (launch:407-420)
        out.view(-1).copy_(y[:actual_m, :actual_n].reshape(-1))
        return

    # Fused GELU MLP (launch:282-309): GELU -> [out] -> LoRA-down of the next layer -> quantize.
    g = _round(_gelu_tanh(y), half)  # epilogues.cuh:22-44, gemm_utils.cuh:306-312
    if out is not None:  # EpilogueDefault before EpilogueQuantize (launch:297-306)
        out.view(-1).copy_(g[:actual_m, :actual_n].reshape(-1))
    if rank_up and rank_down:  # EpilogueLoraDown on the GELU output, not shifted (launch:257-261)
        lora_act_out.zero_()  # launch:252
        lora_act_out += g @ unpack_proj_down(lora_down).float()
    # EpilogueQuantize: x̂ = half(half(g + shift) / smooth) (gemm_w4a4.cuh:986-993); int4 unsigned + shift
    shift = 0.0 if fp4 else SHIFT_GELU  # launch:288-293
    xhat = _round(_round(g + shift, half) / unpack_vector(smooth_factor).float(), half)
    codes, scales = _quantize_activations(xhat, fp4, unsigned=not fp4, scale_dtype=oscales.dtype)
    _store_activations(codes, scales, qout, oscales)


def _rank_scales(lora_scales: Sequence[float], rank: int) -> torch.Tensor:
    """Per rank: lora_scales[r // 16], 0 past the end of the list (launch:220-225, lora.cuh:154)."""
    groups = [lora_scales[g] if g < len(lora_scales) else 0.0 for g in range(rank // 16)]
    return torch.tensor(groups, dtype=torch.float32).repeat_interleave(16)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, in fp32 as gemm_utils.cuh:306-312 writes it."""
    x3 = x * x * x
    return x * (0.5 + 0.5 * torch.tanh(0.79788456 * (x + 0.044715 * x3)))


# -- ops.gemv_awq: src/kernels/awq/gemv_awq.cu:100-294 -------------------------------------------------


@torch.no_grad()  # the kernels are not differentiable
def gemv_awq(
    in_feats: torch.Tensor,
    kernel: torch.Tensor,
    scaling_factors: torch.Tensor,
    zeros: torch.Tensor,
    m: int,
    n: int,
    k: int,
    group_size: int,
) -> torch.Tensor:
    """W4A16 GEMV: returns x @ W^T with W = q * s + z, shape in_feats.shape[:-1] + (n,)."""
    # nunchaku/csrc/ops.h:132-135 make every input contiguous, so strides don't matter here
    in_feats, kernel, scaling_factors, zeros = (
        t.contiguous() for t in (in_feats, kernel, scaling_factors, zeros)
    )
    _check_tensors(in_feats=in_feats, kernel=kernel, scaling_factors=scaling_factors, zeros=zeros)
    half = _half_type(scaling_factors.dtype, "scaling_factors.scalar_type()")  # gemv_awq.cu:253
    _check(
        in_feats.dtype == half, f"isTypeMatch<half_t>(_in_feats.dtype()), half_t = {half} (gemv_awq.cu:254)"
    )
    _check(0 < m <= 8, f"m > 0 && m <= 8, m = {m} (gemv_awq.cu:276)")
    _check(group_size == 64, f"group_size == GROUP_SIZE = 64, group_size = {group_size} (gemv_awq.cu:277)")
    _check(in_feats.numel() == m * k, f"in_feats holds m x k = {m} x {k} (emulator check)")
    _check(n % 8 == 0 and k % 64 == 0, "n % 8 == 0 and k % 64 == 0 (emulator check: gemv_awq.cu:271 grid)")
    _check(
        kernel.dtype == torch.int32 and kernel.shape == (n // 4, k // 2),
        "kernel is int32 [n/4, k/2] (emulator check)",
    )
    _check(
        zeros.dtype == half and zeros.shape == scaling_factors.shape,
        "zeros is like scaling_factors (emulator check)",
    )
    groups = k // group_size
    # rows past k/64 (padding) are never read (gemv_awq.cu:155-156)
    _check(
        scaling_factors.shape[-1] == n and scaling_factors.numel() >= groups * n,
        "scales hold [k/64, n] (emulator check)",
    )

    codes = unpack_awq_qweight(kernel).double()  # [n, k]
    s = scaling_factors.reshape(-1, n)[:groups].double().t().repeat_interleave(group_size, dim=1)
    z = zeros.reshape(-1, n)[:groups].double().t().repeat_interleave(group_size, dim=1)
    w = _round(codes * s + z, half)  # __hfma2(q, s, z): one rounding (gemv_awq.cu:187)
    x = in_feats.reshape(m, k).float()
    out = torch.empty(m, n, dtype=torch.float32, device=in_feats.device)
    step = max(1, (1 << 22) // (m * k))  # bound the [m, rows, k] product tensor
    for lo in range(0, n, step):  # chunks of output rows, not a loop over tokens or channels
        # bf16 products (__hmul2), summed in fp32 (gemv_awq.cu:206-210)
        out[:, lo : lo + step] = _round(x[:, None, :] * w[None, lo : lo + step, :], half).sum(dim=-1)
    # a new tensor of in_feats' shape with n last (gemv_awq.cu:233, 256-264); not a view, since the caller
    # adds the bias to it in place
    result = torch.empty(*in_feats.shape[:-1], n, dtype=half, device=in_feats.device)
    result.view(m, n).copy_(out)
    return result
