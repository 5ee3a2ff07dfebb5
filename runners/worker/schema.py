"""The worker's request schema and error contract.

Requests carry the seed (ComfyUI-based) worker's fields. Validation is our own, not runpod's
`rp_validator`, which skips the bounds of optional fields that have defaults (runpod/runpod-python@07fc6e2,
v1.12.0: runpod/serverless/utils/rp_validator.py:71-73). Every bad field gets its own error
(`details.errors`), each with a stable code, the field and a fix; the generation fields are checked by
building `qwen_edit.params.EditParams`, so the bounds live in one place.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from qwen_edit.offload import CPU_OFFLOAD_MODES
from qwen_edit.params import MAX_IMAGES, EditParams, ParameterError
from qwen_edit.paths import UnsafeModelNameError, check_model_name
from qwen_edit.sampling import SAMPLER_NAMES, SCHEDULER_NAMES

from .public import MAX_ERRORS, MAX_FIELD, bounded, clip, shown
from .storage import StorageConfigError, check_object_key

# Stable error codes: clients branch on these, so they never change meaning.
ERROR_CODES = {
    "INVALID_INPUT": "a field has the wrong type or value; fix the request",
    "UNSAFE_NAME": "a name or key would leave its folder (.., absolute path, symlink); fix the request",
    "MODEL_NOT_FOUND": "a model, LoRA or tokenizer file is not in the model folders",
    "MODEL_LOAD_FAILED": "a model file exists but could not be loaded",
    "LORA_ERROR": "a LoRA file could not be read or applied",
    "UNSUPPORTED_HARDWARE": "the requested backend or file cannot run on this GPU",
    "IMAGE_NOT_FOUND": "image_name names no file in the input folders",
    "INVALID_IMAGE": "an input is not a readable PNG/JPEG/WebP image (or not valid base64)",
    "IMAGE_TOO_LARGE": "an input image is over the byte, side or pixel limits",
    "URL_NOT_ALLOWED": "image_url (or a redirect) is not http(s) or points at a non-public address",
    "IMAGE_FETCH_FAILED": "an image URL or object key could not be downloaded (may be retried)",
    "STORAGE_NOT_CONFIGURED": "image_object_key was given but the worker has no bucket configured",
    "TIMEOUT": "the job's deadline (timeout) passed; the job stopped at the next check (details.stage)",
    "CANCELLED": "the job was cancelled by the platform",
    "CUDA_UNAVAILABLE": "no usable CUDA GPU appeared; the worker is refreshed",
    "CUDA_OOM": "the GPU ran out of memory; details.suggestion holds settings that fit",
    "CUDA_ERROR": "a fatal CUDA error; the worker is refreshed",
    "CONFIG_ERROR": "the worker's own settings (QWEN_EDIT_*, RUNPOD_STORAGE_*) are invalid; fix the endpoint",
    "INVALID_WORKFLOW": "input.workflow has a node or value the pipeline can't run as ComfyUI would",
    "INTERNAL": "an unexpected error; the traceback is in the worker's log",
}
IMAGE_FIELDS = ("image_name", "image_base64", "image_url", "image_object_key")
EDIT_FIELDS = tuple(EditParams.__dataclass_fields__)
NAME_FIELDS = ("model_name", "clip_name", "vae_name")
STORAGE_FIELDS = {
    "endpoint_url": str,
    "bucket": str,
    "access_key_id": str,
    "secret_access_key": str,
    "region": str,
    "public_url": str,
    "output_prefix": str,
    "upload": bool,
    "return_base64": bool,
}
OTHER_FIELDS = (
    "images",
    "lora_name",
    "lora_strength",
    "cpu_offload",
    "num_blocks_on_gpu",
    "use_pin_memory",
    "timeout",
    "storage",
)
ALL_FIELDS = (*IMAGE_FIELDS, *EDIT_FIELDS, *NAME_FIELDS, *OTHER_FIELDS)
MAX_NAME = 255  # NAME_MAX: no file name is longer, so a longer image_name can only be data
MAX_URL = 8192
MAX_LORAS = 10
LORA_STRENGTH = (-100.0, 100.0)  # ComfyUI's LoraLoaderModelOnly range
MAX_BLOCKS = 60  # Qwen-Image has 60 transformer blocks
MAX_STORAGE_TEXT = 2048  # a storage setting: a URL, a bucket, a key
# The shape of the whole input, checked before anything else reads it (check_shape): every value is
# walked once, without recursion, so no input costs more than its size.
MAX_DEPTH = 32  # a ComfyUI editor-format workflow nests about 8 deep
MAX_VALUES = 100_000  # values in the input; a workflow of a few hundred nodes holds some 20,000
MAX_KEY = 256  # characters of an object key
MAX_INT_BITS = 64  # the largest integer field, seed, is below 2**64
DEFAULT_IMAGE_BYTES = 25 * 2**20  # images.ImageLimits.max_bytes, the worker's default
BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=_\-\s]+")
URL_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
FIXES = {
    "prompt": "give the edit instruction as a string",
    "negative_prompt": "give a string (used only when cfg is not 1)",
    "seed": "give an integer 0..18446744073709551615, or -1 (or nothing) for a random seed",
    "steps": "use 1-200 steps (4 or 8 for the Lightning models)",
    "cfg": "use a number 0-100 (1.0 for the Lightning models)",
    "sampler_name": f"use one of: {', '.join(SAMPLER_NAMES)}",
    "scheduler": f"use one of: {', '.join(SCHEDULER_NAMES)}",
    "denoise": "use a number in (0, 1]",
    "shift": "use a number above 0 and at most 100 (3.0 is the workflow's)",
    "width": "give width and height together, multiples of 16 from 16 to 4096, or neither",
    "height": "give width and height together, multiples of 16 from 16 to 4096, or neither",
    "batch_size": "use 1-8",
    "timeout": "give the job's deadline in seconds, a number above 0",
    "cpu_offload": f"use one of: {', '.join(CPU_OFFLOAD_MODES)} (or true/false)",
    "num_blocks_on_gpu": f"use an integer 0-{MAX_BLOCKS}",
    "use_pin_memory": "use true or false",
}


class WorkerError(Exception):
    """An error the worker returns as `{"error": {...}}`: a stable code, the field and a fix."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        fix: str | None = None,
        retryable: bool = False,
        details: dict | None = None,
    ):
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {field + ': ' if field else ''}{message}")
        self.code, self.message, self.field, self.fix = code, message, field, fix
        self.retryable, self.details = retryable, details or {}

    def to_dict(self) -> dict:
        """The error as the response carries it, every part bounded (runners.worker.public)."""
        out = {"code": self.code, "message": clip(self.message)}
        if self.field is not None:
            out["field"] = clip(self.field, MAX_FIELD)
        out["fix"] = clip(self.fix or ERROR_CODES[self.code])
        out["retryable"] = self.retryable
        out.update(bounded(self.details))
        return out


@dataclass(frozen=True)
class ImageSource:
    kind: str  # "name", "base64", "url" or "object_key"
    value: str
    field: str


@dataclass(frozen=True)
class JobRequest:
    images: tuple[ImageSource, ...]
    edit: dict  # EditParams fields given by the request; seed None means "draw one"
    model_name: str | None = None
    clip_name: str | None = None
    vae_name: str | None = None
    loras: tuple[tuple[str, float, str], ...] | None = None  # (name, strength, field); None: the default
    cpu_offload: str | None = None
    num_blocks_on_gpu: int | None = None
    use_pin_memory: bool | None = None
    timeout: float | None = None
    storage: dict = field(default_factory=dict)


class _Problems:
    """The bad fields of one request: the first MAX_ERRORS in full, the rest counted."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.more = 0

    @property
    def full(self) -> bool:
        return len(self.items) >= MAX_ERRORS

    def add(self, field_name: str, message: str, code: str = "INVALID_INPUT", fix: str | None = None) -> None:
        if self.full:
            self.more += 1
            return
        root = field_name.split("[", 1)[0].split(".", 1)[0]
        self.items.append(
            {
                "field": clip(field_name, MAX_FIELD),
                "code": code,
                "message": clip(message, 500),
                "fix": fix or FIXES.get(root) or ERROR_CODES[code],
            }
        )

    def fields(self) -> set[str]:
        return {p["field"] for p in self.items}

    def raise_if_any(self) -> None:
        if not self.items:
            return
        first = self.items[0]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in self.items)
        count = len(self.items) + self.more
        if count > 1:
            message = f"{count} invalid fields: {message}"
        if self.more:
            message += f"; and {self.more} more"
        details: dict = {"errors": self.items}
        if self.more:
            details["errors_not_listed"] = self.more
        raise WorkerError(first["code"], message, field=first["field"], fix=first["fix"], details=details)


def image_text_limit(max_image_bytes: int) -> int:
    """Characters of the longest image string: the base64 of `max_image_bytes`, MIME line breaks (CRLF
    every 76 characters) and a data-URI header (the decoder checks the exact size)."""
    encoded = (max_image_bytes + 2) // 3 * 4
    return encoded + encoded // 38 + 1024


def check_shape(payload, *, max_image_bytes: int = DEFAULT_IMAGE_BYTES, root: str = "input") -> None:
    """Refuse an input whose shape alone is too much, before anything else reads it: nesting deeper
    than MAX_DEPTH, more than MAX_VALUES values, keys longer than MAX_KEY, a string longer than an image
    can be or text that is not Unicode (a lone surrogate), integers past MAX_INT_BITS, non-JSON
    values, and more text in all than MAX_IMAGES images and 1 MiB. Walked once, without recursion."""
    max_text = image_text_limit(max_image_bytes)
    max_total = MAX_IMAGES * max_text + 2**20
    stack = [(payload, root, 0)]
    values = total = 0
    while stack:
        value, where, depth = stack.pop()
        values += 1
        if values > MAX_VALUES:
            raise _shape_error(root, f"holds more than {MAX_VALUES:,} values")
        if isinstance(value, str):
            total += len(value)
            if len(value) > max_text:
                too_long = f"is {len(value):,} characters, more than any field takes ({max_text:,})"
                raise _shape_error(where, too_long)
            _check_text(value, where)
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            pass
        elif isinstance(value, int):
            if value.bit_length() > MAX_INT_BITS:
                raise _shape_error(where, f"is an integer of {value.bit_length()} bits; no field takes one")
        elif isinstance(value, (Mapping, list, tuple)):
            if depth >= MAX_DEPTH:
                raise _shape_error(where, f"nests more than {MAX_DEPTH} levels deep")
            if isinstance(value, Mapping):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise _shape_error(where, f"has a key that is not a string ({shown(key)})")
                    if len(key) > MAX_KEY:
                        key_name = f"{where}.{clip(key, 40)}"
                        raise _shape_error(key_name, f"is a key longer than {MAX_KEY} characters")
                    _check_text(key, where)
                    total += len(key)
                    stack.append((item, f"{where}.{key}", depth + 1))
            else:
                stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        else:
            raise _shape_error(where, f"is a {type(value).__name__}, not a JSON value")
        if total > max_total:
            raise _shape_error(root, f"holds more than {max_total:,} characters of text")


def _check_text(text: str, where: str) -> None:
    if text.isascii():
        return
    try:  # "\ud800" is valid JSON, and no text: encoders and tokenizers fail on it
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _shape_error(
            where, f"is not valid Unicode text: a lone surrogate {text[exc.start]!r} at index {exc.start}"
        ) from None


def _shape_error(where: str, message: str) -> WorkerError:
    return WorkerError(
        "INVALID_INPUT",
        message,
        field=clip(where.removeprefix("input.").removeprefix("input"), MAX_FIELD) or "input",
        fix="send a JSON object with the documented fields: text as valid Unicode, only the images large",
    )


def parse_input(payload, *, max_image_bytes: int = DEFAULT_IMAGE_BYTES):
    """A job's `input` as sent (some clients send it as JSON text), its shape checked (check_shape)."""
    if isinstance(payload, str):
        if len(payload) > MAX_IMAGES * image_text_limit(max_image_bytes) + 2**20:
            raise _shape_error("input", "is more text than a request can be")
        try:
            payload = json.loads(payload)
        except (ValueError, RecursionError):
            raise WorkerError(
                "INVALID_INPUT",
                "is a string that is not JSON (or nests too deep)",
                field="input",
                fix="send input as a JSON object",
            ) from None
    check_shape(payload, max_image_bytes=max_image_bytes)
    return payload


def parse_request(payload, *, max_timeout: float, max_image_bytes: int = DEFAULT_IMAGE_BYTES) -> JobRequest:
    """Check a job's `input` and return it typed; raises WorkerError listing every bad field."""
    payload = parse_input(payload, max_image_bytes=max_image_bytes)
    if not isinstance(payload, Mapping):
        raise WorkerError(
            "INVALID_INPUT",
            f"must be an object, got {type(payload).__name__}",
            field="input",
            fix="send input as a JSON object with at least prompt and an image",
        )
    problems = _Problems()
    given = {k: v for k, v in payload.items() if v is not None}  # null means "not given"
    images = _images(given, problems)
    edit = _edit(given, problems)
    names = {}
    for name in NAME_FIELDS:
        if name in given:
            names[name] = _name(given[name], name, problems)
    loras = _loras(given, problems)
    offload = given.get("cpu_offload")
    if isinstance(offload, bool):  # the seed's boolean form
        offload = "enable" if offload else "disable"
    if offload is not None and offload not in CPU_OFFLOAD_MODES:
        problems.add("cpu_offload", f"{shown(offload)} is not supported")
    blocks = given.get("num_blocks_on_gpu")
    if blocks is not None and not _is_int(blocks, 0, MAX_BLOCKS):
        problems.add("num_blocks_on_gpu", f"must be an integer in [0, {MAX_BLOCKS}], got {shown(blocks)}")
    pin = given.get("use_pin_memory")
    if pin is not None and not isinstance(pin, bool):
        problems.add("use_pin_memory", f"must be true or false, got {shown(pin)}")
    timeout = given.get("timeout")
    if timeout is not None and not _is_number(timeout, 0, max_timeout, low_open=True):
        problems.add(
            "timeout",
            f"must be a number of seconds in (0, {max_timeout:g}], got {shown(timeout)}",
            fix=f"give the deadline in seconds, above 0 and at most {max_timeout:g}",
        )
    storage = _storage(given.get("storage"), problems)
    for key in given:  # last: a typo'd field's own error says more than "unknown"
        if key not in ALL_FIELDS:
            if problems.full:  # counted only: a request with 50,000 unknown keys gets no 50,000 guesses
                problems.add(str(key), "unknown field")
                continue
            close = difflib.get_close_matches(str(key), ALL_FIELDS, n=1)
            problems.add(
                str(key),
                "unknown field" + (f"; did you mean {close[0]!r}?" if close else ""),
                fix=f"remove it; the fields are: {', '.join(ALL_FIELDS)}",
            )
    problems.raise_if_any()
    return JobRequest(
        images=tuple(images),
        edit=edit,
        loras=loras,
        cpu_offload=offload,
        num_blocks_on_gpu=blocks,
        use_pin_memory=pin,
        timeout=None if timeout is None else float(timeout),
        storage=storage,
        **names,
    )


def _images(given: dict, problems: _Problems) -> list[ImageSource]:
    singles = [k for k in IMAGE_FIELDS if k in given]
    sources: list[ImageSource] = []
    if len(singles) > 1:
        problems.add(
            singles[1],
            f"give one of {', '.join(IMAGE_FIELDS)}, not {' and '.join(singles)}",
            fix="put further images in the images list",
        )
    elif singles:
        source = _source(singles[0], given[singles[0]], singles[0], problems)
        if source is not None:
            sources.append(source)
    listed = given.get("images")
    if listed is not None:
        if not isinstance(listed, list):
            problems.add(
                "images",
                f"must be a list, got {type(listed).__name__}",
                fix="give a list of 1-3 images (strings or objects with one image field)",
            )
            listed = []
        if len(listed) > MAX_IMAGES:  # counted, not read: no per-item work for a list of 100,000
            problems.add(
                "images",
                f"{len(listed)} images listed; the edit takes 1 to {MAX_IMAGES}",
                fix=f"send at most {MAX_IMAGES} images",
            )
            listed = []
        for i, item in enumerate(listed):
            where = f"images[{i}]"
            if isinstance(item, Mapping):
                keys = [k for k in item if item[k] is not None]
                if len(keys) != 1 or keys[0] not in IMAGE_FIELDS:
                    problems.add(where, f"must have exactly one of {', '.join(IMAGE_FIELDS)}, got {keys}")
                    continue
                source = _source(keys[0], item[keys[0]], f"{where}.{keys[0]}", problems)
            elif isinstance(item, str):
                kind = "url" if URL_LIKE.match(item) else None
                source = _source("image_url" if kind else "image_name", item, where, problems)
            else:
                problems.add(where, f"must be a string or an object, got {type(item).__name__}")
                continue
            if source is not None:
                sources.append(source)
    count = len(singles[:1]) + (len(listed) if isinstance(listed, list) else 0)
    if count == 0 and not problems.fields() & {*IMAGE_FIELDS, "images"}:
        problems.add("images", "no input image", fix=f"give one of {', '.join(IMAGE_FIELDS)} or images")
    elif count > MAX_IMAGES:
        problems.add(
            "images",
            f"{count} images given; the edit takes 1 to {MAX_IMAGES}",
            fix=f"send at most {MAX_IMAGES} images",
        )
    return sources


def _source(kind: str, value, where: str, problems: _Problems) -> ImageSource | None:
    if not isinstance(value, str) or not value.strip():
        problems.add(
            where,
            f"must be a non-empty string, got {type(value).__name__}",
            fix="give a file name, base64 data, a URL or an object key as a string",
        )
        return None
    if kind == "image_base64":
        return ImageSource("base64", value, where)
    if kind == "image_name":
        # The seed accepts base64 here too. A data URI, or anything longer than a file name can be that
        # looks like base64, is data; the rest is a name in the input folders.
        if value.startswith("data:") or (len(value) > MAX_NAME and BASE64_TEXT.fullmatch(value)):
            return ImageSource("base64", value, where)
        if URL_LIKE.match(value):
            problems.add(where, "is a URL, not a file name", fix="send URLs in image_url")
            return None
        if _safe_name(value, where, problems, "input", "and not base64 image data") is None:
            return None
        return ImageSource("name", value, where)
    if kind == "image_url":
        scheme = value.split(":", 1)[0].lower() if ":" in value else ""
        if scheme not in ("http", "https"):
            problems.add(
                where,
                f"only http(s) URLs are fetched, not {scheme or 'no scheme'!r}",
                code="URL_NOT_ALLOWED",
                fix="give an http(s) URL, or send the image as image_base64",
            )
            return None
        if len(value) > MAX_URL:
            problems.add(where, f"longer than {MAX_URL} characters")
            return None
        return ImageSource("url", value, where)
    try:
        check_object_key(value, where)
    except StorageConfigError as exc:
        code = "UNSAFE_NAME" if ".." in value.split("/") or value.startswith("/") else "INVALID_INPUT"
        problems.add(
            where,
            exc.message,
            code=code,
            fix="give the object's key relative to the bucket, without '..'",
        )
        return None
    return ImageSource("object_key", value, where)


def _edit(given: dict, problems: _Problems) -> dict:
    edit = {k: given[k] for k in EDIT_FIELDS if k in given}
    if edit.get("seed") == -1:  # the common "random seed" convention
        edit["seed"] = None
    if "prompt" not in edit:
        problems.add("prompt", "required")
    # Both prompts are capped (MAX_PROMPT) by EditParams below: the negative one is encoded too whenever
    # cfg != 1, and one encoder call can't be stopped part-way.
    # One field at a time, so that each bad field gets its own error; width and height go with a
    # valid partner because EditParams wants both or neither.
    for name, value in edit.items():
        if value is None:
            continue
        trial = {"prompt": "", name: value}
        if name in ("width", "height"):
            trial["height" if name == "width" else "width"] = 16
        try:
            EditParams(**trial)
        except ParameterError as exc:
            problems.add(exc.field, exc.message)
    if not problems.fields() & set(EDIT_FIELDS):
        try:  # what only the combination can get wrong (width without height)
            EditParams(**{**edit, "seed": edit.get("seed") or 0})
        except ParameterError as exc:
            problems.add(exc.field, exc.message)
    return edit


def _name(value, where: str, problems: _Problems) -> str | None:
    if not isinstance(value, str) or not value:
        problems.add(where, f"must be a file name string, got {shown(value)}", fix="give a model file name")
        return None
    return _safe_name(value, where, problems, "model")


def _safe_name(value: str, where: str, problems: _Problems, folder: str, too_long: str = "") -> str | None:
    """`value` if it is a plain relative file name of sane length, else None with the problem recorded."""
    try:
        check_model_name(value, where)
    except UnsafeModelNameError as exc:
        problems.add(
            where,
            exc.message,
            code="UNSAFE_NAME",
            fix=f"give a file name relative to the {folder} folder",
        )
        return None
    if len(value) > MAX_NAME:
        problems.add(where, f"longer than {MAX_NAME} characters {too_long}".rstrip())
        return None
    return value


def _loras(given: dict, problems: _Problems) -> tuple | None:
    value = given.get("lora_name")
    strength = given.get("lora_strength")
    if strength is not None and not isinstance(value, str):
        problems.add(
            "lora_strength",
            "only goes with a single lora_name string",
            fix='give strengths in the list form: [{"name": ..., "strength": ...}]',
        )
    if value is None:
        return None
    if isinstance(value, str):
        if value == "":
            return ()
        value = [{"name": value, "strength": 1.0 if strength is None else strength}]
        single = True
    elif isinstance(value, list):
        single = False
    else:
        problems.add(
            "lora_name",
            f"must be a name or a list, got {type(value).__name__}",
            fix='give "name.safetensors" or [{"name": ..., "strength": ...}, ...]',
        )
        return None
    if len(value) > MAX_LORAS:
        problems.add("lora_name", f"{len(value)} LoRAs; at most {MAX_LORAS}")
        return None
    out = []
    for i, entry in enumerate(value):
        where = "lora_name" if single else f"lora_name[{i}]"
        if isinstance(entry, str):
            name, power = entry, 1.0
        elif isinstance(entry, Mapping) and set(entry) <= {"name", "strength"} and "name" in entry:
            name, power = entry["name"], entry.get("strength", 1.0)
        elif isinstance(entry, list) and len(entry) == 2:
            name, power = entry
        else:
            problems.add(where, f"must be a name, [name, strength] or {{name, strength}}, got {shown(entry)}")
            continue
        checked = _name(name, where, problems)
        strength_field = "lora_strength" if single else f"{where}.strength"
        if not _is_number(power, *LORA_STRENGTH):
            problems.add(
                strength_field,
                f"must be a number in [{LORA_STRENGTH[0]:g}, {LORA_STRENGTH[1]:g}], got {shown(power)}",
                fix="use a strength such as 0.8 or 1.0",
            )
            continue
        if checked is not None:
            out.append((checked, float(power), where))
    return tuple(out)


def _storage(value, problems: _Problems) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add(
            "storage",
            f"must be an object, got {type(value).__name__}",
            fix=f"give an object with any of: {', '.join(STORAGE_FIELDS)}",
        )
        return {}
    out = {}
    for key, item in value.items():
        where = f"storage.{key}"
        if key not in STORAGE_FIELDS:
            problems.add(where, "unknown storage setting", fix=f"use: {', '.join(STORAGE_FIELDS)}")
        elif item is not None and not isinstance(item, STORAGE_FIELDS[key]):
            problems.add(
                where,
                f"must be a {STORAGE_FIELDS[key].__name__}, got {type(item).__name__}",
                fix="fix the value's type",
            )
        elif isinstance(item, str) and len(item) > MAX_STORAGE_TEXT:
            problems.add(where, f"longer than {MAX_STORAGE_TEXT} characters")
        elif item is not None:
            out[key] = item
    return out


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value, low: float, high: float, low_open: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return (low < value if low_open else low <= value) and value <= high


# -- worker-comfyui's request: a workflow and named images -----------------------------------------

WORKFLOW_FIELDS = ("workflow", "images", "overrides", "timeout", "storage")


@dataclass(frozen=True)
class WorkflowRequest:
    """runpod-workers/worker-comfyui's request: `workflow` (API or editor format, an object or JSON
    text), `images` [{name, image}] (base64 or a data URI; `name` is what a LoadImage node asks for),
    plus this worker's `overrides` ({"prompt": ..., "3.seed": 42}), `timeout` and `storage`."""

    workflow: dict
    images: tuple[tuple[str, ImageSource], ...]
    overrides: dict
    timeout: float | None = None
    storage: dict = field(default_factory=dict)


def parse_workflow_request(
    payload: Mapping, *, max_timeout: float, max_image_bytes: int = DEFAULT_IMAGE_BYTES
) -> WorkflowRequest:
    """Check a worker-comfyui request; raises WorkerError listing every bad field. The graph itself is
    checked by the library (qwen_edit.workflow), which names the node at fault."""
    payload = parse_input(payload, max_image_bytes=max_image_bytes)
    problems = _Problems()
    workflow = payload.get("workflow")
    if isinstance(workflow, str):  # worker-comfyui clients send either; never a file path here
        try:
            workflow = json.loads(workflow)
        except (ValueError, RecursionError):
            workflow = None
        else:
            check_shape(workflow, max_image_bytes=max_image_bytes, root="workflow")
    if not isinstance(workflow, Mapping):
        problems.add("workflow", "must be a ComfyUI workflow: a JSON object (API or editor format)")
    images = []
    raw = payload.get("images") or []
    if not isinstance(raw, list):
        problems.add("images", "must be a list of {name, image}")
        raw = []
    for i, item in enumerate(raw):
        where = f"images[{i}]"
        if not isinstance(item, Mapping) or set(item) - {"name", "image"}:
            problems.add(where, "must be an object with exactly 'name' and 'image'")
            continue
        name = None
        if isinstance(item.get("name"), str) and item["name"]:
            name = _safe_name(item["name"], f"{where}.name", problems, "image")
        else:
            problems.add(f"{where}.name", "must be the file name a LoadImage node asks for")
        if not isinstance(item.get("image"), str) or not item["image"]:
            problems.add(f"{where}.image", "must be the image as base64 or a data URI")
        elif name is not None:
            images.append((name, ImageSource("base64", item["image"], f"{where}.image")))
    overrides = payload.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        problems.add("overrides", 'must be an object such as {"prompt": "...", "3.seed": 42}')
    timeout = payload.get("timeout")
    if timeout is not None and not _is_number(timeout, 0, max_timeout, low_open=True):
        problems.add("timeout", f"must be a number of seconds in (0, {max_timeout:g}], got {shown(timeout)}")
    storage = _storage(payload.get("storage"), problems)
    for key in payload:
        if key not in WORKFLOW_FIELDS:
            fields = ", ".join(WORKFLOW_FIELDS)
            problems.add(str(key), "unknown field", fix=f"with a workflow the fields are: {fields}")
    problems.raise_if_any()
    return WorkflowRequest(
        dict(workflow), tuple(images), dict(overrides), None if timeout is None else float(timeout), storage
    )
