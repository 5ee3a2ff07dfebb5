"""The portable Qwen-Image transformer: diffusers' model with Nunchaku's fused layer structure.

Nunchaku's file fuses q/k/v into `attn.to_qkv` and the text stream's into `attn.add_qkv_proj`
(nunchaku transformer_qwenimage.py, NunchakuQwenImageAttention). We keep diffusers'
`QwenImageTransformer2DModel` (its forward, embeddings, norms and blocks) and only swap the attention
projections for the fused ones, with an attention processor that splits them. One fused GEMM per
stream is also faster than three.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8, kernels

UNFUSED_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, L, H, D] by angle tables (Qwen's interleaved RoPE).

    freqs: [L, D/2, 2] float32 (cos, sin), as comfy_forward passes them, or complex [L, D/2] (diffusers'
    own forward). Eager, one complex multiplication is the fewest kernels; under torch.compile, real
    float32 arithmetic as ComfyUI's apply_rope1 does it (comfy/ldm/flux/math.py) fuses into the q/k norm
    kernel, where a complex product stays a kernel of its own. Both give the same numbers.
    """
    if freqs.is_complex():
        freqs = torch.view_as_real(freqs)
    if not torch.compiler.is_compiling():
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        rotated = pairs * torch.view_as_complex(freqs)[None, :, None, :]
        return torch.view_as_real(rotated).flatten(-2).to(x.dtype)
    cos, sin = freqs[None, :, None, :, 0], freqs[None, :, None, :, 1]
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)


class FusedQKVAttnProcessor:
    """Joint text+image attention for blocks whose q/k/v projections are fused (Nunchaku's layout).

    Same math as diffusers' QwenDoubleStreamAttnProcessor2_0: per-stream projections, RMS q/k norms,
    RoPE, one attention over [text, image], split, per-stream output projections.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        heads = attn.heads
        img_q, img_k, img_v = (t.unflatten(-1, (heads, -1)) for t in attn.to_qkv(hidden_states).chunk(3, -1))
        txt_q, txt_k, txt_v = (
            t.unflatten(-1, (heads, -1)) for t in attn.add_qkv_proj(encoder_hidden_states).chunk(3, -1)
        )
        img_q, img_k = attn.norm_q(img_q), attn.norm_k(img_k)
        txt_q, txt_k = attn.norm_added_q(txt_q), attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q, img_k = apply_rotary(img_q, img_freqs), apply_rotary(img_k, img_freqs)
            txt_q, txt_k = apply_rotary(txt_q, txt_freqs), apply_rotary(txt_k, txt_freqs)

        mask = None
        if encoder_hidden_states_mask is not None and not bool(encoder_hidden_states_mask.all()):
            image_mask = encoder_hidden_states_mask.new_ones(hidden_states.shape[:2])
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1).bool()[:, None, None, :]
        # text first, as in the reference model
        q, k, v = (torch.cat(pair, dim=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        out = self.attend(q, k, v, mask)

        seq_txt = encoder_hidden_states.shape[1]
        img_out = attn.to_out[0](out[:, seq_txt:].contiguous())
        txt_out = attn.to_add_out(out[:, :seq_txt].contiguous())
        return img_out, txt_out

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over [B, L, H, D] inputs -> [B, L, H*D]; SDPA on [B, H, L, D] views (copying them
        to that layout first gained nothing on an H100: benchmarks/RESULTS.md)."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).flatten(2).to(q.dtype)


def _fused_fp8_mlp(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' FeedForward (Linear -> tanh GELU -> Linear) with fp8 linears, the GELU and the second
    linear's activation quantization in one kernel (kernels.gelu_tanh_quantize)."""
    fc1, fc2 = self.net[0].proj, self.net[2]
    if not hidden_states.is_cuda or fc2.lora_down is not None:  # a LoRA branch needs the bf16 input
        return type(self).forward(self, hidden_states)
    codes, scale = kernels.gelu_tanh_quantize(fc1(hidden_states))
    y = fp8.scaled_matmul(codes, scale, fc2.weight, fc2.weight_scale, fc2.bias, hidden_states.dtype)
    return y.reshape(*hidden_states.shape[:-1], y.shape[-1])


def use_fused_fp8_mlp(model: nn.Module) -> bool:
    """Run every block's MLP as `_fused_fp8_mlp` where its linears compute in fp8 on fp8 tensor cores
    (the kernel writes e4m3, which needs SM >= 8.9) and Triton is there."""
    device = model.proj_out.weight.device
    if not fp8.fp8_supported(device) or not kernels.register():
        return False
    for block in model.transformer_blocks:
        for mlp in (block.img_mlp, block.txt_mlp):
            gelu, fc2 = mlp.net[0], mlp.net[2]
            if getattr(gelu, "approximate", None) == "tanh" and getattr(fc2, "compute", None) == "fp8":
                # A partial, not a bound method: saved compiled graphs pickle it (precompile.py).
                mlp.forward = functools.partial(_fused_fp8_mlp, mlp)
    return True


def build_model(config: dict) -> nn.Module:
    """diffusers' QwenImageTransformer2DModel for `config`, parameters on the meta device (no memory).

    The attention blocks get fused `to_qkv` / `add_qkv_proj` slots (unset; the loader fills them).
    """
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights():
        model = QwenImageTransformer2DModel.from_config(config)
    for block in model.transformer_blocks:
        attn = block.attn
        for name in UNFUSED_PROJECTIONS:
            delattr(attn, name)
        attn.set_processor(FusedQKVAttnProcessor())
    return model.eval().requires_grad_(False)


# -- ComfyUI's forward ------------------------------------------------------------------------------
# The reference workflow runs the DiT through ComfyUI's QwenImageTransformer2DModel._forward
# (comfyanonymous/ComfyUI comfy/ldm/qwen_image/model.py, process_img and _forward). It differs from
# diffusers' forward in three ways that change the pixels:
#   - text RoPE positions start at max(h_len // 2, w_len // 2) of the *noise* latent (diffusers takes
#     the max over the reference images too);
#   - h/w positions are centred as i - n // 2 (diffusers differs by one for odd grids);
#   - the timestep reaches the sinusoidal embedding in float32 (diffusers rounds it to bf16 first).
# comfy_forward reproduces ComfyUI's and calls the same submodules, so it runs on the portable model
# and on Nunchaku's model alike; only the RoPE tables' form differs: real (cos, sin) pairs for our
# processor, complex for Nunchaku's (NunchakuQwenImageNaiveFA2Processor applies them with diffusers'
# apply_rotary_emb_qwen(use_real=False)).


def _patchify(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """[B, C, 1, h, w] latent -> ([B, (h/2)(w/2), 4C] tokens, h_len, w_len); odd sizes padded circularly."""
    b, c, _, h, w = x.shape
    x = x[:, :, 0]
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:  # ComfyUI pad_to_patch_size uses circular padding
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="circular")
    hh, ww = x.shape[-2] // 2, x.shape[-1] // 2
    tokens = x.reshape(b, c, hh, 2, ww, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, hh * ww, c * 4)
    return tokens, hh, ww


def _unpatchify(tokens: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    hh, ww = (h + 1) // 2, (w + 1) // 2
    x = tokens.reshape(b, hh, ww, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * hh, 2 * ww)
    return x[:, :, None, :h, :w]


def rope_frequencies(positions: torch.Tensor, axes_dim: list[int], theta: float = 10000.0) -> torch.Tensor:
    """[N, 3] (frame, row, column) positions -> [N, sum(axes_dim)/2] complex64 rotations.

    Angles are computed in float64, as ComfyUI's EmbedND does, then rotated in float32.
    """
    parts = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = positions[:, axis].double()[:, None] * omega[None, :]
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=1).to(torch.complex64)


def image_positions(h_len: int, w_len: int, index: int) -> torch.Tensor:
    """ComfyUI's process_img ids: frame `index`, rows/columns centred as i - n // 2."""
    rows = torch.arange(h_len) - h_len // 2
    cols = torch.arange(w_len) - w_len // 2
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.full((grid.shape[0], 1), index), grid], dim=1)


def comfy_rope(
    noise_grid: tuple[int, int], ref_grids: list[tuple[int, int]], text_len: int, axes_dim: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image freqs for noise + references in order, text freqs) with ComfyUI's positions."""
    img = [image_positions(*noise_grid, 0)] + [
        image_positions(h, w, i + 1) for i, (h, w) in enumerate(ref_grids)
    ]
    txt_start = max(noise_grid[0] // 2, noise_grid[1] // 2)
    txt = torch.arange(txt_start, txt_start + text_len)[:, None].expand(-1, 3)
    return rope_frequencies(torch.cat(img), axes_dim), rope_frequencies(txt, axes_dim)


# A process-wide cache of device tensors: every step of an edit (and its cfg pass) asks for the same
# tables, and so does the next edit at the same sizes. Bound: 16 entries (least recently used go),
# each 512 bytes per token (image tokens [L, 64, 2] float32, or complex64 [L, 64], plus the text's):
# 8 MiB at the workflow's largest (a 1 MP output and three ~1 MP references, 16,384 image tokens),
# so at most ~130 MiB of GPU memory there; more only for larger images. `_rope_on.cache_clear()`
# frees them.
@functools.lru_cache(maxsize=16)
def _rope_on(
    device: torch.device,
    noise_grid: tuple[int, int],
    ref_grids: tuple,
    text_len: int,
    axes_dim: tuple,
    complex_form: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """comfy_rope as (cos, sin) tables [L, D/2, 2] (complex [L, D/2] with `complex_form`) on `device`,
    cached: every step (and the cfg pass) of an edit asks for the same ones."""
    img, txt = comfy_rope(noise_grid, list(ref_grids), text_len, list(axes_dim))
    if complex_form:
        return img.to(device), txt.to(device)
    return tuple(torch.view_as_real(t).contiguous().to(device) for t in (img, txt))


def takes_complex_rope(model: nn.Module) -> bool:
    """Whether the model's attention wants complex RoPE tables (Nunchaku's processor) or real pairs."""
    return not isinstance(model.transformer_blocks[0].attn.processor, FusedQKVAttnProcessor)


def comfy_forward(
    model: nn.Module,
    x: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    ref_latents: list[torch.Tensor] = (),
) -> torch.Tensor:
    """The transformer's flow prediction for latent `x` [B, 16, 1, h, w], as ComfyUI computes it.

    `timestep` is sigma, float32, shape [B]; `context` [B, L, joint_dim] the text encoder's hidden
    states; `ref_latents` the normalized reference latents, each [B or 1, 16, 1, h', w']. Returns
    [B, 16, 1, h, w] in x's dtype.
    """
    dtype = next(p for p in model.parameters() if p.is_floating_point() and p.element_size() > 1).dtype
    b, c, _, h, w = x.shape
    tokens, hh, ww = _patchify(x.to(dtype))
    num_noise = tokens.shape[1]
    grids = []
    for ref in ref_latents:
        ref_tokens, rh, rw = _patchify(ref.to(dtype))
        tokens = torch.cat([tokens, ref_tokens.expand(b, -1, -1)], dim=1)
        grids.append((rh, rw))
    rope = _rope_on(
        x.device, (hh, ww), tuple(grids), context.shape[1], tuple(model.config.axes_dims_rope),
        takes_complex_rope(model),
    )  # fmt: skip

    hidden = model.img_in(tokens)
    text = model.txt_in(model.txt_norm(context.to(dtype)))
    temb = model.time_text_embed(timestep.float(), hidden)  # float32 sinusoid, then the model dtype
    for block in model.transformer_blocks:
        text, hidden = block(
            hidden_states=hidden,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=None,
            temb=temb,
            image_rotary_emb=rope,
        )
    out = model.proj_out(model.norm_out(hidden, temb))
    return _unpatchify(out[:, :num_noise], c, h, w).to(x.dtype)
