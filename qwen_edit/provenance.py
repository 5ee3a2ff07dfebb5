"""What a picture needs to be made again, beside its parameters: the model files, how they ran, the inputs.

`pipeline_provenance(pipe)` describes a loaded pipeline: each model file by name and short content hash
(never by its path, which says nothing on another machine and may say too much), the LoRAs as results
name them, the backend, compute, precision and device type, whether it is the demo model, and the
package version. `picture_entry` describes an input picture the same way. Runners embed both beside
`EditResult.parameters` (`EditResult.encode(..., extra=...)`), and `read_metadata` gives them back.

Hashes are sha256 of the whole file (the first DIGEST_CHARS hex digits, enough to tell files apart).
Hashing a 12 GB transformer takes a while, so each result is kept in a small JSON file in the cache
folder, keyed by the file's path, size and modification time: a file is hashed once, not per run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

DIGEST_CHARS = 12
_CHUNK = 8 << 20


def cache_file() -> Path:
    """$QWEN_EDIT_CACHE/qwen-edit/digests.json, else the user cache (as the demo model's files)."""
    root = os.environ.get("QWEN_EDIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "qwen-edit" / "digests.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """The first DIGEST_CHARS hex digits of the file's sha256, from the cache when the file is unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    store = cache_file()
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key][:DIGEST_CHARS]
    full = _sha256(path)
    # Entries of files that are gone are dropped, so the cache doesn't grow forever.
    known = known if isinstance(known, dict) else {}
    known = {k: v for k, v in known.items() if Path(k.split("|")[0]).exists()}
    known[key] = full
    try:  # a cache that can't be written only costs a hash next time
        store.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=store.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(known, tmp)
        os.replace(tmp.name, store)
    except OSError:
        pass
    return full[:DIGEST_CHARS]


def model_entry(path: str | Path | None) -> dict | None:
    """{"file": name, "sha256": short hash} of a model file; a folder (a tokenizer) by name only."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        return {"file": path.name}
    return {"file": path.name, "sha256": file_digest(path)}


def picture_entry(source: Any) -> dict:
    """An input picture: {"file": the path as given, "sha256": of its bytes}; bytes or a PIL image get
    only the hash (of the bytes, or of the decoded pixels)."""
    if isinstance(source, (str, Path)):
        return {"file": str(source), "sha256": _sha256(Path(source))[:DIGEST_CHARS]}
    if isinstance(source, bytes):
        return {"sha256": hashlib.sha256(source).hexdigest()[:DIGEST_CHARS]}
    pixels = hashlib.sha256(f"{source.mode}{source.size}".encode() + source.tobytes())
    return {"sha256": pixels.hexdigest()[:DIGEST_CHARS]}


def pipeline_provenance(pipe) -> dict:
    """The loaded pipeline as a picture's metadata records it (see the module docstring)."""
    from . import __version__

    info = pipe.info()
    files = info.get("files") or {}
    models = {slot: model_entry(files.get(slot)) for slot in ("transformer", "text_encoder", "vae")}
    models["loras"] = [
        {"name": spec.name, "strength": spec.strength, "sha256": file_digest(spec.path)}
        for spec in pipe.lora_specs
    ]
    spec = getattr(pipe, "spec", None)
    return {
        "models": models,
        "backend": info.get("backend"),
        "compute": info.get("compute"),
        "text_encoder_compute": info.get("text_encoder_compute"),
        "precision": info.get("precision"),
        "device": pipe.device.type,
        "demo": bool(spec is not None and spec.demo),
        "generator": f"qwen-edit {__version__}",
    }


def read_metadata(data: bytes) -> dict:
    """What a PNG written by qwen-edit embeds (text chunk `parameters`, JSON), or {} if nothing."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        text = getattr(image, "text", {}).get("parameters") if image.format == "PNG" else None
    if not text:
        return {}
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
