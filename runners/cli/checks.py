"""What `qwen-edit edit` checks before loading anything (and all that `--dry-run` does), so a mistake
costs seconds, not minutes of loading, and ends with the same error as if it had been found later.

- input pictures: the file exists and decodes completely (a truncated JPEG passes PIL's `verify()`,
  which reads no JPEG data; a picture too large to decode is refused as PIL refuses it);
- model files: each is a complete safetensors file (header readable, every byte it promises there)
  of the kind its slot needs (an SVDQ transformer, a Qwen2.5-VL text encoder, a Qwen-Image VAE), read
  from the headers only; LoRAs are readable safetensors files; --num-blocks-on-gpu is at most the
  transformer's number of blocks;
- the device exists on this machine (`--device cuda` without a GPU).
Parameter values, the batch file, the output template and folder are checked where they are read
(edit.build_jobs, saving.check_template). Every failure is the library's error or a CliError, so it
gets the exit code and `--json` code the same problem gets when the loader finds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .output import EXIT_USAGE, CliError, cli_error

if TYPE_CHECKING:
    from qwen_edit.settings import PipelineSpec


def check_image(path: str, where: str) -> None:
    """The input exists and decodes as an image, every pixel of it."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise CliError(
            "image_not_found", f"{where}: no such file: {path}", EXIT_USAGE, details={"field": "images"}
        )
    try:
        with Image.open(p) as image:
            image.load()  # the whole decode: verify() checks PNG chunks but reads no JPEG data
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise bad_image(f"{where}: {path} is not a readable image ({exc})") from exc


def bad_image(message: str) -> CliError:
    return CliError("bad_image", message, EXIT_USAGE, details={"field": "images"})


def check_model_files(spec: PipelineSpec) -> None:
    """Each model file's header: a complete safetensors file of the kind its slot takes."""
    from qwen_edit.errors import ParameterError, QwenEditError

    checks = (
        ("transformer", spec.files.transformer, _transformer),
        ("text_encoder", spec.files.text_encoder, _text_encoder),
        ("vae", spec.files.vae, _vae),
    )
    for slot, path, check in checks:
        if path is None or Path(path).is_dir():  # a diffusers folder: its loader reads its index
            continue
        try:
            found = check(Path(path))
        except QwenEditError as exc:
            raise cli_error(exc, details={"field": slot}) from exc
        if slot == "transformer" and spec.num_blocks_on_gpu > found.num_layers:
            error = ParameterError(
                "num_blocks_on_gpu", f"must be in [0, {found.num_layers}] for this transformer, got "
                f"{spec.num_blocks_on_gpu}",
            )  # fmt: skip
            raise cli_error(error)
    for i, lora in enumerate(spec.loras):
        try:
            _lora(lora.path)
        except QwenEditError as exc:
            raise cli_error(exc, details={"field": f"loras[{i}]"}) from exc


def check_device(spec: PipelineSpec) -> None:
    """`cuda` names a GPU torch can see (the library's UnsupportedHardwareError otherwise: exit 4)."""
    from qwen_edit.errors import QwenEditError
    from qwen_edit.hardware import describe_device

    try:
        describe_device(spec.device)
    except QwenEditError as exc:
        raise cli_error(exc, details={"field": "device"}) from exc


def _header(path: Path):
    """The header of a complete safetensors file (HeaderError, kind model_format, otherwise)."""
    from qwen_edit.errors import HeaderError
    from qwen_edit.header import read_header, safetensors_complete

    complete, why = safetensors_complete(path)
    if not complete:
        raise HeaderError(path, ValueError(why))
    return read_header(path)


def _transformer(path: Path):
    from qwen_edit.svdq.checkpoint import read_checkpoint

    _header(path)
    return read_checkpoint(path)  # CheckpointError: not an SVDQ transformer, and what it looks like


def _text_encoder(path: Path) -> None:
    from qwen_edit.errors import TextEncoderFileError

    tensors = _header(path).tensors
    if any(".self_attn.q_proj." in k for k in tensors) and any("visual." in k for k in tensors):
        return
    from qwen_edit.text_encoder import guess_file_kind

    specs = {k: (t.dtype, t.shape) for k, t in tensors.items()}
    raise TextEncoderFileError(
        f"{path} is not a Qwen2.5-VL text encoder; it looks like {guess_file_kind(specs)}"
    )


def _vae(path: Path) -> None:
    from qwen_edit.vae import detect_layout

    detect_layout(_header(path).tensors, str(path))  # VAEFormatError, with what the file looks like


def _lora(path: Path) -> None:
    from qwen_edit.errors import HeaderError, LoraError

    try:
        _header(path)
    except HeaderError as exc:
        raise LoraError(f"{path} is not a readable .safetensors LoRA ({exc.cause})") from exc
