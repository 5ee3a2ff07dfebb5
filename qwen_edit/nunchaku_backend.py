"""The Nunchaku backend: Nunchaku's own Qwen-Image blocks and 4-bit kernels, loaded and streamed by us.

Nunchaku (github.com/nunchaku-tech/nunchaku) is a GitHub-release wheel with a compiled extension; it is
imported lazily and only here. What we take from it is the model structure and the kernels behind its
layers (`SVDQW4A4Linear`, `AWQW4A16Linear`, the fused GELU MLP). What we do ourselves:
- `status()`: is it installed, broken, the unrelated PyPI package, or too old for this card;
- `load_model()`: the file's tensors straight onto their device (Nunchaku's `from_pretrained` reads the
  whole file into CPU memory first, asks the *card* for the precision instead of the file, and moves
  the whole model to the GPU before offload can be set up);
- `NunchakuBlockStreamer`: block offload that works with `comfy_forward`, which walks the blocks itself
  (Nunchaku's CPUOffloadManager only streams inside Nunchaku's own `forward`), and with LoRAs, which
  change the shapes of the low-rank branches.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from .hardware import DeviceInfo
from .header import few
from .svdq.checkpoint import CheckpointError, SVDQCheckpoint, check_tensors, expected_tensors

log = logging.getLogger(__name__)

RELEASES = "https://github.com/nunchaku-tech/nunchaku/releases"
# SM 121 (DGX Spark) kernels first shipped in Nunchaku 1.1.0, built with CUDA 13 (its release notes);
# 1.0.x's get_precision() even answers "int4" there.
MIN_VERSION = {(12, 1): (1, 1, 0)}
# The GEMM's LoRA epilogue keeps one scale per 16 ranks in a fixed array of MAX_RANK / 16 floats
# (nunchaku src/kernels/zgemm/lora.cuh, MAX_RANK = 1024): a longer low-rank branch overflows it.
MAX_RANK = 1024


@dataclass(frozen=True)
class NunchakuStatus:
    """What `import nunchaku` gives: state is "ok", "missing", "broken" or "impostor"."""

    state: str
    version: str | None = None
    detail: str = ""  # the import error, for "broken"

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def problem(self) -> str | None:
        """Why Nunchaku can't be used at all (None when it imports); says what to do."""
        if self.state == "missing":
            return (
                "nunchaku is not installed. It is not on PyPI (the PyPI package named 'nunchaku' is "
                f"unrelated): install the wheel matching your torch and Python from {RELEASES} "
                "(README, 'Install on a pod'), or use backend='portable'."
            )
        if self.state == "broken":
            return (
                f"nunchaku {self.version or ''} is installed but does not import ({self.detail}). "
                "A wheel built for another torch, CUDA or Python fails like this: reinstall the wheel "
                f"whose '+torchX.Y' tag matches torch {torch.__version__.split('+')[0]} from {RELEASES}."
            )
        if self.state == "impostor":
            return (
                "the installed 'nunchaku' is not Nunchaku's Qwen-Image package (the PyPI package of that "
                f"name is unrelated, or the wheel predates Qwen-Image): `pip uninstall -y nunchaku`, then "
                f"install the wheel from {RELEASES}."
            )
        return None


def _version_tuple(version: str | None) -> tuple[int, ...]:
    """'1.1.0dev20251230+torch2.9' -> (1, 1, 0): the release numbers, nothing after them."""
    match = re.match(r"\d+(\.\d+)*", version or "")
    return tuple(int(n) for n in match.group(0).split(".")) if match else (0,)


# Once per process (a single entry): importing Nunchaku loads its CUDA extension, and what it gives
# cannot change while the process runs. Tests that fake an installation call status.cache_clear().
@functools.cache
def status() -> NunchakuStatus:
    """Import Nunchaku once and say how that went. The root logger is left as it was: Nunchaku's
    modules call logging.basicConfig(INFO) at import (nunchaku models/transformers/utils.py)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        import nunchaku
    except ModuleNotFoundError as exc:
        if exc.name == "nunchaku":
            return NunchakuStatus("missing")
        return NunchakuStatus("broken", _installed_version(), f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # e.g. an undefined symbol in a wheel built for another torch
        return NunchakuStatus("broken", _installed_version(), f"{type(exc).__name__}: {exc}")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    version = _installed_version()
    if not hasattr(nunchaku, "NunchakuQwenImageTransformer2DModel"):
        return NunchakuStatus("impostor", version)
    return NunchakuStatus("ok", version)


def _installed_version() -> str | None:
    """The wheel's version (with its '+torchX.Y' tag), else the package's own (a source checkout)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("nunchaku")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        from nunchaku.__version__ import __version__

        return __version__
    except Exception:
        return None


def version_problem(info: DeviceInfo, installed: NunchakuStatus) -> str | None:
    """Why the installed Nunchaku is too old for this card, or None."""
    needed = MIN_VERSION.get(info.capability or (0, 0))
    if needed is None or _version_tuple(installed.version) >= needed:
        return None
    want = ".".join(map(str, needed))
    return (
        f"{info.name} ({info.sm}) needs Nunchaku >= {want} (built with CUDA 13); nunchaku "
        f"{installed.version} is installed. Install a {want}+ wheel from {RELEASES}, or use "
        "backend='portable'."
    )


# -- loading ----------------------------------------------------------------------------------------


@torch.no_grad()
def load_model(
    ckpt: SVDQCheckpoint, device: torch.device, dtype: torch.dtype, streamed_from: int, pin: bool
) -> nn.Module:
    """Nunchaku's Qwen-Image model for `ckpt`, each tensor read once from the file onto its device:
    blocks >= `streamed_from` into CPU memory (pinned with `pin`), everything else onto `device`."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
    from nunchaku import NunchakuQwenImageTransformer2DModel

    problems = check_tensors(ckpt.tensors, expected_tensors(ckpt.config, ckpt.precision, ckpt.rank))
    if problems:
        layout = "\n  ".join(problems)
        raise CheckpointError(f"{ckpt.path} does not match the Qwen-Image transformer layout:\n  {layout}")

    def home(name: str) -> torch.device | str:
        """Where a tensor of module `name` lives: streamed blocks in CPU memory, the rest on `device`."""
        streamed = name.startswith("transformer_blocks.") and int(name.split(".")[1]) >= streamed_from
        return "cpu" if streamed else device

    # Only the keys this diffusers release knows (a file's config may come from a newer one).
    known = inspect.signature(QwenImageTransformer2DModel.__init__).parameters
    config = {k: v for k, v in ckpt.config.items() if k in known}
    with init_empty_weights():
        # Called directly: its __init__(*args, **kwargs) hides the arguments from diffusers' from_config,
        # which then builds the default (full-size) config whatever the file says.
        model = nn.Module.to(NunchakuQwenImageTransformer2DModel(**config), dtype)  # no diffusers warning
        # The file's precision, not the card's (Nunchaku's loader asks get_precision() for the card's).
        model._patch_model(precision="nvfp4" if ckpt.precision == "fp4" else "int4", rank=ckpt.rank)
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    pinned = pin and torch.cuda.is_available()
    with ckpt.open() as f:
        for key in ckpt.tensors:
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            value = f.get_tensor(key)
            if attr == "wtscale":  # a Python float in Nunchaku's layer (the kernel takes it as alpha)
                owner.wtscale = float(value.float().reshape(-1)[0])
                continue
            if attr == "smooth_factor_orig":  # never read at runtime: not kept in memory
                owner._parameters[attr] = None
                continue
            current = targets.get(key)
            if attr in ("wscales", "wzeros") and current is not None and value.shape[0] > current.shape[0]:
                # AWQ group rows: TinyChat pads them to a multiple of 16 (checkpoint.expected_tensors);
                # Nunchaku's layer holds K/64. Equal for the real width (3072: 48 rows), not for tiny ones.
                value = value[: current.shape[0]].contiguous()
            if current is None or tuple(current.shape) != tuple(value.shape) or current.dtype != value.dtype:
                want = "nothing" if current is None else f"{tuple(current.shape)} {current.dtype}"
                found = f"{tuple(value.shape)} {value.dtype}"
                raise CheckpointError(f"{ckpt.path}: {key} is {found}, the model wants {want}")
            where = home(key)
            value = value.pin_memory() if where == "cpu" and pinned else value.to(where)
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[attr] = value
    for name, module in model.named_modules():  # files may omit wcscales: Nunchaku fills ones
        scales = getattr(module, "wcscales", None)
        if isinstance(scales, torch.Tensor) and scales.is_meta:
            ones = torch.ones(scales.shape, dtype=scales.dtype, device=home(name))
            module.wcscales = nn.Parameter(ones, requires_grad=False)
    # The RoPE module's tables are computed at construction, which the meta device skipped.
    model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(config["axes_dims_rope"]), scale_rope=True)
    model.pos_embed.to(device)
    unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:
        raise CheckpointError(f"{ckpt.path}: {len(unfilled)} model tensors not in the file: {few(unfilled)}")
    return model.eval().requires_grad_(False)


# -- block streaming --------------------------------------------------------------------------------


class NunchakuBlockStreamer:
    """Streams Nunchaku blocks [first, n) from CPU memory through two GPU buffer blocks (ping-pong).

    The streamed blocks stay in `model.transformer_blocks`, holding their packed tensors in (pinned)
    CPU memory, so LoRAs and module names work on them as on resident blocks. Each one's tensors are
    copied into a buffer on a side stream while the block before it computes. A buffer is rebuilt from
    its block when their tensors' shapes or the layers' hooks differ (a LoRA appends ranks to the
    low-rank branches, and not always to every block alike), so LoRA changes need no notification.
    """

    def __init__(self, model: nn.Module, device: torch.device, pin: bool):
        self.blocks, self.device = model.transformer_blocks, device
        self.pin = pin and torch.cuda.is_available()
        self.first = len(self.blocks)
        self.buffers: list[nn.Module | None] = [None, None]
        self.signatures: list[tuple | None] = [None, None]
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copied: list = [None, None]
        self.consumed: list = [None, None]

    @torch.no_grad()
    def set_first(self, first: int) -> None:
        """Stream blocks [first, n); blocks below `first` live on the device."""
        n = len(self.blocks)
        first = max(0, min(first, n))
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        for index, block in enumerate(self.blocks):
            if index < first:
                block.__dict__.pop("forward", None)
                block.to(self.device)
            else:
                block.forward = functools.partial(self._run, index)
                _to_host(block, self.pin)
        self.first = first
        self.buffers, self.signatures = [None, None], [None, None]
        self.copied, self.consumed = [None, None], [None, None]

    def _buffer_for(self, slot: int, block: nn.Module) -> nn.Module:
        signature = _signature(block)
        if self.signatures[slot] != signature:
            if self.copy_stream is not None:  # the old buffer may still be read by the compute stream
                torch.cuda.current_stream(self.device).synchronize()
            _to_host(block, self.pin)  # tensors a LoRA just replaced are not pinned yet
            forward = block.__dict__.pop("forward")  # a shell's forward points here: not to be copied
            try:
                self.buffers[slot] = copy.deepcopy(block).to(self.device)
            finally:
                block.forward = forward
            self.signatures[slot] = signature
        return self.buffers[slot]

    @torch.no_grad()
    def _run(self, index: int, *args, **kwargs):
        slot = index % 2
        block = self.blocks[index]
        buffer = self._buffer_for(slot, block)
        if self.copy_stream is None:
            _copy_block(block, buffer, non_blocking=False)
        else:
            # The buffer is free once the block that used it two blocks ago is done with it.
            stream = torch.cuda.current_stream(self.device)
            if self.consumed[slot] is not None:
                self.copy_stream.wait_event(self.consumed[slot])
            else:
                self.copy_stream.wait_stream(stream)
            with torch.cuda.stream(self.copy_stream):
                _copy_block(block, buffer, non_blocking=True)
                self.copied[slot] = torch.cuda.Event()
                self.copied[slot].record(self.copy_stream)
            stream.wait_event(self.copied[slot])
        out = buffer(*args, **kwargs)
        if self.copy_stream is not None:
            self.consumed[slot] = torch.cuda.Event()
            self.consumed[slot].record(torch.cuda.current_stream(self.device))
        return out


def _to_host(block: nn.Module, pin: bool) -> None:
    """Move a block's tensors to CPU memory, pinned if asked (and only then)."""
    for module in block.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None:
                    continue
                host = tensor.to("cpu")
                if pin and not host.is_pinned():
                    host = host.pin_memory()
                elif not pin and host.is_pinned():
                    host = host.clone()
                store[name] = nn.Parameter(host, requires_grad=False) if store is module._parameters else host


def _signature(block: nn.Module) -> tuple:
    """What a buffer block must share with the block it runs: tensor names, shapes, dtypes, hooks."""
    named = [*block.named_parameters(), *block.named_buffers()]
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in named)
    hooks = tuple((n, len(m._forward_hooks)) for n, m in block.named_modules() if m._forward_hooks)
    return tensors, hooks


def _copy_block(source: nn.Module, buffer: nn.Module, non_blocking: bool) -> None:
    for src, dst in zip(source.modules(), buffer.modules(), strict=True):
        for store in ("_parameters", "_buffers"):
            for name, tensor in getattr(src, store).items():
                if tensor is not None:
                    getattr(dst, store)[name].copy_(tensor, non_blocking=non_blocking)
        if hasattr(src, "wtscale"):  # fp4 layers: a per-layer Python float
            dst.wtscale = src.wtscale
