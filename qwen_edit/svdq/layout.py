"""Nunchaku's packed tensor layouts: exact pack and unpack for every tensor kind in an SVDQ file.

Nunchaku stores weights in the order its CUDA kernels read them (tiles of 128 output channels, MMA
fragments), not in row-major order. Each function pair below is a pure index permutation (plus nibble
packing), written as reshape/permute so it is exact and fast. The layouts follow the reference packer
(nunchaku-tech/nunchaku@3a3cc3d:nunchaku/lora/flux/packer.py, and the writer
mit-han-lab/deepcompressor@69f3473:deepcompressor/backend/nunchaku/utils.py), whose pack functions the
index formulas here invert. `tests/test_svdq_layout.py` checks every function
against layers packed by the reference packer.

Conventions: "dense" tensors are in natural order, weights [N out, K in]; "packed" tensors have the
shape and dtype they have in the file.
"""

from __future__ import annotations

import torch

# E2M1 (the 4-bit float of NVFP4): code -> value. Bit 3 is the sign.
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)

AWQ_GROUP = 64
AWQ_GROUP_PAD = 16  # TinyChat pads the number of scale/zero rows to a multiple of 16 groups


def _check_tiles(n: int, k: int, k_tile: int = 128) -> None:
    if n % 128 or k % k_tile:
        raise ValueError(f"SVDQ layers need out % 128 == 0 and in % {k_tile} == 0; got out={n}, in={k}")


# -- nibbles -----------------------------------------------------------------------------------------


def _pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """[..., 2m] values 0..15 -> [..., m] uint8, even index in the low nibble."""
    nibbles = nibbles.to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., m] bytes -> [..., 2m] uint8 values 0..15 (inverse of _pack_nibbles)."""
    b = packed.view(torch.uint8)
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)


# -- SVDQ W4A4 main weight (int4 and nvfp4 share the layout; only the nibble meaning differs) ----------
# packer.py pack_weight: n = nt*128 + np*16 + ns*8 + nl, k = kt*64 + ks*32 + kl*8 + j; stored in the
# order (nt, kt, np, nl, kl, ns, ks, j), eight nibbles j per little-endian int32.


def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] 4-bit codes (int4 as -8..7, or e2m1 codes 0..15) -> int8 [N, K/2] in Nunchaku's layout."""
    n, k = codes.shape
    _check_tiles(n, k)
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    nib = nib.reshape(n // 128, 8, 2, 8, k // 64, 2, 4, 8).permute(0, 4, 1, 3, 6, 2, 5, 7)
    return _pack_nibbles(nib.contiguous()).reshape(n, k // 2).view(torch.int8)


def unpack_qweight(qweight: torch.Tensor, signed: bool) -> torch.Tensor:
    """int8 [N, K/2] -> [N, K] int8 codes: signed int4 (-8..7) if `signed`, else raw nibbles (e2m1 codes)."""
    n, half_k = qweight.shape
    k = half_k * 2
    _check_tiles(n, k)
    nib = _unpack_nibbles(qweight.contiguous()).reshape(n // 128, k // 64, 8, 8, 4, 2, 2, 8)
    nib = nib.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k).to(torch.int8)
    return nib - 16 * (nib >= 8).to(torch.int8) if signed else nib


# -- per-group scales and 1-D vectors --------------------------------------------------------------
# packer.py pack_scale: n_local = a*16 + c*8 + b*2 + d, stored as [nt][group][a][b][c][d].


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """Int4 group scales, dense [N, G] -> packed [G, N] (same dtype)."""
    n, g = scales.shape
    s = scales.reshape(n // 128, 8, 2, 4, 2, g).permute(0, 5, 1, 3, 2, 4)
    return s.contiguous().reshape(g, n)


def unpack_scales(packed: torch.Tensor) -> torch.Tensor:
    """Int4 group scales, packed [G, N] -> dense [N, G]."""
    g, n = packed.shape
    s = packed.contiguous().reshape(n // 128, g, 8, 4, 2, 2).permute(0, 2, 4, 3, 5, 1)
    return s.reshape(n, g)


def pack_vector(v: torch.Tensor) -> torch.Tensor:
    """bias / smooth_factor / wcscales: dense [N] -> packed [N] (the scale permutation with one group)."""
    return pack_scales(v.reshape(-1, 1)).reshape(-1)


def unpack_vector(packed: torch.Tensor) -> torch.Tensor:
    return unpack_scales(packed.reshape(1, -1)).reshape(-1)


# packer.py pack_micro_scale (NVFP4, group 16): n_local = s*32 + q*8 + r, group = t*4 + u,
# stored as [nt][t][r][q][s][u].


def pack_micro_scales(scales: torch.Tensor) -> torch.Tensor:
    """NVFP4 fp8 micro-scales, dense [N, K/16] -> packed [K/16, N]."""
    n, g = scales.shape
    s = scales.view(torch.uint8).reshape(n // 128, 4, 4, 8, g // 4, 4).permute(0, 4, 3, 2, 1, 5)
    return s.contiguous().reshape(g, n).view(scales.dtype)


def unpack_micro_scales(packed: torch.Tensor) -> torch.Tensor:
    """NVFP4 fp8 micro-scales, packed [K/16, N] -> dense [N, K/16]."""
    g, n = packed.shape
    s = packed.contiguous().view(torch.uint8).reshape(n // 128, g // 4, 8, 4, 4, 4).permute(0, 4, 3, 2, 1, 5)
    return s.reshape(n, g).view(packed.dtype)


# -- low-rank branch -------------------------------------------------------------------------------
# packer.py pack_lowrank_weight: 16x16 tiles stored as [C/16][R/16][nl=8][kl=4][np=2][kp=2][reg=2];
# the tile's rows are (np, nl), its columns (kp, kl, reg). For proj_up the rows are output channels
# (C = N); for proj_down the rows are ranks and the columns input channels (C = K), and the tiles are
# ordered input-tile first.


def _pack_tiles(m: torch.Tensor, rows_outer: bool) -> torch.Tensor:
    a, b = m.shape
    t = m.reshape(a // 16, 2, 8, b // 16, 2, 4, 2)  # (ta, np, nl, tb, kp, kl, reg)
    order = (0, 3, 2, 5, 1, 4, 6) if rows_outer else (3, 0, 2, 5, 1, 4, 6)
    return t.permute(order).contiguous()


def pack_proj_up(up: torch.Tensor) -> torch.Tensor:
    """Dense [N, R] -> packed [N, R]."""
    n, r = up.shape
    return _pack_tiles(up, rows_outer=True).reshape(n, r)


def unpack_proj_up(packed: torch.Tensor) -> torch.Tensor:
    n, r = packed.shape
    t = packed.contiguous().reshape(n // 16, r // 16, 8, 4, 2, 2, 2)  # (ta, tb, nl, kl, np, kp, reg)
    return t.permute(0, 4, 2, 1, 5, 3, 6).reshape(n, r)


def pack_proj_down(down: torch.Tensor) -> torch.Tensor:
    """Dense [R, K] (PyTorch lora_A orientation) -> packed [K, R]."""
    r, k = down.shape
    return _pack_tiles(down, rows_outer=False).reshape(k, r)


def unpack_proj_down(packed: torch.Tensor) -> torch.Tensor:
    """Packed [K, R] -> dense [R, K]."""
    k, r = packed.shape
    t = packed.contiguous().reshape(k // 16, r // 16, 8, 4, 2, 2, 2)  # (tb, ta, nl, kl, np, kp, reg)
    return t.permute(1, 4, 2, 0, 5, 3, 6).reshape(r, k)


# -- AWQ W4A16 (the modulation layers img_mod.1 / txt_mod.1) ----------------------------------------
# TinyChat pack_w4 (deepcompressor@69f3473:deepcompressor/backend/tinychat/utils.py:45-53), read by
# nunchaku's gemv_awq.cu: packed row R holds outputs 4R..4R+3; order [R][g=K/64][r][h][w=4 words];
# in word w of chunk (g, r, h), nibble j holds k = g*64 + h*32 + 8*(j%4) + 2*w + j//4.


def pack_awq_qweight(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned codes [N, K] in 0..15 -> int32 [N/4, K/2]."""
    n, k = codes.shape
    if n % 4 or k % AWQ_GROUP:
        raise ValueError(f"AWQ layers need out % 4 == 0 and in % 64 == 0; got out={n}, in={k}")
    c = codes.to(torch.uint8).reshape(n // 4, 4, k // 64, 2, 4, 4, 2)  # (R, r, g, h, a=j%4, w, b=j//4)
    c = c.permute(0, 2, 1, 3, 5, 6, 4).contiguous()  # (R, g, r, h, w, j = b*4 + a)
    return _pack_nibbles(c).reshape(n // 4, k * 2).view(torch.int32)


def unpack_awq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N/4, K/2] -> unsigned codes [N, K] (uint8, 0..15)."""
    rows, half_k = qweight.shape
    n, k = rows * 4, half_k * 2
    nib = _unpack_nibbles(qweight.contiguous().view(torch.uint8)).reshape(rows, k // 64, 4, 2, 4, 2, 4)
    return nib.permute(0, 2, 1, 3, 6, 4, 5).reshape(n, k)


def awq_group_rows(k: int) -> int:
    """Rows of the AWQ wscales/wzeros tensors for `k` inputs: K/64 groups padded to a multiple of 16."""
    groups = k // AWQ_GROUP
    return -(-groups // AWQ_GROUP_PAD) * AWQ_GROUP_PAD


def interleave_modulation(t: torch.Tensor, splits: int = 6) -> torch.Tensor:
    """Diffusers order (chunk s of `splits`, channel c at s*C + c) -> Nunchaku's c*splits + s, along dim 0."""
    n = t.shape[0]
    return t.reshape(splits, n // splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def deinterleave_modulation(t: torch.Tensor, splits: int = 6) -> torch.Tensor:
    n = t.shape[0]
    return t.reshape(n // splits, splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


# -- value decoding --------------------------------------------------------------------------------


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    return E2M1_VALUES.to(codes.device)[codes.long()]


def float_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code, saturating at +-6; exact halfway values go to the even code (cvt.rn)."""
    mag = x.abs().clamp(max=6.0)
    grid = E2M1_VALUES[:8].to(x.device)
    mids = (grid[1:] + grid[:-1]) / 2
    idx = torch.bucketize(mag, mids)  # mag == mids[i] gives the lower code i
    tie = (idx < 7) & (mag == mids[idx.clamp(max=6)])
    idx = idx + (tie & (idx % 2 == 1)).long()
    sign = ((x < 0) & (idx > 0)).long() * 8
    return (idx + sign).to(torch.uint8)
