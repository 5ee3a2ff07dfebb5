"""What a response may show: bounded text, and no paths of the server's own.

Errors echo what the client sent (`got '...'`) and the library's messages name files by their paths,
which is right for a CLI and wrong for a service: RunPod caps a job's result at 20 MB, and the worker's
folders are nobody's business. Everything an error carries passes through here on its way out.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Iterable, Mapping
from pathlib import Path

MAX_MESSAGE = 2000  # characters of one message or fix
MAX_FIELD = 200  # characters of a field's name (a path into the input: "images[2].image_url")
MAX_VALUE = 80  # characters of a value echoed inside a message
MAX_ERRORS = 20  # per-field errors listed in details.errors; the rest are counted
MAX_DETAIL = 2000  # characters of any other string in details

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = MAX_VALUE
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 5
_REPR.maxlevel = 2

# An absolute POSIX path: a '/' that does not continue a word, a URL (`http://h/p`) or a relative name
# (`sub/x.png`), then segments up to whitespace, quotes or brackets.
_SEGMENT = r"[^\s'\"`,;()\[\]{}<>/]"
ABSOLUTE_PATH = re.compile(rf"(?<![\w.:/~-])/(?:{_SEGMENT}+/)*({_SEGMENT}+)")


def shown(value) -> str:
    """A value as a message may echo it: its repr, cut to MAX_VALUE characters and two levels deep."""
    try:
        return _REPR.repr(value)
    except Exception:  # an int past Python's 4300-digit repr limit, an object whose repr raises
        return f"<{type(value).__name__}>"


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    keep = limit - len(f"... ({len(text):,} more characters)")  # the count is never longer than that
    return text[: max(keep, 0)] + f"... ({len(text) - max(keep, 0):,} more characters)"


def without_paths(text: str, folders: Mapping[str, Iterable[Path]] | None = None) -> str:
    """`text` with the server's paths taken out: each folder of `folders` ({label: folders}) becomes
    `<label>` (a file in it: its name there), and any other absolute path its last segment."""
    known = sorted(
        (
            (str(p), label)
            for label, paths in (folders or {}).items()
            for folder in paths
            for p in _spellings(folder)
        ),
        key=lambda item: -len(item[0]),
    )
    for path, label in known:  # a file in the folder by its name there, the folder by its label
        text = text.replace(path + "/", "").replace(path, f"<{label}>")
    return ABSOLUTE_PATH.sub(lambda m: m.group(1), text)


def _spellings(folder: Path) -> list[Path]:
    """A folder as given and resolved (messages use either)."""
    try:
        return [folder, folder.resolve()]
    except OSError:
        return [folder]


def bounded(details: Mapping) -> dict:
    """An error's details with every string clipped and the per-field error list capped."""
    out = {}
    for key, value in details.items():
        if key == "errors" and isinstance(value, list):
            items = [_bounded_problem(item) for item in value[:MAX_ERRORS]]
            out[key] = items
            if len(value) > MAX_ERRORS:
                out["errors_not_listed"] = len(value) - MAX_ERRORS
        elif isinstance(value, str):
            out[key] = clip(value, MAX_DETAIL)
        elif isinstance(value, Mapping):
            out[key] = {clip(str(k), MAX_FIELD): _small(v) for k, v in list(value.items())[:MAX_ERRORS]}
        else:
            out[key] = _small(value)
    return out


def _bounded_problem(item) -> dict:
    if not isinstance(item, Mapping):
        return {"message": clip(str(item))}
    return {k: clip(str(v), MAX_FIELD if k == "field" else MAX_MESSAGE) for k, v in item.items()}


def _small(value):
    """Numbers, booleans and None as they are; anything else as bounded text."""
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int) and value.bit_length() <= 64:
        return value
    if isinstance(value, str):
        return clip(value, MAX_DETAIL)
    if isinstance(value, (list, tuple)) and len(value) <= MAX_ERRORS:
        return [_small(v) for v in value]
    return shown(value)
