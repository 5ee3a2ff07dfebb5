"""Which GPU is this, and what can it run?

Nunchaku ships 4-bit kernels for two families (nunchaku setup.py build targets):
- FP4 (NVFP4, e2m1 with fp8 micro-scales): Blackwell consumer/workstation chips, SM 120 and 121.
- INT4: Ampere and Ada, SM 80, 86 and 89. Turing (SM 75) is a build target too, but only for fp16:
  the bf16 kernels need SM 80 (`MIN_ARCH 800` in gemm_w4a4.cuh) and Qwen-Image runs in bf16.
Every other device (Hopper SM 90, Blackwell datacenter SM 100, CPU, ...) runs the portable backend,
which dequantizes the same files into bf16 or fp8 weights.

For testing only, QWEN_EDIT_FORCE_NUNCHAKU=int4 (or fp4) makes the current device count as a card with
Nunchaku kernels of that precision: the H200 runs Nunchaku's int4 kernels built from source (slowly),
and CI runs the Nunchaku backend on the CPU through a kernel emulator (tests/nunchaku_emulator.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import UnsupportedHardwareError

NUNCHAKU_FP4_SMS = {(12, 0), (12, 1)}
NUNCHAKU_INT4_SMS = {(8, 0), (8, 6), (8, 9)}
FORCE_NUNCHAKU_ENV = "QWEN_EDIT_FORCE_NUNCHAKU"


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    name: str
    capability: tuple[int, int] | None  # None for CPU and other non-CUDA devices
    total_memory: int | None  # bytes
    forced_nunchaku: str | None = None  # FORCE_NUNCHAKU_ENV, for testing only

    @property
    def sm(self) -> str:
        return "cpu" if self.capability is None else f"SM {self.capability[0]}{self.capability[1]}"

    @property
    def nunchaku_precision(self) -> str | None:
        """'fp4' or 'int4' where Nunchaku has kernels for this card, else None."""
        if self.forced_nunchaku is not None:
            return self.forced_nunchaku
        if self.capability in NUNCHAKU_FP4_SMS:
            return "fp4"
        if self.capability in NUNCHAKU_INT4_SMS:
            return "int4"
        return None

    @property
    def has_fp8_tensor_cores(self) -> bool:
        return self.capability is not None and self.capability >= (8, 9)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def describe_device(device: torch.device | str | None = None) -> DeviceInfo:
    info = _describe(torch.device(device) if device is not None else default_device())
    forced = os.environ.get(FORCE_NUNCHAKU_ENV)
    if not forced:
        return info
    if forced not in ("int4", "fp4"):
        raise ValueError(f"{FORCE_NUNCHAKU_ENV} must be 'int4' or 'fp4' (testing only), got {forced!r}")
    name = f"{info.name} [{FORCE_NUNCHAKU_ENV}={forced}]"
    return DeviceInfo(info.device, name, info.capability, info.total_memory, forced)


def _describe(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedHardwareError(
                "device='cuda' was requested but torch sees no CUDA GPU "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
                "Check `nvidia-smi`, install a CUDA build of torch, or pass device='cpu'."
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return DeviceInfo(
            torch.device("cuda", index), props.name, (props.major, props.minor), props.total_memory
        )
    return DeviceInfo(device, device.type, None, None)


def nunchaku_precision_error(info: DeviceInfo, file_precision: str) -> str | None:
    """Why Nunchaku's kernels can't run a `file_precision` ('int4'/'fp4') file here; None if they can."""
    native = info.nunchaku_precision
    if native == file_precision:
        return None
    if info.capability == (7, 5):
        return (
            f"{info.name} ({info.sm}) has Nunchaku kernels only for fp16 models; Qwen-Image runs in bf16, "
            "whose kernels need SM 80 or newer. This file runs here with backend='portable'."
        )
    if native is None:
        return (
            f"{info.name} ({info.sm}) has no Nunchaku 4-bit kernels: they exist for SM 120/121 (fp4 files) "
            f"and SM 75/80/86/89 (int4 files). This {file_precision} file runs here with "
            "backend='portable' (dequantized bf16/fp8 weights)."
        )
    return (
        f"{info.name} ({info.sm}) runs Nunchaku {native} files, but this file is {file_precision}. "
        f"Use the svdq-{native}_r128-... file of the same model (e.g. "
        f"'svdq-{native}_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors'), "
        "or load this one with backend='portable'."
    )
