"""Transformer block offload for the portable backend, and choosing offload settings from free VRAM.

Blocks `num_blocks_on_gpu` and above leave the GPU. What stays in CPU memory is each block's *packed*
file tensors (4-bit codes, scales, low-rank factors: ~0.56 bytes per weight, against 1 for fp8 and 2 for
bf16), pinned when `use_pin_memory`. When the model runs, each offloaded block is streamed through one
GPU buffer block: its packed tensors are copied to a staging slot on a side CUDA stream one block
ahead (two slots, ping-pong, as Nunchaku's CPUOffloadManager does), then expanded into the buffer's
bf16/fp8 weights on the compute stream right before the block runs. The copy of block i+1 overlaps the
expansion and compute of block i; after the last block the first offloaded one is prefetched for the
next step. Numerics are identical to the resident model: the same expansion runs, only later.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import fp8
from .backend import choose_backend, choose_compute
from .errors import ParameterError
from .hardware import describe_device
from .nunchaku_backend import NunchakuBlockStreamer, status
from .svdq.checkpoint import SVDQCheckpoint, group_by_layer, quantized_layer_kinds, read_checkpoint
from .svdq.layers import DequantizedLinear, awq_dense, svdq_dense

log = logging.getLogger(__name__)

CPU_OFFLOAD_MODES = ("auto", "enable", "disable")
GIB = 2**30
# Activation headroom per stage at 1 megapixel, from the H100 runs in benchmarks/RESULTS.md, rounded up:
# the whole edit peaked 4.1 GiB above its weights (the VAE decode); a transformer step 1.3 GiB; the
# text encoder's forward under 1 GiB.
ACTIVATION_BYTES = {"transformer": int(2.0 * GIB), "text_encoder": int(1.0 * GIB), "vae": int(4.5 * GIB)}
# Expanding one streamed layer needs float32 temporaries: the largest layer (12288 x 3072) three times.
EXPAND_BYTES = int(0.5 * GIB)


@dataclass(frozen=True)
class OffloadPlan:
    """What the pipeline keeps where, and why (`reason` is meant for logs and `qwen-edit doctor`)."""

    blocks_on_gpu: int  # transformer blocks resident on the GPU; the rest are streamed
    num_blocks: int
    use_pin_memory: bool
    encoders_on_cpu: bool  # text encoder and VAE brought to the GPU only for their stage
    reason: str

    @property
    def streams_blocks(self) -> bool:
        return self.blocks_on_gpu < self.num_blocks


# -- streaming ------------------------------------------------------------------------------------


class BlockStreamer:
    """Streams transformer blocks [first, num_blocks) through GPU buffer blocks.

    What the CPU keeps per streamed block is chosen by what costs less per block (measured on an
    H200, benchmarks/RESULTS.md): with fp8 compute, the fp8 weights themselves (1 byte per weight,
    copied straight into one of two ping-pong buffer blocks, nothing to expand); with bf16 compute, the
    packed file tensors (0.64 bytes per weight against 2), copied to a staging slot and expanded into
    one buffer block on the compute stream. The streamed blocks stay in `model.transformer_blocks` as
    shells (their layers keep bias, LoRA branch and names, not weights), so LoRAs and module names work
    as on resident blocks.
    """

    def __init__(self, model: nn.Module, pin: bool, device: torch.device):
        info = model.qwen_edit_info
        self.device, self.blocks = device, model.transformer_blocks
        self.pin = pin and torch.cuda.is_available()
        self.first = len(self.blocks)  # nothing streamed until set_first
        self.precision = info.precision
        self.form = "weights" if info.compute == "fp8" else "packed"
        self.ckpt: SVDQCheckpoint = model.qwen_edit_checkpoint  # load_transformer's: no second header read
        kinds = quantized_layer_kinds(self.ckpt.num_layers, self.ckpt.precision)
        self.layer_keys, _ = group_by_layer(list(self.ckpt.tensors), set(kinds))
        self.kinds = {name.split(".", 2)[2]: kind for name, kind in kinds.items()}
        self.host: dict[int, dict[str, dict[str, torch.Tensor]]] = {}  # block -> layer -> tensors
        self.buffers: list[nn.Module] = []
        self.staging: list = []
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._reset_events()

    def _reset_events(self) -> None:
        self.copied: list = [None, None]
        self.consumed: list = [None, None]
        self.pending: dict[int, int] = {}  # block index -> slot its copy went to

    @torch.no_grad()
    def set_first(self, first: int) -> None:
        """Stream blocks [first, n): strip newly streamed blocks, restore newly resident ones."""
        n = len(self.blocks)
        first = max(0, min(first, n))
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        for index in range(self.first, min(first, n)):
            self._restore(index)
        if first < self.first:
            with self.ckpt.open() as f:
                for index in range(first, self.first):
                    self._read(f, index)
                    self._strip(index)
        self.first = first
        self._reset_events()
        if first >= n:
            self.buffers, self.staging = [], []
        elif not self.buffers:
            count = 2 if self.form == "weights" else 1
            self.buffers = [_allocate_like(self.blocks[first], self.device) for _ in range(count)]
            if self.form == "weights":  # copies land in the buffers' own parameters
                self.staging = [_layer_tensors(buffer) for buffer in self.buffers]
            else:
                self.staging = [
                    {layer: {k: torch.empty_like(v, device=self.device) for k, v in t.items()}
                     for layer, t in self.host[first].items()}
                    for _ in range(2)
                ]  # fmt: skip

    def _read(self, handle, index: int) -> None:
        """Keep block `index` in host memory, in this streamer's form."""
        prefix = f"transformer_blocks.{index}."
        block_layers = {}
        for name, keys in self.layer_keys.items():
            if not name.startswith(prefix):
                continue
            layer = name[len(prefix) :]
            tensors = {k: handle.get_tensor(key) for k, key in keys.items() if k != "smooth_factor_orig"}
            if self.form == "weights":  # expand once now (on the GPU, where that is fast)
                weight, bias = self._dense(layer, {k: v.to(self.device) for k, v in tensors.items()})
                codes, scale = fp8.quantize_weight_per_channel(weight)
                tensors = {"weight": codes.cpu(), "weight_scale": scale.cpu(), "bias": bias.cpu()}
            block_layers[layer] = {k: v.pin_memory() if self.pin else v for k, v in tensors.items()}
        self.host[index] = block_layers

    def _strip(self, index: int) -> None:
        """Drop block `index`'s weights (if it has any) and route its forward through the buffers."""
        block = self.blocks[index]
        for module in block.modules():
            if isinstance(module, DequantizedLinear):
                module.weight = None
                module.weight_scale = None
        block.to("cpu")
        block.forward = functools.partial(self._run, index)

    def _restore(self, index: int) -> None:
        """Put block `index` back on the GPU in its resident form."""
        block = self.blocks[index]
        del block.forward
        block.to(self.device)
        for name, module in block.named_modules():
            if isinstance(module, DequantizedLinear):
                tensors = {k: v.to(self.device) for k, v in self.host[index][name].items()}
                if self.form == "weights":
                    module.weight = nn.Parameter(tensors["weight"], requires_grad=False)
                    module.weight_scale = nn.Parameter(tensors["weight_scale"], requires_grad=False)
                else:
                    module.set_weight(self._dense(name, tensors)[0])
        del self.host[index]

    def _dense(self, layer: str, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        kind, shift = self.kinds[layer]
        return svdq_dense(tensors, self.precision, shift) if kind == "svdq" else awq_dense(tensors)

    def _slot(self, index: int) -> int:
        return (index - self.first) % 2

    def _prefetch(self, index: int) -> None:
        if index in self.pending:
            return
        slot = self._slot(index)
        self.pending[index] = slot
        if self.copy_stream is None:  # CPU: plain copies, same code path
            _copy_into(self.staging[slot], self.host[index], non_blocking=False)
            return
        # The slot is free once the block that used it last is done with it (see `consumed`).
        if self.consumed[slot] is not None:
            self.copy_stream.wait_event(self.consumed[slot])
        else:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            _copy_into(self.staging[slot], self.host[index], non_blocking=True)
            self.copied[slot] = torch.cuda.Event()
            self.copied[slot].record(self.copy_stream)

    def _release(self, slot: int) -> None:
        if self.copy_stream is not None:
            self.consumed[slot] = torch.cuda.Event()
            self.consumed[slot].record(torch.cuda.current_stream(self.device))

    @torch.no_grad()
    def _materialize(self, index: int) -> nn.Module:
        """Make a buffer hold block `index` (compute stream) and return it."""
        self._prefetch(index)
        slot = self.pending.pop(index)
        if self.copy_stream is not None and self.copied[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        buffer = self.buffers[slot % len(self.buffers)]
        source = self.blocks[index]
        for name, module in buffer.named_modules():
            if isinstance(module, DequantizedLinear):
                if self.form == "packed":
                    weight, bias = self._dense(name, self.staging[slot][name])
                    module.set_weight(weight)
                    module.bias.copy_(bias)
                own = source.get_submodule(name)
                module.lora_down = None if own.lora_down is None else own.lora_down.to(self.device)
                module.lora_up = None if own.lora_up is None else own.lora_up.to(self.device)
            elif not any(True for _ in module.children()):  # the q/k RMSNorm weights: copied as they are
                for pname, param in module.named_parameters(recurse=False):
                    param.copy_(getattr(source.get_submodule(name), pname), non_blocking=True)
        if self.form == "packed":
            self._release(slot)  # the staging slot was read by the expansion
        return buffer

    def _run(self, index: int, *args, **kwargs):
        buffer = self._materialize(index)
        # Copy the next streamed block (after the last one: the first, for the next step) while this
        # one computes.
        self._prefetch(index + 1 if index + 1 < len(self.blocks) else self.first)
        out = buffer(*args, **kwargs)
        if self.form == "weights":  # the buffer's weights were the copy target: free after the compute
            self._release(self._slot(index))
        return out


def _layer_tensors(block: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {"weight", "weight_scale", "bias"}} views of a buffer block's quantized layers."""
    return {
        name: {"weight": m.weight.data, "weight_scale": m.weight_scale.data, "bias": m.bias.data}
        for name, m in block.named_modules()
        if isinstance(m, DequantizedLinear)
    }


def _copy_into(target: dict, source: dict, non_blocking: bool) -> None:
    for layer, tensors in source.items():
        for k, v in tensors.items():
            target[layer][k].copy_(v, non_blocking=non_blocking)


def _allocate_like(block: nn.Module, device: torch.device) -> nn.Module:
    """A GPU copy of a stripped block with empty weights of the right shapes, for the streamer."""
    forward = block.__dict__.pop("forward", None)  # the shell's forward points at the streamer: not copied
    try:
        buffer = copy.deepcopy(block)
    finally:
        if forward is not None:
            block.forward = forward
    buffer.to(device)
    for module in buffer.modules():
        if isinstance(module, DequantizedLinear):
            module.set_weight(torch.zeros(module.out_features, module.in_features, device=device))
    return buffer


def estimate_transformer_bytes(ckpt: SVDQCheckpoint, compute: str, backend: str) -> tuple[int, int, int]:
    """(bytes of one block on the GPU, of one block packed, of everything else), from the file header."""
    block_bytes = other = 0
    for name, (shape, dtype) in ckpt.tensors.items():
        size = math.prod(shape) * dtype.itemsize
        if not name.startswith("transformer_blocks."):
            other += size
        elif name.startswith("transformer_blocks.0."):
            block_bytes += size
    if backend == "portable":  # dequantized: one (fp8) or two (bf16) bytes per weight
        per_weight = 1 if compute == "fp8" else 2
        weights = 0
        for name, (shape, _) in ckpt.tensors.items():
            if name.startswith("transformer_blocks.0.") and name.endswith(".qweight"):
                weights += math.prod(shape) * (8 if len(shape) == 2 and "_mod." in name else 2)
        return weights * per_weight, block_bytes, other
    return block_bytes, block_bytes, other


def set_block_offload(model: nn.Module, num_blocks_on_gpu: int, use_pin_memory: bool) -> None:
    """Stream blocks >= `num_blocks_on_gpu` from CPU memory; >= the block count turns streaming off.

    Changing the setting moves only the blocks whose place changes.
    """
    n = len(model.transformer_blocks)
    if getattr(model.qwen_edit_info, "backend", "portable") == "nunchaku":
        streamer = getattr(model, "_qwen_edit_streamer", None)
        if streamer is None:
            if num_blocks_on_gpu >= n:
                return
            streamer = NunchakuBlockStreamer(model, model.img_in.weight.device, use_pin_memory)
        streamer.pin = use_pin_memory and torch.cuda.is_available()
        streamer.set_first(num_blocks_on_gpu)
        model._qwen_edit_streamer = streamer if num_blocks_on_gpu < n else None
        if streamer.device.type == "cuda":
            torch.cuda.empty_cache()
        return
    streamer: BlockStreamer | None = getattr(model, "_qwen_edit_streamer", None)
    if streamer is not None and streamer.pin != (use_pin_memory and torch.cuda.is_available()):
        streamer.set_first(n)  # bring everything back, then re-read into the other kind of host memory
        streamer = None
    if streamer is None:
        if num_blocks_on_gpu >= n:
            model._qwen_edit_streamer = None
            return
        streamer = BlockStreamer(model, use_pin_memory, model.img_in.weight.device)
    streamer.set_first(num_blocks_on_gpu)
    model._qwen_edit_streamer = streamer if num_blocks_on_gpu < n else None
    if streamer.device.type == "cuda":
        torch.cuda.empty_cache()


# -- choosing settings ----------------------------------------------------------------------------


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def vram_budget(device: torch.device) -> int:
    """Bytes this process may still allocate: free memory, capped by a per-process memory fraction."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = getter(index) if getter is not None else 1.0
    cap = int(total * fraction) - torch.cuda.memory_reserved(index)
    return min(free, cap)


def plan_offload(
    *,
    cpu_offload: str,
    num_blocks_on_gpu: int,
    use_pin_memory: bool,
    num_blocks: int,
    block_bytes: int,
    stream_buffer_bytes: int,
    other_transformer_bytes: int,
    text_encoder_bytes: int,
    vae_bytes: int,
    budget: int | None,
    activation_scale: float = 1.0,
    host_available: int | None = None,
) -> OffloadPlan:
    """Decide where things live. `budget`: GPU bytes available for the models and the activations.

    "disable": everything resident. "enable": blocks >= num_blocks_on_gpu streamed (Nunchaku's meaning),
    text encoder and VAE brought to the GPU per stage. "auto": the least offload that fits `budget`:
    nothing; else encoders per stage; else as many resident blocks as fit, the rest streamed.
    `activation_scale`: output megapixels times batch size, relative to the 1 MP measurements.
    "auto" also pins host memory for streamed blocks when the streamed bytes take less than half of
    `host_available` RAM: pinned copies ran 7x faster and hid behind compute (benchmarks/RESULTS.md).
    """
    if cpu_offload not in CPU_OFFLOAD_MODES:  # ParameterError (a ValueError): runners name the field
        raise ParameterError("cpu_offload", f"must be one of {CPU_OFFLOAD_MODES}, got {cpu_offload!r}")
    if not 0 <= num_blocks_on_gpu <= num_blocks:
        raise ParameterError("num_blocks_on_gpu", f"must be in [0, {num_blocks}], got {num_blocks_on_gpu}")

    def plan(blocks: int, encoders_on_cpu: bool, reason: str) -> OffloadPlan:
        return OffloadPlan(blocks, num_blocks, use_pin_memory, encoders_on_cpu, reason)

    if cpu_offload == "disable":
        return plan(num_blocks, False, "cpu_offload='disable'")
    if cpu_offload == "enable":
        return plan(num_blocks_on_gpu, True, f"cpu_offload='enable', num_blocks_on_gpu={num_blocks_on_gpu}")
    if budget is None:
        return plan(num_blocks, False, "not a CUDA device: nothing to offload")
    gib = lambda n: f"{n / GIB:.1f} GiB"  # noqa: E731
    act = {k: int(v * max(activation_scale, 1.0)) for k, v in ACTIVATION_BYTES.items()}
    transformer = other_transformer_bytes + num_blocks * block_bytes
    need_all = transformer + text_encoder_bytes + vae_bytes + max(act.values())
    if need_all <= budget:
        return plan(num_blocks, False, f"everything fits: {gib(need_all)} of {gib(budget)}")
    # The stages take turns: the text encoder's, each step's and the VAE's peaks never coincide.
    stage_peak = max(text_encoder_bytes + act["text_encoder"], vae_bytes + act["vae"], act["transformer"])
    if transformer + stage_peak <= budget:
        reason = f"{gib(need_all)} don't fit {gib(budget)}; the transformer does with the encoders per stage"
        return plan(num_blocks, True, reason)
    fixed = other_transformer_bytes + stream_buffer_bytes + stage_peak
    resident = (budget - fixed) // block_bytes
    if resident < 0:
        raise MemoryError(
            f"even with every transformer block streamed this needs ~{gib(fixed)} of GPU memory and "
            f"{gib(budget)} are available. Close other GPU programs, use compute='fp8' (half the block "
            "size), a smaller image, or a card with more memory."
        )
    blocks = int(min(num_blocks, resident))
    streamed = (num_blocks - blocks) * block_bytes
    if host_available is not None and streamed < host_available // 2:
        use_pin_memory = True
    reason = (
        f"{gib(budget)} available: {blocks} of {num_blocks} blocks resident "
        f"({block_bytes / GIB:.2f} GiB each), the rest streamed; encoders on the GPU per stage"
    )
    return plan(blocks, True, reason)


def stream_buffer_bytes(block_bytes: int, packed_block_bytes: int, compute: str) -> int:
    """GPU memory that streaming itself takes: two buffer blocks (fp8 weights, or Nunchaku's packed
    blocks), or one buffer block plus two packed staging slots and the expansion's float32 temporaries."""
    if compute == "fp8" or compute.startswith("nunchaku"):
        return 2 * block_bytes
    return block_bytes + 2 * packed_block_bytes + EXPAND_BYTES


def file_sizes(
    transformer: str | Path | SVDQCheckpoint,
    text_encoder: str | Path | None,
    vae: str | Path | None,
    *,
    device: torch.device,
    backend: str,
    compute: str,
) -> dict:
    """plan_offload's size arguments from the files (headers and sizes only, nothing loaded).

    `transformer`: the file, or its `read_checkpoint` description, so that a caller that loads the
    file next (or has loaded it: `model.qwen_edit_checkpoint`) reads its header only once.
    """
    ckpt = transformer if isinstance(transformer, SVDQCheckpoint) else read_checkpoint(transformer)
    info = describe_device(device)
    if backend not in ("portable", "nunchaku"):
        backend = choose_backend(backend, info, ckpt.precision, status())[0]
    if backend == "nunchaku":
        compute = f"nunchaku-{ckpt.precision}"
    elif compute not in ("bf16", "fp8"):
        compute = choose_compute(compute, info)
    block_bytes, packed_block_bytes, other = estimate_transformer_bytes(ckpt, compute, backend)
    return {
        "num_blocks": ckpt.num_layers,
        "block_bytes": block_bytes,
        "stream_buffer_bytes": stream_buffer_bytes(block_bytes, packed_block_bytes, compute),
        "other_transformer_bytes": other,
        # fp8 encoders stay fp8 in memory and the VAE stays bf16: their files are a fair estimate.
        "text_encoder_bytes": _path_bytes(text_encoder),
        "vae_bytes": _path_bytes(vae),
    }


def host_available_bytes() -> int | None:
    """Free host RAM (Linux), or None where it can't be read."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _path_bytes(path: str | Path | None) -> int:
    if path is None:
        return 0
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*.safetensors"))
    return path.stat().st_size
