"""Text encoder files for tests, benchmarks and the demo: a small random Qwen2.5-VL in ComfyUI's single-file
format (scaled fp8, newer ComfyUI's quant spelling, or bf16) and as a diffusers `text_encoder/` folder.

Same tensor names and dtypes as the real files, only narrower; load them with
`qwen_edit.text_encoder.load_text_encoder(path, config=<the returned config>)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..fp8 import FP8
from ..text_encoder import DEFAULT_CONFIG, ScaledLinear, empty_text_encoder

# The 7B config's structure with small widths: text 32 wide (2 heads of 16, 1 KV head, M-RoPE sections
# summing to 8), vision 32 wide with an MLP of 40 (like the real 3420, not a multiple of 16) and one
# full-attention block of two. The vocabulary stays real so the real tokenizer's ids fit.
_TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_window_layers": 2,
}
_TINY_VISION = {
    "depth": 2,
    "fullatt_block_indexes": [1],
    "hidden_size": 32,
    "intermediate_size": 40,
    "num_heads": 2,
    "out_hidden_size": 32,
}


def tiny_text_encoder_config(*, vision_config: dict | None = None, **text_overrides) -> dict:
    """A small Qwen2.5-VL config dict in the format of text_encoder/config.json.

    text_overrides replace text-model keys (hidden_size, num_hidden_layers, vocab_size, mrope_section, ...),
    vision_config replaces vision-tower keys (depth, hidden_size, ...).
    """
    config = json.loads(DEFAULT_CONFIG.read_text())
    text = {**_TINY_TEXT, **text_overrides}
    mrope = text.pop("mrope_section", [2, 3, 3])
    text["layer_types"] = ["full_attention"] * text["num_hidden_layers"]
    rope = {**config["rope_scaling"], "mrope_section": mrope}
    config.update(text, rope_scaling=rope)
    config["text_config"].update(text, rope_scaling=rope)
    config["vision_config"].update(
        {**_TINY_VISION, "out_hidden_size": text["hidden_size"], **(vision_config or {})}
    )
    return config


@torch.no_grad()
def random_text_encoder_weights(
    config: dict, seed: int = 0, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """float32 weights for every parameter of the model `config` describes (Qwen2_5_VLModel names) plus
    `lm_head.weight`, from a generator on `device` seeded with `seed`, scaled so activations stay O(1).
    (A GPU makes the full-size 7B weights for benchmarks in seconds.)"""
    model = empty_text_encoder(config)
    generator = torch.Generator(device).manual_seed(seed)
    weights = {}
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator, device=device)
        elif name.endswith(".bias"):
            value = 0.05 * torch.randn(shape, generator=generator, device=device)
        elif name.endswith("embed_tokens.weight"):
            value = torch.randn(shape, generator=generator, device=device)
        else:  # Linear and patch conv: variance 1/fan_in keeps each layer's output near its input's scale
            value = torch.randn(shape, generator=generator, device=device) / math.sqrt(math.prod(shape[1:]))
        weights[name] = value
    text = model.language_model.config
    lm_head = torch.randn(text.vocab_size, text.hidden_size, generator=generator, device=device)
    weights["lm_head.weight"] = lm_head * 0.05
    return weights


def _linear_weight_names(config: dict) -> set[str]:
    model = empty_text_encoder(config)
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, ScaledLinear)}


def write_comfy_text_encoder(
    path: str | Path,
    *,
    fp8: bool = True,
    seed: int = 0,
    quant_format: str = "scaled_fp8",
    config: dict | None = None,
    device: torch.device | str = "cpu",
    **config_overrides,
) -> dict:
    """Write a small random Qwen2.5-VL in ComfyUI's single-file format; returns its config dict.

    Same names and dtypes as Comfy-Org/Qwen-Image_ComfyUI's qwen_2.5_vl_7b_fp8_scaled.safetensors, only
    smaller: with fp8, every Linear weight is float8_e4m3fn with a float32 scalar scale_weight (absmax / 448)
    and scale_input (1.0), everything else bf16, lm_head.weight included, plus the empty `scaled_fp8` marker
    and no metadata. quant_format="comfy_quant" writes newer ComfyUI's spelling instead (weight_scale and a
    `comfy_quant` JSON marker per layer, no scaled_fp8). fp8=False writes the bf16 single file.
    Pass the returned config to `load_text_encoder(..., config=)`.
    """
    from safetensors.torch import save_file

    if quant_format not in ("scaled_fp8", "comfy_quant"):
        raise ValueError(f"quant_format must be 'scaled_fp8' or 'comfy_quant', got {quant_format!r}")
    config = config if config is not None else tiny_text_encoder_config(**config_overrides)
    linear_weights = _linear_weight_names(config)
    tensors = {}
    for name, value in random_text_encoder_weights(config, seed, device).items():
        key = "model." + name[len("language_model.") :] if name.startswith("language_model.") else name
        if fp8 and name in linear_weights:
            layer = key[: -len(".weight")]
            scale = value.abs().max() / torch.finfo(FP8).max
            tensors[key] = (value / scale).to(FP8)
            if quant_format == "scaled_fp8":
                tensors[f"{layer}.scale_weight"] = scale.float().reshape(())
                tensors[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
            else:
                tensors[f"{layer}.weight_scale"] = scale.float().reshape(())
                marker = json.dumps({"format": "float8_e4m3fn"}).encode()
                tensors[f"{layer}.comfy_quant"] = torch.tensor(list(marker), dtype=torch.uint8)
        else:
            tensors[key] = value.to(torch.bfloat16)
    if fp8 and quant_format == "scaled_fp8":
        tensors["scaled_fp8"] = torch.empty(0, dtype=FP8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path))
    return config


def write_hf_text_encoder(
    folder: str | Path,
    *,
    seed: int = 0,
    shards: int = 2,
    layout: str = "legacy",
    config: dict | None = None,
    **config_overrides,
) -> dict:
    """Write a small random Qwen2.5-VL as a diffusers `text_encoder/` folder; returns its config dict.

    config.json plus bf16 shards model-0000i-of-0000n.safetensors and model.safetensors.index.json.
    layout="legacy" names tensors visual.* / model.* / lm_head.weight (what transformers 4.5x's
    save_pretrained writes for this model); layout="v5" uses model.visual.* / model.language_model.*.
    """
    from safetensors.torch import save_file

    if layout not in ("legacy", "v5"):
        raise ValueError(f"layout must be 'legacy' or 'v5', got {layout!r}")
    config = config if config is not None else tiny_text_encoder_config(**config_overrides)
    tensors = {}
    for name, value in random_text_encoder_weights(config, seed).items():
        if layout == "v5" and name != "lm_head.weight":
            key = "model." + name
        elif name.startswith("language_model."):
            key = "model." + name[len("language_model.") :]
        else:
            key = name
        tensors[key] = value.to(torch.bfloat16).contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: tensors[k] for k in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
    index["weight_map"] = weight_map
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return config
