"""Safetensors headers: each tensor's name, dtype and shape, and the file's metadata, without tensor data.

The three loaders (the SVDQ transformer checkpoint, the text encoder, the VAE) describe their files from
the header before anything is loaded: to check the file against the model, to plan memory, and to say
what a wrong file is. They all read it here, each turning `HeaderError` into its own error type.
`few` is how their messages list names. `safetensors_complete` tells a cut-off download (doctor).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import HeaderError

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


def safetensors_complete(path: str | Path) -> tuple[bool, str]:
    """Whether a .safetensors file holds every byte its header promises (a cut-off download doesn't),
    and if not, why. Reads the header itself rather than through safetensors, which refuses a short
    file without saying how much of it is there. Other files count as complete."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".sft"):
        return True, ""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > min(size, 100 << 20):
                return False, f"not a safetensors file (header length {header_len})"
            header = json.loads(fh.read(header_len))
    except (OSError, struct.error, ValueError) as exc:
        return False, f"unreadable header ({exc})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_len + end
    if size < expected:
        return False, f"truncated: {size} of {expected} bytes (an interrupted download?)"
    return True, ""
