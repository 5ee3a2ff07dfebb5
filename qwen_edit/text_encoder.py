"""The Qwen2.5-VL-7B text encoder of Qwen-Image-Edit-2509, loaded without ComfyUI.

Accepted files (all hold the same network; ComfyUI reads the first with comfy/sd.py:919-962 and
comfy/ops.py:379-428 at Comfy-Org/ComfyUI@a125cd8):
- ComfyUI's `qwen_2.5_vl_7b_fp8_scaled.safetensors`: every Linear weight is float8_e4m3fn with a float32
  `scale_weight` (W = fp8 * scale_weight), plus unused `scale_input`s, an unused `lm_head.weight` and an
  empty `scaled_fp8` marker. Newer ComfyUI spells the scales `weight_scale` / `input_scale` and adds
  `comfy_quant` markers; both spellings load.
- a bf16 single file with the same (legacy transformers) names and no scales;
- the `text_encoder/` folder of Qwen/Qwen-Image-Edit-2509 (config.json + safetensors shards).

The network is transformers' `Qwen2_5_VLModel` (vision tower + LLM, no lm_head: the edit pipeline needs
the final-norm hidden states, not logits). It is built on the meta device and filled tensor by tensor, so
no random init of 8B parameters happens and fp8 weights stay fp8 (about 8.3 GB instead of 15.5 GB bf16).
Every nn.Linear becomes a `ScaledLinear`, which casts its weight to the activation dtype layer by layer like
ComfyUI (`compute="upcast"`, the default: ComfyUI's numbers) or, opted into, multiplies with fp8 tensor cores
(`compute="fp8"`: activations rounded to fp8 too, which moves the conditioning; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .backend import TEXT_ENCODER_COMPUTES
from .errors import TextEncoderFileError
from .fp8 import FP8, fp8_linear, quantize_weight_per_channel
from .hardware import describe_device
from .header import HeaderError, few, read_header
from .precompile import compile_modules

if TYPE_CHECKING:
    from transformers import Qwen2_5_VLConfig

log = logging.getLogger(__name__)

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)
# Qwen2.5-VL-7B-Instruct as Qwen/Qwen-Image-Edit-2509 ships it in text_encoder/config.json
# (huggingface.co/Qwen/Qwen-Image-Edit-2509 @983d8d2); ComfyUI hard-codes the same values
# (Comfy-Org/ComfyUI@a125cd8:comfy/text_encoders/llama.py:57-77, qwen_vl.py:263-284).
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "qwen25_vl_7b.json"
EXPECTED_FILES = (
    "ComfyUI's 'qwen_2.5_vl_7b_fp8_scaled.safetensors' (Comfy-Org/Qwen-Image_ComfyUI, "
    "split_files/text_encoders), a bf16 single file with the same tensor names, or the 'text_encoder/' "
    "folder of Qwen/Qwen-Image-Edit-2509"
)

# File key prefix -> Qwen2_5_VLModel prefix; the first match wins, so the longer prefixes come first.
# transformers >= 4.52 (and v5) nest the towers as model.visual / model.language_model under
# Qwen2_5_VLForConditionalGeneration; ComfyUI files and older checkpoints use visual.* / model.*
# (transformers 4.57.6 modeling_qwen2_5_vl.py:1359-1362, _checkpoint_conversion_mapping).
_PREFIXES = (
    ("model.visual.", "visual."),
    ("model.language_model.", "language_model."),
    ("visual.", "visual."),
    ("language_model.", "language_model."),
    ("model.", "language_model."),
)
# <|endoftext|>: the pad id ComfyUI gives the Qwen2.5-VL encoder (Comfy-Org/ComfyUI@a125cd8,
# comfy/text_encoders/qwen_image.py:52).
END_OF_TEXT_ID = 151643
_SCALE_LEAVES = ("scale_weight", "weight_scale")  # legacy scaled-fp8 / newer ComfyUI quant format
_UNUSED_LEAVES = ("scale_input", "input_scale", "comfy_quant")  # ComfyUI ignores these for the TE
# Kept in the files, never read: the encoder returns hidden states, not logits (ComfyUI comments the
# lm_head out, llama.py:370), and `scaled_fp8` only marks the file format.
_UNUSED_KEYS = ("lm_head.weight", "scaled_fp8")

_ST_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}

TensorSpec = tuple[str, tuple[int, ...]]  # (safetensors dtype string, shape), read from the header


@dataclass(frozen=True)
class TextEncoderInfo:
    """What `load_text_encoder` loaded; attached to the model as `model.qwen_edit_info`."""

    path: str
    kind: str  # "comfy_fp8", "comfy_bf16" or "hf_folder"
    compute: str  # "fp8" or "upcast"
    dtype: torch.dtype  # activation dtype
    device: str
    parameter_bytes: int
    load_seconds: float


@dataclass
class LoadPlan:
    """Which file tensor fills which model parameter."""

    params: dict[str, str]  # model parameter name -> file key
    scales: dict[str, str]  # ScaledLinear module name -> file key of its weight scale
    unused: list[str]  # file keys deliberately left unread (lm_head, scale_input, format markers)


class ScaledLinear(nn.Module):
    """nn.Linear whose weight may be fp8 codes times a float32 scale (per tensor [] or per channel [N]).

    fp8_matmul=True multiplies with `qwen_edit.fp8.fp8_linear` (fp8 tensor cores on SM >= 8.9; activations
    quantized per token). Otherwise the weight is cast to the activation dtype for this call only (fp8 ->
    bf16/fp32 is exact), so one dequantized layer exists at a time, and the scale multiplies the output:
    x (W s)^T = (x W^T) s. ComfyUI scales the weight or the input depending on their sizes
    (Comfy-Org/ComfyUI@a125cd8:comfy/ops.py:405-410), equal up to rounding; scaling the output needs no
    scaled copy of the weight and never rounds the scale to bf16.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        )
        self.register_parameter("scale_weight", None)  # set at load for fp8 weights
        self.fp8_matmul = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.fp8_matmul:
            # torch._scaled_mm's row-wise scaling only produces bf16, so the GPU path computes in bf16
            # and casts; the bias is added afterwards for the same reason.
            out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
            y = fp8_linear(x, self.weight, self.scale_weight, None, out_dtype).to(x.dtype)
            return y if bias is None else y + bias
        if self.scale_weight is None:
            return F.linear(x, self.weight.to(x.dtype), bias)
        y = (F.linear(x, self.weight.to(x.dtype)) * self.scale_weight).to(x.dtype)  # [] or [N] scale
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, fp8_matmul={self.fp8_matmul}"
        )


# ---------------------------------------------------------------------------------------------------------
# Building the empty model


def text_encoder_config(config: dict | str | Path | None = None) -> Qwen2_5_VLConfig:
    """A transformers `Qwen2_5_VLConfig`: the packaged 7B config, a config.json path, or a config dict."""
    from transformers import Qwen2_5_VLConfig
    from transformers.utils import logging as hf_logging

    if config is None:
        config = DEFAULT_CONFIG
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    if config.get("model_type") != "qwen2_5_vl":
        raise TextEncoderFileError(
            f"text encoder config has model_type={config.get('model_type')!r}; Qwen-Image-Edit-2509 needs a "
            "'qwen2_5_vl' (Qwen2.5-VL) config, like text_encoder/config.json of Qwen/Qwen-Image-Edit-2509."
        )
    # transformers v5 warns that it renamed rope_scaling to rope_parameters; the file format is v4's.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        cfg = Qwen2_5_VLConfig.from_dict(config)
    finally:
        hf_logging.set_verbosity(verbosity)
    for sub in (cfg, cfg.text_config, cfg.vision_config):
        sub._attn_implementation = "sdpa"  # no flash-attn dependency; sdpa picks flash kernels itself
    return cfg


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Parameters on the meta device, buffers (RoPE inv_freq) real: accelerate's init_empty_weights."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def empty_text_encoder(config: dict | str | Path | None = None) -> nn.Module:
    """transformers' Qwen2_5_VLModel with meta parameters and every nn.Linear replaced by ScaledLinear."""
    from transformers import Qwen2_5_VLModel

    cfg = text_encoder_config(config)
    with _params_on_meta():
        model = Qwen2_5_VLModel(cfg)
        if not (hasattr(model, "visual") and hasattr(model, "language_model")):
            # transformers < 4.52 had the vision tower outside Qwen2_5_VLModel
            raise ImportError("qwen-edit needs transformers >= 4.57 (pip install -U transformers)")
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        for name, linear in linears:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(
                parent, leaf, ScaledLinear(linear.in_features, linear.out_features, linear.bias is not None)
            )
    model.eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------------
# Matching file tensors to parameters


def model_param_name(file_key: str) -> str | None:
    """The Qwen2_5_VLModel name for a file key in any known layout (ComfyUI, transformers v4/v5), or None."""
    for prefix, target in _PREFIXES:
        if file_key.startswith(prefix):
            return target + file_key[len(prefix) :]
    return None


def plan_load(model: nn.Module, specs: dict[str, TensorSpec], source: str = "the file") -> LoadPlan:
    """Match every file tensor to a parameter (strict both ways), or raise TextEncoderFileError."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    linears = {name for name, m in model.named_modules() if isinstance(m, ScaledLinear)}
    params: dict[str, str] = {}
    scales: dict[str, str] = {}
    unused: list[str] = []
    unexpected: list[str] = []
    wrong_shape: list[str] = []
    reported: set[str] = set()
    problems: list[str] = []
    for key, (dtype, shape) in specs.items():
        if key in _UNUSED_KEYS:
            unused.append(key)
            continue
        name = model_param_name(key)
        if name is None:
            unexpected.append(key)
            continue
        owner, _, leaf = name.rpartition(".")
        if leaf in _SCALE_LEAVES and owner in linears:
            if dtype not in ("F32", "BF16", "F16"):
                problems.append(f"{key} is {dtype}; weight scales must be float")
            if owner in scales:
                problems.append(f"{owner} has two weight scales: {scales[owner]} and {key}")
            scales[owner] = key
        elif leaf in _UNUSED_LEAVES and owner in linears:
            unused.append(key)
        elif name not in expected:
            unexpected.append(key)
        elif dtype not in _ST_DTYPES:
            problems.append(f"{key} is {dtype}; only scaled fp8 and float (bf16/fp16/fp32) files load")
            reported.add(name)
        elif tuple(shape) != expected[name]:
            wrong_shape.append(f"{key} {list(shape)} (model: {list(expected[name])})")
            reported.add(name)
        elif name in params:
            problems.append(f"{name} is in the file twice: {params[name]} and {key}")
        else:
            params[name] = key
    missing = [name for name in expected if name not in params and name not in reported]
    for owner in sorted(linears):
        weight_key = params.get(f"{owner}.weight")
        is_fp8 = weight_key is not None and specs[weight_key][0].startswith("F8")
        scale_key = scales.get(owner)
        if is_fp8 and scale_key is None:
            missing.append(f"{owner}.scale_weight (the weight is fp8)")
        elif scale_key is not None and weight_key is not None and not is_fp8:
            problems.append(f"{scale_key} scales a {specs[weight_key][0]} weight; only fp8 weights have one")
        elif scale_key is not None and specs[scale_key][1] not in ((), (1,), expected[f"{owner}.weight"][:1]):
            problems.append(f"{scale_key} has shape {list(specs[scale_key][1])}; expected [] or [out]")
    if unexpected:
        problems.insert(0, f"{len(unexpected)} file tensors match no model parameter: {few(unexpected)}")
    if missing:
        problems.insert(0, f"{len(missing)} model parameters are not in the file: {few(missing)}")
    if wrong_shape:
        problems.insert(0, f"{len(wrong_shape)} tensors have the wrong shape: {few(wrong_shape, 3)}")
    if problems:
        hidden = expected["language_model.norm.weight"][0]
        raise TextEncoderFileError(
            _mismatch_message(source, specs, problems, len(params), len(expected), hidden)
        )
    return LoadPlan(params, scales, unused)


def _mismatch_message(
    source: str, specs: dict[str, TensorSpec], problems: list[str], found: int, total: int, hidden: int
) -> str:
    return (
        f"{source} is not a Qwen2.5-VL-7B text encoder file as Qwen-Image-Edit-2509 needs it "
        f"({found} of {total} parameters found):\n  "
        + "\n  ".join(problems)
        + f"\nIt looks like {guess_file_kind(specs, hidden)}.\nExpected {EXPECTED_FILES}."
    )


def guess_file_kind(specs: dict[str, TensorSpec], hidden_size: int = 3584) -> str:
    """A best guess at what a safetensors file holds, for error messages."""
    keys = list(specs)

    def has(*fragments: str) -> bool:
        return any(f in k for k in keys for f in fragments)

    if not keys:
        return "an empty file"
    if has("lora_A", "lora_B", "lora_down", "lora_up", "lora_unet", "lora_te"):
        return "a LoRA file (load it as a LoRA, not as the text encoder)"
    if has("qweight", "wscales", "smooth_factor"):
        return "a Nunchaku SVDQ diffusion model (pass it to load_transformer)"
    if has("transformer_blocks.", "diffusion_model.", "img_in.", "double_blocks."):
        return "a diffusion model (DiT) file (pass it to load_transformer)"
    if has("decoder.upsamples", "decoder.middle", "encoder.downsamples", "post_quant_conv", "up_blocks."):
        return "a VAE file such as qwen_image_vae.safetensors (pass it to load_vae)"
    if has("text_model.encoder", "text_projection"):
        return "a CLIP text encoder, not Qwen2.5-VL"
    if has("encoder.block.", "shared.weight"):
        return "a T5 text encoder, not Qwen2.5-VL"
    q_key = next((k for k in keys if k.endswith("layers.0.self_attn.q_proj.weight")), None)
    if q_key is not None:
        hidden = specs[q_key][1][-1] if specs[q_key][1] else None
        n_layers = len({k.split("layers.", 1)[1].split(".", 1)[0] for k in keys if "layers." in k})
        if not has("visual."):
            return (
                f"a text-only LLM ({n_layers} layers, hidden size {hidden}) without the vision tower; "
                "the edit model needs Qwen2.5-VL-7B with its vision tower"
            )
        if hidden != hidden_size:
            return (
                f"a Qwen2.5-VL model of another size ({n_layers} layers, hidden size {hidden}); "
                f"the model being loaded has hidden size {hidden_size} (Qwen-Image-Edit-2509 needs the 7B "
                "one, 3584)"
            )
        return "an incomplete or modified Qwen2.5-VL file (a partial download is a common cause)"
    return "an unknown model"


# ---------------------------------------------------------------------------------------------------------
# Reading files


@dataclass
class _Source:
    path: Path
    kind: str
    config: dict | Path
    specs: dict[str, TensorSpec]
    files: dict[str, Path]  # file key -> the safetensors file holding it


def _read_headers(files: Sequence[Path]) -> tuple[dict[str, TensorSpec], dict[str, Path]]:
    specs: dict[str, TensorSpec] = {}
    where: dict[str, Path] = {}
    for file in files:
        try:
            header = read_header(file)
        except HeaderError as exc:
            raise TextEncoderFileError(
                f"{exc}. Expected {EXPECTED_FILES}; GGUF and .ckpt/.bin text encoders are not supported."
            ) from exc
        for key, tensor in header.tensors.items():
            specs[key] = (tensor.dtype, tensor.shape)
            where[key] = file
    return specs, where


def _open_source(path: str | Path) -> _Source:
    path = Path(path)
    if path.is_dir() and (path / "text_encoder").is_dir() and not (path / "config.json").is_file():
        path = path / "text_encoder"  # the diffusers repository root was passed
    if path.is_file():
        specs, where = _read_headers([path])
        fp8 = "scaled_fp8" in specs or any(k.rsplit(".", 1)[-1] in _SCALE_LEAVES for k in specs)
        return _Source(path, "comfy_fp8" if fp8 else "comfy_bf16", DEFAULT_CONFIG, specs, where)
    if path.is_dir():
        return _open_folder(path)
    raise FileNotFoundError(
        f"text encoder not found: {path}. Expected {EXPECTED_FILES}. In ComfyUI it lives in "
        "models/text_encoders/ (or models/clip/)."
    )


def _open_folder(folder: Path) -> _Source:
    config = folder / "config.json"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            raise FileNotFoundError(
                f"{folder} lists {len(shards)} weight shards in {index.name} but {len(absent)} are missing: "
                f"{few(absent)}. Download the whole text_encoder/ folder of Qwen/Qwen-Image-Edit-2509."
            )
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not config.is_file() or not files:
        lacking = "config.json" if not config.is_file() else "*.safetensors weights"
        raise FileNotFoundError(
            f"{folder} is a folder without {lacking}. "
            f"Expected {EXPECTED_FILES} (a folder needs config.json and its model-*.safetensors shards)."
        )
    specs, where = _read_headers(files)
    return _Source(folder, "hf_folder", config, specs, where)


# ---------------------------------------------------------------------------------------------------------
# Loading


def _stored_dtype(role: str, file_dtype: torch.dtype, compute: str, dtype: torch.dtype) -> torch.dtype:
    """Memory dtype of a parameter. role: "linear" (a Linear weight), "embed" or "other"."""
    if role == "linear":
        if file_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return file_dtype
        if compute == "fp8":
            return FP8  # quantized per output channel at load
    if role in ("linear", "embed"):
        # 16-bit weights stay as stored and are cast per use (ComfyUI does the same); wider ones are
        # narrowed to the activation dtype so an fp32 checkpoint does not need 33 GB.
        return file_dtype if file_dtype.itemsize <= 2 else dtype
    # norms, biases and the patch conv: tiny; bf16 -> fp32 is exact, so fp32 activations see ComfyUI's values
    return dtype


def _roles(model: nn.Module) -> dict[str, str]:
    roles = {}
    for name, module in model.named_modules():
        if isinstance(module, ScaledLinear):
            roles[f"{name}.weight"] = "linear"
        elif isinstance(module, nn.Embedding):
            roles[f"{name}.weight"] = "embed"
    return roles


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters (what the weights cost in device memory)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _check_options(compute: str, dtype: torch.dtype) -> None:
    if compute not in TEXT_ENCODER_COMPUTES:
        raise ValueError(f"compute must be one of {TEXT_ENCODER_COMPUTES}, got {compute!r}")
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(
            f"dtype (the activation dtype) must be torch.float32 (what ComfyUI computes in) or "
            f"torch.bfloat16, got {dtype}; Qwen2.5-VL's activations overflow float16."
        )


@torch.no_grad()
def load_text_encoder(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    compute: str = "upcast",
    dtype: torch.dtype = torch.bfloat16,
    config: dict | str | Path | None = None,
) -> nn.Module:
    """Load the Qwen2.5-VL text encoder from a ComfyUI single file or a diffusers `text_encoder/` folder.

    compute: "upcast" (default) casts each weight to `dtype` when its layer runs: ComfyUI's way and its
    numbers (ComfyUI multiplies in fp8 only with its `--fast` option). "fp8" (opt-in) multiplies fp8
    weights with fp8 tensor cores (SM >= 8.9; emulated elsewhere) and rounds the activations to fp8 too:
    the conditioning moves several % from ComfyUI's, and at an edit's few hundred tokens it was slower on
    an H200, not faster (benchmarks/RESULTS.md, issue 14). fp8
    files stay fp8 in memory either way; with compute="fp8" a bf16 file is quantized to fp8 (per output
    channel) at load.
    dtype: activation dtype; ComfyUI computes in torch.float32, bf16 is faster and half the activations.
    config: only for non-7B test models; defaults to the folder's config.json or the packaged 7B config.
    Returns transformers' Qwen2_5_VLModel (run it with `encode_tokens`), with `.qwen_edit_info` attached.
    """
    start = time.perf_counter()
    _check_options(compute, dtype)
    source = _open_source(path)
    info = describe_device(device)
    if compute == "fp8" and not info.has_fp8_tensor_cores:
        log.warning(
            "compute='fp8' on %s (%s): no fp8 tensor cores, so fp8 matmuls are emulated (slow)",
            info.name,
            info.sm,
        )
    model = empty_text_encoder(config if config is not None else source.config)
    plan = plan_load(model, source.specs, str(source.path))
    _fill(model, plan, source, info.device, compute, dtype)
    model.to(info.device)  # the RoPE buffers
    use_masked_window_attention(model)
    model.qwen_edit_info = TextEncoderInfo(
        str(source.path),
        source.kind,
        compute,
        dtype,
        str(info.device),
        parameter_bytes(model),
        time.perf_counter() - start,
    )
    log.info("text encoder loaded: %s", model.qwen_edit_info)
    return model


def _fill(
    model: nn.Module, plan: LoadPlan, source: _Source, device: torch.device, compute: str, dtype: torch.dtype
) -> None:
    from safetensors import safe_open

    roles = _roles(model)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, key in [*plan.params.items(), *((f"{m}.scale_weight", k) for m, k in plan.scales.items())]:
        by_file.setdefault(source.files[key], []).append((name, key))
    read_device = str(device) if device.type == "cuda" else "cpu"
    for file, items in by_file.items():
        with safe_open(str(file), framework="pt", device=read_device) as f:
            for name, key in items:
                owner_name, _, leaf = name.rpartition(".")
                owner = model.get_submodule(owner_name)
                tensor = f.get_tensor(key).to(device)
                if leaf == "scale_weight":
                    tensor = tensor.float()
                else:
                    role = roles.get(name, "other")
                    stored = _stored_dtype(role, tensor.dtype, compute, dtype)
                    if stored == FP8 and tensor.dtype != FP8:
                        tensor, scale = quantize_weight_per_channel(tensor)
                        owner.scale_weight = nn.Parameter(scale, requires_grad=False)
                    tensor = tensor.to(stored)
                setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))
    for module in model.modules():
        if isinstance(module, ScaledLinear):
            # torch._scaled_mm needs both matrix sizes divisible by 16; the ViT MLP (3420 wide) is not,
            # so those layers dequantize instead.
            module.fp8_matmul = (
                compute == "fp8"
                and module.weight.dtype == FP8
                and module.in_features % 16 == 0
                and module.out_features % 16 == 0
            )


# ---------------------------------------------------------------------------------------------------------
# Running


def mrope_position_ids(
    seq_len: int,
    image_spans: Sequence[tuple[int, int]],
    grids: Sequence[Sequence[int]],
    merge_size: int = 2,
) -> torch.Tensor:
    """Qwen2.5-VL's 3-axis (t, h, w) RoPE positions, [3, 1, seq_len].

    Text advances all three axes by one per token. An image of (t, h, w) patches occupies
    t*(h/m)*(w/m) tokens that share the current position on t and add their row (h) and column (w)
    index; the text after it resumes at the image's start + max(h/m, w/m). Same rule as ComfyUI
    (Comfy-Org/ComfyUI@a125cd8:comfy/text_encoders/llama.py:481-504) and transformers' get_rope_index.
    """
    pos = torch.empty(3, seq_len, dtype=torch.long)
    cursor = 0  # next token index
    next_pos = 0  # position of the next text token
    for (start, count), grid in zip(image_spans, grids, strict=True):
        t, h, w = (int(v) for v in grid)
        gh, gw = h // merge_size, w // merge_size
        if count != t * gh * gw:
            raise ValueError(f"image span of {count} tokens does not match its grid {t}x{h}x{w}")
        if start < cursor or start + count > seq_len:
            raise ValueError(f"image spans must be sorted, disjoint and inside the sequence: {image_spans}")
        pos[:, cursor:start] = torch.arange(next_pos, next_pos + start - cursor)
        next_pos += start - cursor
        idx = torch.arange(count)
        pos[0, start : start + count] = next_pos + idx // (gh * gw)
        pos[1, start : start + count] = next_pos + (idx // gw) % gh
        pos[2, start : start + count] = next_pos + idx % gw
        next_pos += max(gh, gw)
        cursor = start + count
    pos[:, cursor:] = torch.arange(next_pos, next_pos + seq_len - cursor)
    return pos[:, None, :]


def _activation_dtype(model: nn.Module) -> torch.dtype:
    info = getattr(model, "qwen_edit_info", None)
    return info.dtype if info is not None else model.language_model.norm.weight.dtype


@torch.inference_mode()
def image_embeddings(model: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The vision tower + merger for one image: [t*h*w/4, hidden] in the activation dtype."""
    device = model.language_model.norm.weight.device
    grid_thw = torch.as_tensor(grid_thw, dtype=torch.long).reshape(-1, 3).to(device)
    with sdpa_kernel(ENCODER_ATTENTION):
        out = model.visual(pixel_values.to(device), grid_thw=grid_thw)
    # transformers v5 returns an output object whose pooler_output is the merged tokens; 4.5x a tensor
    return getattr(out, "pooler_output", out).to(_activation_dtype(model))


# Attention backends for the encoder: not cuDNN's, which builds a plan for every new sequence length
# (~57 ms on an H100, and prompt lengths differ from one edit to the next); at a few hundred tokens
# the others are as fast.
ENCODER_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _rotate_vision(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL's vision RoPE (rotate-half form, float32), x [L, H, D], cos/sin [L, D]."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos[:, None].float() + rotated * sin[:, None].float()).to(x.dtype)


def _masked_window_attention(
    self: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    rotary_pos_emb: torch.Tensor | None = None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' Qwen2_5_VLVisionAttention.forward as one attention call.

    The original runs one SDPA per window (16 windows x 28 layers for a 384x384 image) after a
    `cu_seqlens.tolist()` host sync in every layer; a block-diagonal mask built on the device gives the
    same result in one call, and the block then compiles without graph breaks.
    """
    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    if position_embeddings is None:  # older transformers releases passed only the angles
        angles = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
        position_embeddings = (angles.cos(), angles.sin())
    cos, sin = position_embeddings
    q, k = _rotate_vision(q, cos, sin), _rotate_vision(k, cos, sin)
    window = torch.searchsorted(cu_seqlens, torch.arange(n, device=cu_seqlens.device), right=True)
    mask = (window[:, None] == window[None, :])[None, None]
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask)
    return self.proj(out[0].transpose(0, 1).reshape(n, -1))


def use_masked_window_attention(model: nn.Module) -> None:
    """Run every vision block's attention as `_masked_window_attention` (same numbers, no host syncs)."""
    for block in model.visual.blocks:
        # A partial of a module-level function rather than a bound method: saved graphs (precompile.py)
        # pickle the module, and torch's guard pickler can't find a bound method under another name.
        block.attn.forward = functools.partial(_masked_window_attention, block.attn)


def compile_text_encoder(model: nn.Module) -> None:
    """torch.compile each language-model layer and vision block, with dynamic shapes (prompt lengths and
    image sizes vary, and one compiled graph then serves them all), saved on disk (precompile.py)."""
    compile_modules(list(model.language_model.layers), "text-encoder-layer")
    compile_modules(list(model.visual.blocks), "vision-block")


@contextmanager
def checks_between_layers(model: nn.Module, check: Callable[[], None]) -> Iterator[None]:
    """Call `check` (which raises to stop) before each language-model layer and vision block while the
    block runs: one encoder call on a long prompt can take seconds, and this is where it can stop.
    Compiled layers are left alone (a hook inside a compiled graph would break it at every call)."""
    layers = [*getattr(getattr(model, "language_model", None), "layers", ()),
              *getattr(getattr(model, "visual", None), "blocks", ())]  # fmt: skip
    handles = [
        layer.register_forward_pre_hook(lambda _module, _args: check())
        for layer in layers
        if getattr(layer, "_compiled_call_impl", None) is None
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def comfy_attention_mask(
    input_ids: Sequence[int] | torch.Tensor, image_spans: Sequence[tuple[int, int]] = ()
) -> list[int] | None:
    """The key mask ComfyUI's Qwen2.5-VL encoder applies to one sequence (1 = attended), or None if it
    masks nothing.

    ComfyUI builds the encoder with `special_tokens={"pad": 151643}` and attention masks on
    (Comfy-Org/ComfyUI@a125cd8, comfy/text_encoders/qwen_image.py:50-52). With no end token, the first
    text token equal to that pad id (<|endoftext|>, which a prompt may hold literally) and every text
    token after it get mask 0 (comfy/sd1_clip.py:170-200); image embeddings spliced in later always get
    1 (:232). The LLM turns the mask into -inf on those keys, on top of the causal mask
    (comfy/text_encoders/llama.py:391-400); the masked positions still produce hidden states.
    """
    ids = torch.as_tensor(input_ids).reshape(-1).tolist()
    image = [False] * len(ids)
    for start, count in image_spans:
        image[start : start + count] = [True] * count
    first = next((i for i, t in enumerate(ids) if t == END_OF_TEXT_ID and not image[i]), None)
    if first is None:
        return None
    return [1 if i < first or image[i] else 0 for i in range(len(ids))]


@torch.inference_mode()
def encode_tokens(
    model: nn.Module,
    input_ids: Sequence[int] | torch.Tensor,
    *,
    images: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    image_spans: Sequence[tuple[int, int]] = (),
) -> torch.Tensor:
    """Final-norm hidden states [1, L, hidden] of one token sequence (ComfyUI's layer="last").

    images: (pixel_values [N, 1176], grid_thw [1, 3]) per image, from tokenizer.preprocess_vision_image;
    image_spans: (start, length) of each image's tokens in input_ids; their ids are ignored and their
    embeddings replaced by the vision tower's output, as ComfyUI splices them in (sd1_clip.py:203-234).
    A literal <|endoftext|> and the text after it are masked as attention keys (`comfy_attention_mask`).
    """
    if len(images) != len(image_spans):
        raise ValueError(f"{len(images)} images but {len(image_spans)} image spans; give one span per image")
    with sdpa_kernel(ENCODER_ATTENTION):
        return _encode_tokens(model, input_ids, images, image_spans)


def _encode_tokens(model, input_ids, images, image_spans) -> torch.Tensor:
    dtype = _activation_dtype(model)
    lm = model.language_model
    device = lm.norm.weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).to(device)
    embeds = lm.embed_tokens(ids).to(dtype)
    grids = []
    for (pixel_values, grid_thw), (start, count) in zip(images, image_spans, strict=True):
        feats = image_embeddings(model, pixel_values, grid_thw)
        if feats.shape[0] != count:
            raise ValueError(f"image at token {start} has {feats.shape[0]} embeddings but a span of {count}")
        embeds[0, start : start + count] = feats
        grids.append(torch.as_tensor(grid_thw).reshape(-1).tolist())
    merge = model.visual.spatial_merge_size
    positions = mrope_position_ids(ids.shape[1], image_spans, grids, merge).to(device)
    keys = comfy_attention_mask(input_ids, image_spans)
    # Only a sequence that masks something passes a mask: without one the LLM keeps its plain causal path.
    mask = None if keys is None else torch.tensor([keys], dtype=torch.long, device=device)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    return out.last_hidden_state
