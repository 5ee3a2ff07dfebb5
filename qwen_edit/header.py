"""Safetensors headers: each tensor's name, dtype and shape, and the file's metadata, without tensor data.

The three loaders (the SVDQ transformer checkpoint, the text encoder, the VAE) describe their files from
the header before anything is loaded: to check the file against the model, to plan memory, and to say
what a wrong file is. They all read it here, each turning `HeaderError` into its own error type.
`few` is how their messages list names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

# safetensors' dtype names -> torch dtypes, for the dtypes model files hold.
DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorHeader:
    dtype: str  # safetensors' name ("BF16", "F8_E4M3", "I32", ...); DTYPES maps the usual ones to torch
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorHeader]  # in the file's order
    metadata: dict[str, str]


class HeaderError(ValueError):
    """The file is not a readable safetensors file (not one at all, or its header is damaged)."""

    def __init__(self, path: Path, cause: Exception):
        super().__init__(f"{path} is not a readable .safetensors file ({cause})")
        self.path = path
        self.cause = cause


def read_header(path: str | Path) -> Header:
    """The header of one safetensors file. safetensors itself parses it, so a file cut short (a partial
    download) is refused here as it would be at load time."""
    path = Path(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for other formats
        raise HeaderError(path, exc) from exc
    with handle as f:
        metadata = f.metadata() or {}
        tensors = {}
        for key in f.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
            piece = f.get_slice(key)
            tensors[key] = TensorHeader(piece.get_dtype(), tuple(piece.get_shape()))
    return Header(path, tensors, metadata)


def few(names: Iterable[str], n: int = 5) -> str:
    """The first `n` names and how many more: lists of tensor keys in error messages stay readable."""
    names = list(names)
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n} more)" if len(names) > n else "")
