"""One error layer: every library error has a kind and stays the builtin (and the import) it always was."""

from __future__ import annotations

import pytest
import torch

from qwen_edit import errors
from qwen_edit.errors import KINDS, QwenEditError, kind_of

# (where it has always been imported from, its name, the builtin it subclasses, its kind)
LIBRARY_ERRORS = [
    ("qwen_edit.params", "ParameterError", ValueError, "parameter"),
    ("qwen_edit.paths", "ModelNotFoundError", FileNotFoundError, "model_not_found"),
    ("qwen_edit.paths", "UnsafeModelNameError", ValueError, "unsafe_name"),
    ("qwen_edit.svdq.checkpoint", "CheckpointError", ValueError, "model_format"),
    ("qwen_edit.text_encoder", "TextEncoderFileError", ValueError, "model_format"),
    ("qwen_edit.vae", "VAEFormatError", ValueError, "model_format"),
    ("qwen_edit.lora", "LoraError", ValueError, "lora"),
    ("qwen_edit.hardware", "UnsupportedHardwareError", RuntimeError, "hardware"),
    ("qwen_edit.transformer", "NunchakuUnavailableError", ImportError, "nunchaku_unavailable"),
    ("qwen_edit.pipeline", "GPUOutOfMemoryError", RuntimeError, "out_of_memory"),
    ("qwen_edit.sampling", "SamplingCancelled", Exception, "cancelled"),
    ("qwen_edit.header", "HeaderError", ValueError, "model_format"),
    ("qwen_edit.settings", "SettingsError", ValueError, "config"),
    ("qwen_edit.backend", "NunchakuUnavailableError", ImportError, "nunchaku_unavailable"),
]


@pytest.mark.parametrize("module, name, builtin, kind", LIBRARY_ERRORS, ids=[e[1] for e in LIBRARY_ERRORS])
def test_each_library_error_keeps_its_home_and_builtin_and_has_a_kind(module, name, builtin, kind):
    import importlib

    cls = getattr(importlib.import_module(module), name)
    assert cls is getattr(errors, name)  # one class, importable from both places
    assert issubclass(cls, QwenEditError) and issubclass(cls, builtin)
    assert cls.kind == kind and kind in KINDS


def test_field_and_message():
    error = errors.ParameterError("steps", "must be in [1, 200], got 0")
    assert str(error) == "steps: must be in [1, 200], got 0"  # as it has always read
    assert (error.field, error.message, error.kind) == ("steps", "must be in [1, 200], got 0", "parameter")
    with pytest.raises(ValueError):
        raise error
    unsafe = errors.UnsafeModelNameError("'../x' may not contain '..'", field="lora_name")
    assert str(unsafe) == "lora_name: '../x' may not contain '..'" and unsafe.message.startswith("'../x'")
    missing = errors.ModelNotFoundError("vae model 'x' not found", field="vae")
    assert str(missing) == "vae model 'x' not found" and missing.field == "vae"
    assert isinstance(missing, OSError) and missing.errno is None
    nunchaku = errors.NunchakuUnavailableError("nunchaku is not installed")
    assert str(nunchaku) == "nunchaku is not installed" and nunchaku.field is None
    oom = errors.GPUOutOfMemoryError("out of memory", {"cpu_offload": "enable"})
    assert oom.suggestion == {"cpu_offload": "enable"} and oom.kind == "out_of_memory"
    cancelled = errors.SamplingCancelled(2, 4)
    assert (cancelled.step, cancelled.total) == (2, 4) and "before step 2 of 4" in str(cancelled)


def test_kind_of_foreign_exceptions():
    assert kind_of(errors.LoraError("x")) == "lora"
    assert kind_of(torch.cuda.OutOfMemoryError("CUDA out of memory")) == "out_of_memory"
    assert kind_of(RuntimeError("CUDA error: an illegal memory access was encountered")) == "cuda_error"
    assert kind_of(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx")) == "cuda_error"
    if hasattr(torch, "AcceleratorError"):
        accelerator_error = torch.AcceleratorError.__new__(torch.AcceleratorError)
        assert kind_of(accelerator_error) == "cuda_error"
    assert kind_of(RuntimeError("shape mismatch")) == "runtime"
    assert kind_of(FileNotFoundError("no vocab.json")) == "model_not_found"
    assert kind_of(ImportError("transformers too old")) == "dependency"
    assert kind_of(PermissionError(13, "Permission denied", "model.safetensors")) == "runtime"
    assert kind_of(OSError(28, "No space left on device")) == "runtime"
    assert kind_of(KeyError("surprise")) == "internal"
    assert kind_of(MemoryError()) == "internal"  # host RAM: the worker decides what it means for itself


def test_each_runner_maps_every_kind():
    """The CLI's and the worker's only view of library errors: a row per kind, nothing else."""
    from runners.cli.output import KIND_ERRORS as CLI
    from runners.worker.handler import KIND_ERRORS as WORKER
    from runners.worker.schema import ERROR_CODES

    assert set(CLI) == set(KINDS) == set(WORKER)
    assert {code for code, _, _ in WORKER.values()} <= set(ERROR_CODES)
    assert CLI["model_not_found"][1] == 3 and CLI["parameter"][1] == 2 and CLI["out_of_memory"][1] == 4


def test_the_cli_names_library_errors_by_kind():
    from runners.cli.output import cli_error

    error = cli_error(errors.ParameterError("steps", "must be in [1, 200], got 0"), prefix="jobs.txt:2: ")
    assert (error.code, error.exit_code, error.message) == (
        "bad_parameter",
        2,
        "jobs.txt:2: steps: must be in [1, 200], got 0",
    )
    assert error.details == {"field": "steps"}
    oom = cli_error(errors.GPUOutOfMemoryError("out of memory", {"cpu_offload": "enable"}))
    assert (oom.code, oom.exit_code, oom.details["suggestion"]) == (
        "out_of_memory",
        4,
        {"cpu_offload": "enable"},
    )
    lora = cli_error(errors.LoraError("style.safetensors holds no LoRA weights"))
    assert (lora.code, lora.exit_code) == ("model_invalid", 3)  # was an internal error (exit 1)
    fatal = cli_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert (fatal.code, fatal.exit_code) == ("runtime_error", 4) and fatal.message.startswith(
        "RuntimeError: "
    )
    assert cli_error(KeyError("x")).exit_code == 1
    # A picture the loader can't read is what the check before loading calls it (bad_image, exit 2).
    late = cli_error(errors.ParameterError("images[0]", "cannot be read as an image (truncated)"))
    assert (late.code, late.exit_code, late.details["field"]) == ("bad_image", 2, "images[0]")
    full = cli_error(OSError(28, "No space left on device"))
    assert (full.code, full.exit_code) == ("runtime_error", 4)  # no longer "a bug"
    assert cli_error(errors.ModelNotFoundError("no vae", field="vae")).details == {"field": "vae"}
