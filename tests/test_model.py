"""ComfyUI's DiT forward (positions, timestep precision) on top of the portable model."""

from __future__ import annotations

import pytest
import torch
from twins import with_text_lengths

from qwen_edit.model import comfy_forward, comfy_rope, image_positions
from qwen_edit.testing.transformer import write_tiny_transformer
from qwen_edit.transformer import load_transformer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_transformer(tmp_path_factory.mktemp("m") / "tiny.safetensors", precision="fp4")
    return load_transformer(path, backend="portable", compute="bf16", device="cpu", dtype=torch.float32)


def _pack(latent):  # [B,16,1,h,w] -> diffusers' packed tokens
    b, c, _, h, w = latent.shape
    return latent[:, :, 0].reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)


@torch.no_grad()
def test_matches_diffusers_forward_where_the_two_agree(model):
    # Same-size reference, even grids and a timestep exact in bf16: the two forwards coincide.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 1, 8, 12, generator=gen)
    ref = torch.randn(1, 16, 1, 8, 12, generator=gen)
    ctx = torch.randn(2, 9, 64, generator=gen)
    sigma = torch.tensor([0.625, 0.625])
    ours = comfy_forward(model, x, sigma, ctx, [ref])
    tokens = torch.cat([_pack(x), _pack(ref).expand(2, -1, -1)], dim=1)
    theirs = model(
        **with_text_lengths(
            dict(
                hidden_states=tokens,
                encoder_hidden_states=ctx,
                timestep=sigma,
                img_shapes=[[(1, 4, 6), (1, 4, 6)]] * 2,
                return_dict=False,
            )
        )
    )[0][:, :24]
    assert torch.allclose(_pack(ours), theirs, atol=1e-4 * theirs.abs().max())


def test_positions_follow_comfyui():
    # Centred as i - n // 2 (an odd grid is not symmetric the diffusers way).
    assert image_positions(3, 2, 0)[:, 1].tolist() == [-1, -1, 0, 0, 1, 1]
    assert image_positions(3, 2, 2)[:, 0].unique().tolist() == [2]
    # Text starts after the noise latent's half-grid, whatever the references' size.
    axes = [16, 56, 56]
    _, txt = comfy_rope((4, 6), [(20, 20)], 5, axes)
    _, txt_ref = comfy_rope((4, 6), [], 5, axes)
    assert torch.equal(txt, txt_ref)
    angle_of_first = torch.angle(txt[0, 1])  # axis 0, second frequency: position * omega
    assert torch.isclose(angle_of_first, torch.tensor(3 * 1e4 ** (-2 / 16)), atol=1e-6)


@torch.no_grad()
def test_timestep_reaches_the_embedding_in_float32(model):
    bf16 = load_transformer(model.qwen_edit_info.path, backend="portable", compute="bf16", device="cpu")
    x = torch.randn(1, 16, 1, 4, 4)
    ctx = torch.randn(1, 3, 64)
    # 0.7 is not a bf16 number; ComfyUI embeds it unrounded, so nearby sigmas give different outputs.
    a = comfy_forward(bf16, x, torch.tensor([0.7]), ctx)
    b = comfy_forward(bf16, x, torch.tensor([0.69921875]), ctx)  # bf16(0.7)
    assert not torch.equal(a, b)


@torch.no_grad()
def test_odd_latent_sizes_round_trip(model):
    x = torch.randn(1, 16, 1, 7, 9)
    out = comfy_forward(model, x, torch.tensor([0.5]), torch.randn(1, 4, 64), [torch.randn(1, 16, 1, 5, 5)])
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_rope_forms_agree():
    """apply_rotary's eager (complex) and compiled (real arithmetic) forms, and both table types."""
    from qwen_edit import model as m

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 16, generator=gen).to(torch.bfloat16)
    angles = torch.rand(7, 8, generator=gen, dtype=torch.float64) * 6
    table = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    eager = m.apply_rotary(x, table)
    torch.testing.assert_close(m.apply_rotary(x, torch.view_as_real(table)), eager, rtol=0, atol=0)
    # the real form, by hand: (x0 cos - x1 sin, x0 sin + x1 cos) per channel pair
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    cos, sin = angles.cos().float()[None, :, None], angles.sin().float()[None, :, None]
    expected = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2).to(x.dtype)
    torch.testing.assert_close(eager, expected, rtol=0.01, atol=0.01)
    compiled_form = torch.compiler.is_compiling
    try:
        torch.compiler.is_compiling = lambda: True
        torch.testing.assert_close(m.apply_rotary(x, torch.view_as_real(table)), eager, rtol=0.01, atol=0.01)
    finally:
        torch.compiler.is_compiling = compiled_form
