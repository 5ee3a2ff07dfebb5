"""Reading model files into the page cache in the background, so disk time overlaps other start-up work.

A cold `from_files` spends ~11 s importing transformers and diffusers before it reads the first byte of
the models (H100 machine, benchmarks/RESULTS.md), and the loaders then wait on the disk. A thread that
reads the files in the order they will be loaded lets the imports and the disk run at once; the loaders
then find most pages cached. It only runs when the files fit comfortably in free host memory: otherwise
pages read early would be evicted before use and read twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 64 << 20
HEADROOM = 1.5  # free host memory needed, as a multiple of the bytes to read


def model_files(paths: Iterable[str | Path | None]) -> list[Path]:
    """The files behind `paths` (a file, or the .safetensors files of a folder), in the given order."""
    files = []
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.rglob("*.safetensors")))
    return files


def start_prefetch(paths: Iterable[str | Path | None], available: int | None) -> threading.Thread | None:
    """Start a daemon thread reading `paths` front to back; None (nothing started) when their bytes
    exceed free host memory / HEADROOM or `available` is unknown."""
    files = model_files(paths)
    total = sum(f.stat().st_size for f in files)
    if not files or available is None or total * HEADROOM > available:
        log.info("prefetch: skipped (%.1f GB of files, %s bytes of RAM free)", total / 1e9, available)
        return None
    thread = threading.Thread(target=_read_all, args=(files,), name="qwen-edit-prefetch", daemon=True)
    thread.start()
    return thread


def _read_all(files: list[Path]) -> None:
    buffer = bytearray(CHUNK)
    for file in files:
        try:
            with open(file, "rb", buffering=0) as f:
                while f.readinto(buffer):  # releases the GIL while the disk works
                    pass
        except OSError as exc:  # the loader will report a real problem with the file itself
            log.info("prefetch: stopped at %s: %s", file, exc)
            return
