"""Loading an SVDQ transformer file on any device: Nunchaku's kernels where they exist, else portable.

`load_transformer` returns a module with diffusers' `QwenImageTransformer2DModel` forward signature.
- backend="nunchaku": Nunchaku's own model class (4-bit kernels; SM 120/121 for fp4 files, SM 75/80/86/89
  for int4 files). Imported lazily: Nunchaku is a GitHub-release wheel, not a PyPI package.
- backend="portable": diffusers' model with our dequantized layers (svdq/layers.py); runs anywhere.
- backend="auto": Nunchaku when it is installed and supports both the card and the file, else portable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import nunchaku_backend
from .errors import NunchakuUnavailableError
from .hardware import DeviceInfo, UnsupportedHardwareError, describe_device, nunchaku_precision_error
from .model import build_model, use_fused_fp8_mlp
from .nunchaku_backend import NunchakuStatus, version_problem
from .svdq.checkpoint import (
    AWQ_LAYERS,
    SVDQ_LAYERS,
    CheckpointError,
    SVDQCheckpoint,
    check_tensors,
    expected_tensors,
    few,
    group_by_layer,
    load_tensors,
    read_checkpoint,
)
from .svdq.layers import INT4_FC2_SHIFT, AWQLinear, DequantizedLinear, SVDQLinear

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nunchaku", "portable")
COMPUTES = ("auto", "bf16", "fp8")
UNUSED_AT_RUNTIME = ("smooth_factor_orig",)  # nunchaku linear.py: kept in files, never read


@dataclass(frozen=True)
class TransformerInfo:
    """What `load_transformer` chose and why; attached to the model as `model.qwen_edit_info`."""

    path: str
    backend: str
    compute: str
    precision: str
    rank: int
    device: str
    reason: str
    load_seconds: float


def choose_backend(
    backend: str, info: DeviceInfo, precision: str, installed: NunchakuStatus
) -> tuple[str, str]:
    """(backend, reason). Raises where the requested backend cannot work here, saying what to do.

    "auto" takes Nunchaku where the card has kernels for the file's precision and a working Nunchaku
    of a version that supports the card is installed; where Nunchaku can't run (not installed, broken,
    too old) it falls back to the portable backend with a warning, whatever the file. A card with
    kernels for the *other* precision and a working Nunchaku is an error: almost surely the wrong file.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "portable":
        return "portable", "backend='portable' was requested"
    card_problem = nunchaku_precision_error(info, precision)
    install_problem = installed.problem() or (version_problem(info, installed) if installed.ok else None)
    if backend == "nunchaku":
        if card_problem:
            raise UnsupportedHardwareError(card_problem)
        if install_problem:
            raise NunchakuUnavailableError(install_problem)
        return "nunchaku", f"{info.name} ({info.sm}) runs {precision} files with Nunchaku's kernels"
    # auto
    if info.nunchaku_precision is None:
        if info.capability == (7, 5):
            return "portable", card_problem
        return "portable", f"{info.name} ({info.sm}) has no Nunchaku kernels; using dequantized weights"
    if install_problem:
        log.warning(
            "%s could run %s files with Nunchaku's 4-bit kernels, but: %s Falling back to the portable "
            "backend (dequantized weights: more memory).",
            info.name,
            info.nunchaku_precision,
            install_problem,
        )
        return "portable", f"Nunchaku can't run here: {install_problem}"
    if card_problem:  # a card with 4-bit kernels, but for the other precision: almost surely the wrong file
        raise UnsupportedHardwareError(card_problem)
    return "nunchaku", f"{info.name} ({info.sm}) runs {precision} files with Nunchaku's kernels"


def choose_compute(compute: str, info: DeviceInfo) -> str:
    if compute not in COMPUTES:
        raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
    if compute == "auto":
        return "fp8" if info.has_fp8_tensor_cores else "bf16"
    return compute


def load_transformer(
    path: str | Path,
    *,
    backend: str = "auto",
    compute: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    num_blocks_on_gpu: int | None = None,
    use_pin_memory: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Load a Nunchaku SVDQ Qwen-Image(-Edit) transformer file.

    compute (portable backend): "bf16" dequantizes every 4-bit layer once into `dtype` weights; "fp8"
    stores them as fp8 with per-channel scales (half the memory; fp8 tensor cores on SM >= 8.9);
    "auto" picks fp8 where the card has fp8 tensor cores. `dtype` is the activation dtype.
    num_blocks_on_gpu: None keeps every block on the device; a number streams the blocks from that one
    on from CPU memory (pinned with `use_pin_memory`), see offload.py. They never occupy the GPU whole.
    compile: torch.compile each block (portable backend): 1.27x (bf16) and 1.92x (fp8) faster steps on
    an H100, for 14-21 s of compilation at the first step (benchmarks/RESULTS.md).
    """
    start = time.perf_counter()
    ckpt = read_checkpoint(path)
    info = describe_device(device)
    chosen, reason = choose_backend(backend, info, ckpt.precision, nunchaku_backend.status())
    streamed_from = ckpt.num_layers if num_blocks_on_gpu is None else num_blocks_on_gpu
    if chosen == "nunchaku":
        if dtype != torch.bfloat16:
            raise ValueError(f"the Nunchaku backend runs bf16 (its Qwen-Image kernels), not {dtype}")
        model = nunchaku_backend.load_model(ckpt, info.device, dtype, streamed_from, use_pin_memory)
        mode = f"nunchaku-{ckpt.precision}"
    else:
        mode = choose_compute(compute, info)
        model = _load_portable(ckpt, info.device, mode, dtype, streamed_from)
    seconds = time.perf_counter() - start
    model.qwen_edit_info = TransformerInfo(
        str(ckpt.path), chosen, mode, ckpt.precision, ckpt.rank, str(info.device), reason, seconds
    )
    if streamed_from < ckpt.num_layers:
        from .offload import set_block_offload

        set_block_offload(model, streamed_from, use_pin_memory)
    if compile and chosen == "portable":
        compile_blocks(model)
    log.info("transformer loaded: %s", model.qwen_edit_info)
    return model


def compile_blocks(model: nn.Module) -> None:
    """torch.compile every block that runs its own weights: resident blocks and the streamer's buffers.

    Per block rather than the whole model: the 60 blocks share one compiled graph, so compiling costs
    one block's time, and the Python loop between blocks (offload hooks, RoPE tables) stays eager.
    Dynamic shapes: prompt lengths (and image sizes) change from one edit to the next, and a static graph
    recompiled for each new length (5-9 s on an H100) where the dynamic one runs at once, ~1% slower per
    step (benchmarks/RESULTS.md).
    """
    streamer = getattr(model, "_qwen_edit_streamer", None)
    blocks = [
        b for b in model.transformer_blocks if "forward" not in b.__dict__
    ]  # streamed shells run a buffer
    for block in [*blocks, *(streamer.buffers if streamer is not None else [])]:
        block.compile(dynamic=True)


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


@torch.no_grad()
def _load_portable(
    ckpt: SVDQCheckpoint, device: torch.device, compute: str, dtype: torch.dtype, streamed_from: int
) -> nn.Module:
    problems = check_tensors(ckpt.tensors, expected_tensors(ckpt.config, ckpt.precision, ckpt.rank))
    if problems:
        raise CheckpointError(_mismatch_message(ckpt, problems))
    model = build_model(ckpt.config)
    kinds = quantized_layer_kinds(ckpt.num_layers, ckpt.precision)
    layers, plain_keys = group_by_layer(list(ckpt.tensors), set(kinds))
    with ckpt.open() as f:
        for prefix, keys in layers.items():
            kind, shift = kinds[prefix]
            if int(prefix.split(".")[1]) >= streamed_from:  # a streamed block: its layers get no weights
                in_features = 2 * ckpt.tensors[keys["qweight"]][0][1]  # [N or N/4, K/2] in both kinds
                out_features = ckpt.tensors[keys["bias"]][0][0]
                layer = DequantizedLinear.shell(out_features, in_features, compute, dtype)
                parent, _, leaf = prefix.rpartition(".")
                setattr(model.get_submodule(parent), leaf, layer)
                continue
            tensors = load_tensors(f, {n: k for n, k in keys.items() if n not in UNUSED_AT_RUNTIME})
            if kind == "svdq":
                layer = SVDQLinear.from_packed(
                    tensors,
                    precision=ckpt.precision,
                    act_shift=shift,
                    compute=compute,
                    dtype=dtype,
                    device=device,
                )
            else:
                layer = AWQLinear.from_packed(tensors, compute=compute, dtype=dtype, device=device)
            parent, _, leaf = prefix.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer)  # also creates the fused slots
        unplaced = [k for k in plain_keys if not _assign_plain(model, k, f.get_tensor(k), device, dtype)]
    # Guards against a model/spec disagreement (e.g. a diffusers release that renames a module).
    unfilled = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unplaced:
        problems.append(f"{len(unplaced)} file tensors match no model parameter: {few(unplaced)}")
    if unfilled:
        problems.append(f"{len(unfilled)} model parameters not filled by the file: {few(unfilled)}")
    if problems:
        raise CheckpointError(_mismatch_message(ckpt, problems))
    model = model.to(device)
    if compute == "fp8":
        use_fused_fp8_mlp(model)
    return model


def _mismatch_message(ckpt: SVDQCheckpoint, problems: list[str]) -> str:
    return (
        f"{ckpt.path} ({ckpt.precision}, rank {ckpt.rank}, {ckpt.num_layers} blocks) does not match the "
        "Qwen-Image transformer layout:\n  "
        + "\n  ".join(problems)
        + "\nIs it a complete, unmodified Nunchaku Qwen-Image(-Edit) file? "
        "A partial download is a common cause."
    )


def _assign_plain(
    model: nn.Module, key: str, value: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> bool:
    """Put a bf16 file tensor into the parameter of the same name. False if there is no such parameter."""
    owner_name, _, attr = key.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return False
    if attr not in owner._parameters:
        return False
    value = value.to(device=device, dtype=dtype)
    owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    return True
