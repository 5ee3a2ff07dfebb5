"""The portable Qwen-Image transformer: diffusers' model with Nunchaku's fused layer structure.

Nunchaku's file fuses q/k/v into `attn.to_qkv` and the text stream's into `attn.add_qkv_proj`
(nunchaku transformer_qwenimage.py, NunchakuQwenImageAttention). We keep diffusers'
`QwenImageTransformer2DModel` (its forward, embeddings, norms and blocks) and only swap the attention
projections for the fused ones, with an attention processor that splits them. One fused GEMM per
stream is also faster than three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

UNFUSED_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels by complex `freqs` [L, D/2]; x is [B, L, H, D] (Qwen's interleaved RoPE)."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs[None, :, None, :]
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


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

        # [B, L, H, D] -> [B, H, L, D] for SDPA, text first as in the reference model.
        q = torch.cat([txt_q, img_q], dim=1).transpose(1, 2)
        k = torch.cat([txt_k, img_k], dim=1).transpose(1, 2)
        v = torch.cat([txt_v, img_v], dim=1).transpose(1, 2)
        mask = None
        if encoder_hidden_states_mask is not None and not bool(encoder_hidden_states_mask.all()):
            image_mask = encoder_hidden_states_mask.new_ones(hidden_states.shape[:2])
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1).bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        out = out.to(q.dtype)

        seq_txt = encoder_hidden_states.shape[1]
        img_out = attn.to_out[0](out[:, seq_txt:].contiguous())
        txt_out = attn.to_add_out(out[:, :seq_txt].contiguous())
        return img_out, txt_out


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
