"""Every error the library raises on purpose, under one base that says what kind of failure it is.

`QwenEditError.kind` is the failure's category, one of `KINDS`; `.field` names the setting, parameter or
model slot at fault when there is one; `.message` is the text without the field. Runners turn kinds into
their own codes with one table each (the CLI: exit codes, the worker: error codes), so they never
inspect class names or parse messages. `kind_of` gives the kind of any exception, including those the
library lets through from torch and the OS (CUDA out of memory, a fatal CUDA error, a vanished file).

Each class also subclasses the builtin it has always been (`ParameterError` is a `ValueError`,
`ModelNotFoundError` a `FileNotFoundError`, ...) and stays importable from the module that raises it
(`qwen_edit.params.ParameterError`, `qwen_edit.lora.LoraError`, ...), so existing `except` clauses keep
working.
"""

from __future__ import annotations

import sys
from pathlib import Path

# kind -> what it means. Runners map every kind; a new kind needs a row in each runner's table
# (tests/test_errors.py checks that).
KINDS = {
    "parameter": "a value (edit parameter, pipeline option, request field) is out of range or the wrong type",
    "config": "a settings file is invalid (unknown key, bad value, not YAML)",
    "config_not_found": "a settings file does not exist",
    "unsafe_name": "a model name would leave its folder (absolute, '..', a symlink leading out)",
    "model_not_found": "a model file (or the tokenizer) is not where it was looked for",
    "model_format": "a model file exists but is not what its slot needs (truncated, another model or format)",
    "lora": "a LoRA file cannot be read or applied",
    "hardware": "the requested backend or file cannot run on this device",
    "nunchaku_unavailable": "backend='nunchaku' was asked for, but Nunchaku is missing, broken or too old",
    "out_of_memory": "the GPU ran out of memory",
    "cuda_error": "a fatal CUDA error: this process's CUDA context is unusable",
    "cancelled": "the caller's cancel() stopped the edit between steps",
    "storage": "object storage settings are invalid or a transfer failed",
    "workflow": "a ComfyUI workflow the pipeline can't run as ComfyUI would (WorkflowError.rule says why)",
    "dependency": "a package the library needs is missing or too old",
    "runtime": "another runtime failure (torch, the OS)",
    "internal": "anything else: a bug",
}

# Messages of CUDA errors after which the context is unusable (the process must go). torch raises
# these as plain RuntimeErrors (or AcceleratorError since 2.8), so the text is all there is to go by.
CUDA_FATAL = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert",
              "illegal memory access", "unspecified launch failure", "CUDA driver",
              "illegal instruction")  # fmt: skip


class QwenEditError(Exception):
    """Base of the library's errors: `kind` (one of KINDS), `field` (what is at fault, or None), `message`."""

    kind = "internal"
    field_in_message = False  # True: str(error) is "field: message", as ParameterError has always read

    def __init__(self, message: str, *, field: str | None = None):
        self.message = message
        self.field = field
        super().__init__(f"{field}: {message}" if self.field_in_message and field else message)


class ParameterError(QwenEditError, ValueError):
    """A bad parameter: `.field` names it, the message says what is allowed."""

    kind = "parameter"
    field_in_message = True

    def __init__(self, field: str, message: str):
        super().__init__(message, field=field)


class SettingsError(ParameterError):
    """A settings file (or dict) that can't be used: `.field` names the key, e.g. `models.vae`."""

    kind = "config"


class SettingsNotFoundError(QwenEditError, FileNotFoundError):
    """A settings file that does not exist."""

    kind = "config_not_found"


class UnsafeModelNameError(QwenEditError, ValueError):
    """A model name that would leave the configured folders (absolute, `..`, or a symlink escape)."""

    kind = "unsafe_name"
    field_in_message = True


class ModelNotFoundError(QwenEditError, FileNotFoundError):
    """A model name that resolves to no file; the message lists where it looked and what is there.
    `name` is the name as the caller gave it (runners that must not show folders say only that)."""

    kind = "model_not_found"

    def __init__(self, message: str, *, field: str | None = None, name: str | None = None):
        super().__init__(message, field=field)
        self.name = name


class HeaderError(QwenEditError, ValueError):
    """The file is not a readable safetensors file (not one at all, or its header is damaged)."""

    kind = "model_format"

    def __init__(self, path: Path, cause: Exception):
        super().__init__(f"{path} is not a readable .safetensors file ({cause})")
        self.path = path
        self.cause = cause


class CheckpointError(QwenEditError, ValueError):
    """The file is not a (complete) SVDQ Qwen-Image transformer; the message says what is wrong."""

    kind = "model_format"


class TextEncoderFileError(QwenEditError, ValueError):
    """The file is not a (complete) Qwen2.5-VL-7B text encoder; the message says what is wrong."""

    kind = "model_format"


class VAEFormatError(QwenEditError, ValueError):
    """The weights are not (exactly) a Qwen-Image VAE."""

    kind = "model_format"


class ModelFileError(QwenEditError, ValueError):
    """A model file its loader could not use, for a reason no format check above caught (`field`: the
    slot). The cause is chained."""

    kind = "model_format"


class LoraError(QwenEditError, ValueError):
    """A LoRA file can't be read or applied; the message names the file and the problem."""

    kind = "lora"


class UnsupportedHardwareError(QwenEditError, RuntimeError):
    """The requested backend/precision cannot run on this device; the message says what can."""

    kind = "hardware"


class NunchakuUnavailableError(QwenEditError, ImportError):
    """backend='nunchaku' was asked for, but Nunchaku is missing, broken or too old; says what to do."""

    kind = "nunchaku_unavailable"


class GPUOutOfMemoryError(QwenEditError, RuntimeError):
    """CUDA ran out of memory in an edit; `.suggestion` holds offload settings that should fit."""

    kind = "out_of_memory"

    def __init__(self, message: str, suggestion: dict):
        super().__init__(message)
        self.suggestion = suggestion


class EditCancelled(QwenEditError):
    """The caller's ``cancel()`` returned True at a check of an edit: before each stage (text encoding,
    VAE encoding, sampling, decoding), between the pieces of one (the two prompts, the reference images,
    the text encoder's layers) and between sampling steps. `stage` names the stage; `step` and `total`
    are the sampling steps done and planned."""

    kind = "cancelled"

    def __init__(self, stage: str, step: int, total: int, message: str | None = None) -> None:
        super().__init__(message or f"edit cancelled during {stage} (after {step} of {total} sampling steps)")
        self.stage = stage
        self.step = step
        self.total = total


class SamplingCancelled(EditCancelled):
    """Raised between sampler steps when the caller's ``cancel()`` check returns True."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__("sampling", step, total, f"sampling cancelled before step {step} of {total}")


def kind_of(exc: BaseException) -> str:
    """The KINDS entry of any exception: the library's own, and torch's and the OS's that it lets through."""
    if isinstance(exc, QwenEditError):
        return exc.kind
    # No torch import here: a runner classifying a usage error must not pay for it, and an exception
    # can only be one of torch's if torch is already loaded.
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return "out_of_memory"
        accelerator_error = getattr(torch, "AcceleratorError", None)
        if accelerator_error is not None and isinstance(exc, accelerator_error):
            return "cuda_error"
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in CUDA_FATAL):
        return "cuda_error"
    if isinstance(exc, FileNotFoundError):  # a model file that vanished, a tokenizer file missing
        return "model_not_found"
    if isinstance(exc, ImportError):
        return "dependency"
    if isinstance(exc, (RuntimeError, OSError)):  # OSError: a file not readable, a disk full
        return "runtime"
    return "internal"
