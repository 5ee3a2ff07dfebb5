"""What the CLI prints: human text, or NDJSON events and one final envelope line; errors and exit codes.

The `--json` contract follows comfy-cli's (Comfy-Org/comfy-cli docs/json-output.md): stdout carries only
NDJSON, one object per line, flushed as it happens; every line has `schema` ("event/1" on events,
"envelope/1" on the last line) and a `type`; the stream ends with exactly one
`{"type": "envelope", "ok": ..., "command": ..., "data": ..., "error": ...}` line. Human-readable text
and library logs go to stderr. Unlike comfy-cli (0 / 1 / 130), the exit code also says which kind of
failure it was, so shell scripts can branch without parsing JSON (see EXIT_CODES).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: the traceback is on stderr
EXIT_USAGE = 2  # bad flags, a bad parameter value, an unreadable input image or settings file
EXIT_MODEL = 3  # a model file (or the tokenizer) is missing, incomplete or not the expected kind
EXIT_RUNTIME = 4  # the machine can't run it: no/unsupported GPU, Nunchaku mismatch, out of memory, disk full,
# an output folder that takes no files
EXIT_NETWORK = 5  # the Hugging Face hub could not be reached, or a download failed its size check
EXIT_CANCELLED = 130  # Ctrl-C (128 + SIGINT, as shells and comfy-cli report it)

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug; traceback on stderr)",
    EXIT_USAGE: "usage or bad input: flags, parameter values, input images, settings or batch files",
    EXIT_MODEL: "model files missing, incomplete or of the wrong kind",
    EXIT_RUNTIME: "runtime or hardware: GPU, Nunchaku, out of memory, disk full, output folder not writable",
    EXIT_NETWORK: "network or hub error, or a download that failed verification",
    EXIT_CANCELLED: "cancelled (Ctrl-C)",
}


# Every `code` an error can have in `--json` (the README lists them; tests/test_cli.py checks both).
ERROR_CODES = (
    "usage", "bad_parameter", "bad_config", "config_not_found", "bad_model_name", "image_not_found",
    "bad_image", "bad_workflow", "model_not_found", "model_invalid", "unsupported_hardware",
    "missing_dependency", "out_of_memory", "runtime_error", "output_not_writable", "disk_full",
    "not_ready", "network_error", "offline", "hub_error", "hub_file_not_found", "hub_repo_not_found",
    "hub_unauthorized", "download_incomplete", "size_mismatch", "checksum_mismatch", "insufficient_disk",
    "cancelled", "internal_error",
)  # fmt: skip

# The library's error kinds (qwen_edit.errors.KINDS) -> (error code, exit code, fix). `cli_error` is
# the only place the CLI looks at what the library raised.
KIND_ERRORS = {
    "parameter": ("bad_parameter", EXIT_USAGE, None),
    "config": ("bad_config", EXIT_USAGE, None),
    "config_not_found": (
        "config_not_found",
        EXIT_USAGE,
        "check the --config path (the presets are in the repository's configs/)",
    ),
    "unsafe_name": ("bad_model_name", EXIT_USAGE, None),
    "model_not_found": ("model_not_found", EXIT_MODEL, "qwen-edit download; qwen-edit doctor"),
    "model_format": (
        "model_invalid",
        EXIT_MODEL,
        "download the file again (qwen-edit download) or check which file this is",
    ),
    "lora": ("model_invalid", EXIT_MODEL, "use a LoRA trained for Qwen-Image in a supported format"),
    "hardware": ("unsupported_hardware", EXIT_RUNTIME, "qwen-edit doctor"),
    "nunchaku_unavailable": ("missing_dependency", EXIT_RUNTIME, "qwen-edit doctor"),
    "dependency": ("missing_dependency", EXIT_RUNTIME, "qwen-edit doctor"),
    "out_of_memory": (
        "out_of_memory",
        EXIT_RUNTIME,
        "--offload enable --num-blocks-on-gpu N --pin-memory, or a smaller size/batch",
    ),
    "cuda_error": ("runtime_error", EXIT_RUNTIME, "qwen-edit doctor"),
    "runtime": ("runtime_error", EXIT_RUNTIME, "qwen-edit doctor"),
    "storage": ("runtime_error", EXIT_RUNTIME, None),  # the CLI uses no object storage
    "workflow": ("bad_workflow", EXIT_USAGE, "change the node the message names, or --set its input"),
    "cancelled": ("cancelled", EXIT_CANCELLED, None),
    "internal": ("internal_error", EXIT_INTERNAL, None),
}


class CliError(Exception):
    """A failure with a stable `code` (for `--json` consumers), an exit code, and how to fix it."""

    def __init__(
        self, code: str, message: str, exit_code: int, *, fix: str | None = None, details: dict | None = None
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = exit_code
        self.fix = fix
        self.details = details or {}

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"code": self.code, "message": self.message, "exit_code": self.exit_code}
        if self.fix:
            out["fix"] = self.fix
        if self.details:
            out["details"] = self.details
        return out


def cli_error(
    exc: BaseException, *, prefix: str = "", fix: str | None = None, details: dict | None = None
) -> CliError:
    """Any exception as a CliError: the CLI's own as they are, the library's by kind (KIND_ERRORS).

    `prefix` says where (a batch line: "jobs.txt:3: "), `fix` replaces the table's, `details` adds to
    what the error carries (the bad parameter's `field`, an out-of-memory `suggestion`).
    """
    if isinstance(exc, CliError):
        return exc
    from qwen_edit.errors import kind_of  # not at import: `qwen-edit --version` needs no library

    kind = kind_of(exc)
    code, exit_code, default_fix = KIND_ERRORS[kind]
    if kind == "parameter" and str(getattr(exc, "field", "")).startswith("images"):
        code = "bad_image"  # a picture the loader can't read: what the check before loading calls it
    message = f"{type(exc).__name__}: {exc}" if kind in ("cuda_error", "runtime", "internal") else str(exc)
    extra: dict = {}
    if getattr(exc, "field", None):  # the parameter, setting or model slot at fault
        extra["field"] = exc.field
    if getattr(exc, "suggestion", None) is not None:
        extra["suggestion"] = exc.suggestion
    return CliError(
        code,
        prefix + message,
        exit_code,
        fix=fix or default_fix,
        details={**extra, **(details or {})} or None,
    )


class Reporter:
    """Events and the final result of one command, as NDJSON (`json_mode`) or as text for people.

    In JSON mode `sys.stdout` is pointed at stderr for the duration of the command, so a stray `print`
    in a library can never corrupt the event stream; events go to the real stdout captured here.
    """

    def __init__(
        self, command: str, json_mode: bool, stdout: IO[str] | None = None, stderr: IO[str] | None = None
    ):
        from qwen_edit import __version__

        self.command = command
        self.json_mode = json_mode
        self.version = __version__
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.started = time.monotonic()
        self.finished = False

    # -- JSON events -----------------------------------------------------------------------------

    def event(self, type_: str, **fields) -> None:
        """An NDJSON event line (JSON mode only; humans get `say`/progress bars instead)."""
        if self.json_mode:
            self._write({"schema": "event/1", "type": type_, **fields})

    def _write(self, obj: dict) -> None:
        self.out.write(json.dumps(obj, ensure_ascii=False, default=_jsonable) + "\n")
        self.out.flush()

    # -- human text ------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """A result line for people (stdout); nothing in JSON mode."""
        if not self.json_mode:
            print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        """Side information for people (stderr); nothing in JSON mode."""
        if not self.json_mode:
            print(text, file=self.err, flush=True)

    # -- the end ---------------------------------------------------------------------------------

    def succeed(self, data: dict, exit_code: int = EXIT_OK) -> int:
        self._envelope(True, data, None)
        return exit_code

    def fail(self, error: CliError, data: dict | None = None) -> int:
        """Report `error` (the envelope in JSON mode, a message and the fix on stderr otherwise)."""
        if self.json_mode:
            self._envelope(False, data, error.to_dict())
        else:
            print(f"error: {error.message}", file=self.err)
            if error.fix:
                print(f"fix: {error.fix}", file=self.err)
            self.err.flush()
        return error.exit_code

    def _envelope(self, ok: bool, data: dict | None, error: dict | None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.json_mode:
            self._write(
                {
                    "schema": "envelope/1",
                    "type": "envelope",
                    "ok": ok,
                    "command": self.command,
                    "version": self.version,
                    "elapsed_seconds": round(time.monotonic() - self.started, 3),
                    "data": data,
                    "error": error,
                }
            )


def _jsonable(value):
    """json.dumps fallback: paths and other objects as strings, tuples handled by json already."""
    return str(value)


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
