"""Where `qwen-edit edit` writes its pictures, in which format, and never over a file silently.

`-o/--out` is a file name template ({seed}, {job}, {index}) or a folder (one that exists, or a name
ending in '/'), which takes the default name pattern inside it. The suffix picks the format: .png (the
default, with the parameters and provenance embedded), .jpg/.jpeg or .webp (no metadata). A name
that is taken, on disk or by an earlier picture of the same run, gets `_1`, `_2`, ... before the suffix
(as mflux does); `--overwrite` replaces files that were there before the run, never one the run wrote.
"""

from __future__ import annotations

import errno
import os
import string
from pathlib import Path

from .output import EXIT_RUNTIME, EXIT_USAGE, CliError

DEFAULT_NAME = "qwen-edit_{seed}.png"
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # = conditioning.IMAGE_FORMATS


def is_folder(template: str) -> bool:
    """`-o` names a folder: it ends with a separator, or it is an existing folder (and no template)."""
    if template.endswith(("/", os.sep)):
        return True
    return not _fields(template) and Path(template).expanduser().is_dir()


def fill(template: str, seed: int, job: int, index: int) -> Path:
    """The template filled in; a folder gets the default name inside it, a name without suffix `.png`."""
    if is_folder(template):
        return Path(template).expanduser() / DEFAULT_NAME.format(seed=seed)
    path = Path(template.format(seed=seed, job=job, index=index)).expanduser()
    return path if path.suffix else path.with_name(path.name + ".png")


def check_template(template: str, where: str) -> Path:
    """A usable -o before anything loads: fields that exist, a known suffix, a folder that can be
    written (or created). Returns the folder the pictures go to."""
    try:
        path = fill(template, seed=0, job=0, index=0)
    except (KeyError, IndexError, ValueError) as exc:
        raise _usage(
            f"{where}: --out {template!r}: only {{seed}}, {{job}} and {{index}} can be filled in ({exc})"
        ) from exc
    if path.suffix.lower() not in FORMATS:
        raise _usage(
            f"{where}: --out {template!r}: unknown picture format {path.suffix!r}; "
            "use .png (with the parameters embedded), .jpg or .webp"
        )
    check_writable(path.parent, where)
    return path.parent


def check_writable(folder: Path, where: str) -> None:
    """The folder exists and takes new files, or could be created where its nearest existing parent is."""
    existing = folder if folder != Path("") else Path(".")
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise output_error(where, folder, NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing)))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise output_error(where, folder, PermissionError(errno.EACCES, "not writable", str(existing)))


def output_error(where: str, path: Path, exc: OSError) -> CliError:
    """A picture that can't be written: a full disk, or a folder that does not take files (exit 4)."""
    full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    return CliError(
        "disk_full" if full else "output_not_writable",
        f"{where}: cannot write {path}: {exc.strerror or exc}",
        EXIT_RUNTIME,
        fix="free some disk space, or write elsewhere with -o"
        if full
        else "choose a writable folder with -o",
        details={"field": "out", "path": str(path)},
    )


def output_paths(
    template: str, seed: int, job: int, count: int, taken: set[str], overwrite: bool = False
) -> list[Path]:
    """The paths of one job's `count` pictures: `_<index>` for several (unless the template has
    {index}), then `_1`, `_2`, ... past any name taken on disk (unless `overwrite`) or in `taken` (the
    run's own, which this adds to)."""
    paths = []
    for i in range(count):
        path = fill(template, seed, job, i)
        if count > 1 and "index" not in _fields(template):
            path = path.with_name(f"{path.stem}_{i}{path.suffix}")
        candidate, n = path, 0
        while str(candidate) in taken or (not overwrite and candidate.exists()):
            n += 1
            candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        taken.add(str(candidate))
        paths.append(candidate)
    return paths


def write_picture(path: Path, data: bytes, overwrite: bool) -> None:
    """Write `data` to `path`; without `overwrite`, only as a new file (a file that appeared since the
    name was chosen is not replaced: the error says so)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb" if overwrite else "xb") as fh:
        fh.write(data)


def format_of(path: Path) -> str:
    return FORMATS[path.suffix.lower()]


def _fields(template: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError:
        return set()


def _usage(message: str) -> CliError:
    return CliError("bad_parameter", message, EXIT_USAGE, details={"field": "out"})
