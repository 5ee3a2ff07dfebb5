"""Reading an SVDQ transformer file: metadata, precision, rank, and tensors grouped by layer.

A Nunchaku Qwen-Image file is one `.safetensors` whose metadata holds the diffusers `config` (JSON)
and a `quantization_config` (JSON; `weight.dtype` is "int4" or "fp4_e2m1_all", plus `rank`).
Precision falls back to the `wscales` dtype (fp8 micro-scales mean NVFP4) and rank to the shape of
`proj_down`, because third-party files don't always carry complete metadata (and nunchaku's own
`get_precision()` guesses from the GPU, not the file: nunchaku-tech/nunchaku@3a3cc3d nunchaku/utils.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..header import DTYPES, HeaderError, few, read_header
from .layers import INT4_FC2_SHIFT

# Qwen-Image-Edit-2509's transformer config, for files that carry no `config` metadata.
DEFAULT_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
}


# Per-block quantized layers, under the file's names. SVDQ layers: (name, out, in) as multiples of the
# model width D and the MLP width F; "fused" marks the q/k/v layers (per-channel fp4 outer scale).
SVDQ_LAYERS = (
    ("attn.to_qkv", "3D", "D"),
    ("attn.add_qkv_proj", "3D", "D"),
    ("attn.to_out.0", "D", "D"),
    ("attn.to_add_out", "D", "D"),
    ("img_mlp.net.0.proj", "F", "D"),
    ("img_mlp.net.2", "D", "F"),
    ("txt_mlp.net.0.proj", "F", "D"),
    ("txt_mlp.net.2", "D", "F"),
)
FUSED_QKV = ("attn.to_qkv", "attn.add_qkv_proj")
# Diffusers' unfused projections that make up Nunchaku's fused layers, in the fused output order.
FUSED_PARTS = {
    "attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.add_qkv_proj": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
AWQ_LAYERS = ("img_mod.1", "txt_mod.1")  # Linear(D -> 6D), W4A16
BLOCK_NORMS = ("attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k")
# Tensors that files may omit: nunchaku fills a missing wcscales with ones and wtscale defaults to 1;
# smooth_factor_orig is never read at runtime.
OPTIONAL = ("wcscales", "wtscale", "smooth_factor_orig")

TensorSpec = tuple[tuple[int, ...], torch.dtype]


def expected_tensors(config: dict, precision: str, rank: int) -> dict[str, TensorSpec]:
    """Every tensor of a Nunchaku Qwen-Image file for `config`: {name: (shape, dtype)}.

    Derived from nunchaku's module definitions, whose `from_pretrained` loads the file strictly
    (nunchaku-tech/nunchaku@3a3cc3d nunchaku/models/transformers/transformer_qwenimage.py), and
    checked against the key manifests of the real files (tests/test_svdq_checkpoint.py).
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    f = 4 * d
    j = config["joint_attention_dim"]
    out = config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])
    bf16 = torch.bfloat16
    specs: dict[str, TensorSpec] = {
        "img_in.weight": ((d, config["in_channels"]), bf16),
        "img_in.bias": ((d,), bf16),
        "txt_norm.weight": ((j,), bf16),
        "txt_in.weight": ((d, j), bf16),
        "txt_in.bias": ((d,), bf16),
        "time_text_embed.timestep_embedder.linear_1.weight": ((d, 256), bf16),
        "time_text_embed.timestep_embedder.linear_1.bias": ((d,), bf16),
        "time_text_embed.timestep_embedder.linear_2.weight": ((d, d), bf16),
        "time_text_embed.timestep_embedder.linear_2.bias": ((d,), bf16),
        "norm_out.linear.weight": ((2 * d, d), bf16),
        "norm_out.linear.bias": ((2 * d,), bf16),
        "proj_out.weight": ((out, d), bf16),
        "proj_out.bias": ((out,), bf16),
    }
    size = {"D": d, "3D": 3 * d, "F": f}
    for i in range(config["num_layers"]):
        block = f"transformer_blocks.{i}"
        for name, n_key, k_key in SVDQ_LAYERS:
            n, k = size[n_key], size[k_key]
            p = f"{block}.{name}"
            specs[f"{p}.qweight"] = ((n, k // 2), torch.int8)
            if precision == "int4":
                specs[f"{p}.wscales"] = ((k // 64, n), bf16)
            else:
                specs[f"{p}.wscales"] = ((k // 16, n), torch.float8_e4m3fn)
            specs[f"{p}.smooth_factor"] = ((k,), bf16)
            specs[f"{p}.smooth_factor_orig"] = ((k,), bf16)
            specs[f"{p}.proj_down"] = ((k, rank), bf16)
            specs[f"{p}.proj_up"] = ((n, rank), bf16)
            specs[f"{p}.bias"] = ((n,), bf16)
            if precision == "fp4":
                if name in FUSED_QKV:
                    specs[f"{p}.wcscales"] = ((n,), bf16)
                else:
                    specs[f"{p}.wtscale"] = ((1,), bf16)
        for name in AWQ_LAYERS:
            p = f"{block}.{name}"
            rows = -(-(d // 64) // 16) * 16  # TinyChat pads the group rows to a multiple of 16
            specs[f"{p}.qweight"] = ((6 * d // 4, d // 2), torch.int32)
            specs[f"{p}.wscales"] = ((rows, 6 * d), bf16)
            specs[f"{p}.wzeros"] = ((rows, 6 * d), bf16)
            specs[f"{p}.bias"] = ((6 * d,), bf16)
        for name in BLOCK_NORMS:
            specs[f"{block}.{name}.weight"] = ((config["attention_head_dim"],), bf16)
    return specs


def check_tensors(found: dict[str, TensorSpec], expected: dict[str, TensorSpec]) -> list[str]:
    """Human-readable differences between a file's tensors and the expected ones (empty if it matches)."""
    problems = []
    missing = [k for k in expected if k not in found and k.rpartition(".")[2] not in OPTIONAL]
    unexpected = [k for k in found if k not in expected]
    if missing:
        problems.append(f"{len(missing)} tensors missing from the file: {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model has no place for: {few(unexpected)}")
    wrong = [
        f"{k} is {tuple(found[k][0])} {found[k][1]}, expected {tuple(shape)} {dtype}"
        for k, (shape, dtype) in expected.items()
        if k in found
        and (tuple(found[k][0]) != tuple(shape) or found[k][1] != dtype)
        and not (k.endswith("wtscale") and found[k][0] in ((1,), ()))  # wtscale may be any float type
    ]
    if wrong:
        problems.append(f"{len(wrong)} tensors with the wrong shape or dtype: {few(wrong, 3)}")
    return problems


def quantized_layer_kinds(num_layers: int, precision: str) -> dict[str, tuple[str, float]]:
    """{file prefix: (kind, act_shift)} for every quantized layer of a model with `num_layers` blocks."""
    kinds = {}
    for i in range(num_layers):
        block = f"transformer_blocks.{i}"
        for name, _, _ in SVDQ_LAYERS:
            shift = INT4_FC2_SHIFT if precision == "int4" and name.endswith("mlp.net.2") else 0.0
            kinds[f"{block}.{name}"] = ("svdq", shift)
        for name in AWQ_LAYERS:
            kinds[f"{block}.{name}"] = ("awq", 0.0)
    return kinds


@dataclass
class SVDQCheckpoint:
    path: Path
    config: dict
    precision: str  # "int4" or "fp4"
    rank: int
    tensors: dict[str, TensorSpec]  # name -> (shape, dtype), read from the header only
    quantization_config: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_layers"])

    def open(self, device: str = "cpu"):
        """A safetensors handle for reading tensors lazily (use as a context manager)."""
        return safe_open(str(self.path), framework="pt", device=device)


def _precision_from_metadata(quant: dict) -> str | None:
    dtype = str((quant.get("weight") or {}).get("dtype", "")).lower()
    if dtype == "int4":
        return "int4"
    if "fp4" in dtype:
        return "fp4"
    return None


def read_checkpoint(path: str | Path) -> SVDQCheckpoint:
    """Open `path` and describe it, without reading tensor data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"transformer file not found: {path}. Expected a Nunchaku SVDQ file such as "
            "'svdq-fp4_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors' (RTX 50xx) or "
            "'svdq-int4_r128-...' (RTX 20xx-40xx, A100); `qwen-edit download` fetches them."
        )
    try:
        header = read_header(path)
    except HeaderError as exc:
        raise CheckpointError(str(exc)) from exc
    metadata = header.metadata
    keys = list(header.tensors)
    tensors = {k: (t.shape, DTYPES.get(t.dtype)) for k, t in header.tensors.items()}
    wscales = next((k for k in keys if k.endswith(".wscales") and ".attn." in k), None)
    down = next((k for k in keys if k.endswith(".proj_down")), None)
    if wscales is None or down is None:
        hint = ""
        if any(k.startswith("transformer_blocks.0.attn.to_q.weight") for k in keys):
            hint = " It looks like an unquantized diffusers transformer; load it with diffusers instead."
        elif any(k.startswith(("model.", "visual.", "encoder.", "decoder.")) for k in keys):
            hint = " It looks like a text encoder or VAE file; pass it as text_encoder= or vae=."
        raise CheckpointError(f"{path} has no SVDQ layers (no *.wscales / *.proj_down tensors).{hint}")
    wscales_dtype = header.tensors[wscales].dtype
    rank = int(header.tensors[down].shape[1])

    config = json.loads(metadata["config"]) if "config" in metadata else dict(DEFAULT_CONFIG)
    quant = json.loads(metadata.get("quantization_config", "{}") or "{}")
    precision = _precision_from_metadata(quant) or ("fp4" if wscales_dtype.startswith("F8") else "int4")
    expected_scale = "F8_E4M3" if precision == "fp4" else "BF16"
    if wscales_dtype not in (expected_scale, "F16"):
        raise CheckpointError(
            f"{path}: metadata says {precision} but the scales are {wscales_dtype}; the file is inconsistent."
        )
    if quant.get("rank") not in (None, rank):
        raise CheckpointError(f"{path}: metadata rank {quant['rank']} but proj_down has rank {rank}")
    return SVDQCheckpoint(path, config, precision, rank, tensors, quant)


def group_by_layer(keys: list[str], layer_prefixes: set[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Split file keys into {layer prefix: {tensor name: key}} for known quantized layers, and the rest."""
    layers: dict[str, dict[str, str]] = {}
    rest = []
    for key in keys:
        prefix, _, name = key.rpartition(".")
        if prefix in layer_prefixes:
            layers.setdefault(prefix, {})[name] = key
        else:
            rest.append(key)
    return layers, rest


def load_tensors(handle, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    return {name: handle.get_tensor(key) for name, key in keys.items()}
