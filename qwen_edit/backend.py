"""Which backend runs a transformer file on this device, and in which compute mode.

Decided before anything loads (the offload plan needs the backend's memory per block) and again when
loading; both ask here. The backends themselves: nunchaku_backend.py (Nunchaku's kernels) and
svdq/layers.py (portable, dequantized weights).
"""

from __future__ import annotations

import logging

from .errors import NunchakuUnavailableError
from .hardware import DeviceInfo, UnsupportedHardwareError, nunchaku_precision_error
from .nunchaku_backend import NunchakuStatus, version_problem

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nunchaku", "portable")
COMPUTES = ("auto", "bf16", "fp8")
# The text encoder's (text_encoder.py): "upcast" first, the default, ComfyUI's numbers (fp8 weights, bf16
# activations); "fp8" rounds the activations too (opt-in). No "auto": an fp8 card doesn't make ComfyUI's
# numbers optional.
TEXT_ENCODER_COMPUTES = ("upcast", "fp8")


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
    """The portable backend's compute mode: "auto" is fp8 where the card has fp8 tensor cores."""
    if compute not in COMPUTES:
        raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
    if compute == "auto":
        return "fp8" if info.has_fp8_tensor_cores else "bf16"
    return compute
