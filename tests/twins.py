"""Test helpers: dense diffusers twins of SVDQ files, transformer inputs, the CLI command."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import load_file

from qwen_edit.svdq import awq_dense, read_checkpoint, svdq_dense
from qwen_edit.svdq.checkpoint import FUSED_PARTS, quantized_layer_kinds


def dense_twin(path) -> QwenImageTransformer2DModel:
    """A plain diffusers model carrying the file's weights, dequantized with svdq_dense / awq_dense."""
    ckpt = read_checkpoint(path)
    tensors = load_file(str(path))
    kinds = quantized_layer_kinds(ckpt.num_layers, ckpt.precision)
    state = {}
    for key, value in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in kinds:
            state[key] = value.float()
            continue
        if leaf != "qweight":
            continue
        layer = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == prefix}
        kind, shift = kinds[prefix]
        w, b = svdq_dense(layer, ckpt.precision, shift) if kind == "svdq" else awq_dense(layer)
        block, _, name = prefix.partition(".")[2].partition(".")
        parts = FUSED_PARTS.get(name, (name,))
        for part, wp, bp in zip(parts, w.chunk(len(parts)), b.chunk(len(parts)), strict=True):
            state[f"transformer_blocks.{block}.{part}.weight"] = wp
            state[f"transformer_blocks.{block}.{part}.bias"] = bp
    model = QwenImageTransformer2DModel(**{k: v for k, v in ckpt.config.items() if k[0] != "_"})
    model.load_state_dict(state, strict=True)
    return model.eval()


def with_text_lengths(inputs: dict) -> dict:
    """`inputs` for diffusers' QwenImageTransformer2DModel.forward, plus `txt_seq_lens` where the installed
    diffusers needs it.

    The 0.36 line (the worker extra's) sizes the text RoPE table from `txt_seq_lens` (its forward takes
    `max(txt_seq_lens)`, and None fails); later releases take the length from `encoder_hidden_states`
    and no longer accept the argument. Every text token here is real (no mask), so each prompt's length
    is the sequence length, which is the value the later releases use.
    """
    if "txt_seq_lens" not in inspect.signature(QwenImageTransformer2DModel.forward).parameters:
        return inputs
    batch, length = inputs["encoder_hidden_states"].shape[:2]
    return {**inputs, "txt_seq_lens": [length] * batch}


def forward_inputs(batch=1, ref_images=1):
    gen = torch.Generator().manual_seed(1)
    img_shapes = [[(1, 4, 4)] * (1 + ref_images)] * batch
    return with_text_lengths(
        dict(
            hidden_states=torch.randn(batch, 16 * (1 + ref_images), 64, generator=gen),
            encoder_hidden_states=torch.randn(batch, 7, 64, generator=gen),
            timestep=torch.tensor([0.625] * batch),  # exact in bf16: diffusers casts it to the model dtype,
            img_shapes=img_shapes,
            return_dict=False,
        )
    )


def cli_command() -> list[str]:
    """The installed `qwen-edit` script when it runs runners.cli, else `python -m runners.cli`.

    The script's own text is read rather than the entry-point metadata, which a stale egg-info in the
    checkout can shadow."""
    script = Path(sys.executable).with_name("qwen-edit")
    if script.is_file() and "runners.cli" in script.read_text(errors="ignore"):
        return [str(script)]
    return [sys.executable, "-m", "runners.cli"]
