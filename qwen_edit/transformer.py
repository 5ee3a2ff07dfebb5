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
from .backend import NunchakuUnavailableError as NunchakuUnavailableError  # raised by load_transformer
from .backend import choose_backend, choose_compute
from .hardware import describe_device
from .header import few
from .model import build_model, use_fused_fp8_mlp
from .offload import set_block_offload
from .precompile import compile_modules
from .svdq.checkpoint import (
    CheckpointError,
    SVDQCheckpoint,
    check_tensors,
    expected_tensors,
    group_by_layer,
    load_tensors,
    quantized_layer_kinds,
    read_checkpoint,
)
from .svdq.layers import AWQLinear, DequantizedLinear, SVDQLinear

log = logging.getLogger(__name__)

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


def load_transformer(
    path: str | Path | SVDQCheckpoint,
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
    path: the file, or its `read_checkpoint` description when the caller has read the header already
    (the pipeline plans memory from it first). The description stays on the model as
    `model.qwen_edit_checkpoint`, where offload planning and block streaming find it later.
    """
    start = time.perf_counter()
    ckpt = path if isinstance(path, SVDQCheckpoint) else read_checkpoint(path)
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
    model.qwen_edit_checkpoint = ckpt
    if streamed_from < ckpt.num_layers:
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
    step (benchmarks/RESULTS.md). The compiled graph is saved on disk for the next process (precompile.py).
    Called again after the offload changes (`QwenEditPipeline.set_offload`): blocks that became streamed
    shells lose their compiled call (they hand the work to a buffer), and new buffers get one.
    """
    streamer = getattr(model, "_qwen_edit_streamer", None)
    blocks = []
    for block in model.transformer_blocks:
        if "forward" in block.__dict__:  # a streamed shell: it runs a buffer
            block._compiled_call_impl = None
        else:
            blocks.append(block)
    compile_modules([*blocks, *(streamer.buffers if streamer is not None else [])], "transformer-block")
    model.qwen_edit_compiled = True


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
