"""Where a job's images go: the store (the worker's, or one the request names) and/or base64.

No output is ever lost: an image that was not uploaded (uploads off, the upload failed, or the store did
not answer by the job's deadline) always comes back as base64, whatever the base64 setting says, with
the reason in `upload_error` and `warnings`; `delivery` says where each image went.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from functools import partial

from . import images as inputs
from . import storage
from .deadline import DeadlinePassed, Outcome, calls_by
from .public import clip
from .schema import MAX_STORAGE_TEXT, WorkerError

RESPONSE_WARN_BYTES = 15 * 2**20  # RunPod keeps /runsync results up to 20 MB (handler-functions.mdx)
# RunPod's job-level s3Config (send-requests.mdx) -> our storage settings.
S3CONFIG_KEYS = {
    "endpointUrl": "endpoint_url",
    "bucketName": "bucket",
    "accessId": "access_key_id",
    "accessSecret": "secret_access_key",
}


S3CONFIG_FIX = f"give {', '.join(S3CONFIG_KEYS)} as strings"


def request_storage(
    base: storage.StorageConfig,
    job: Mapping,
    overrides: Mapping,
    policy: inputs.UrlPolicy,
    deadline: float | None = None,
) -> storage.StorageConfig:
    """The store for this job: the worker's, changed by the request's `storage` and `s3Config`."""
    changes = dict(overrides)
    s3 = job.get("s3Config")
    if s3 is not None:  # the platform passes the request's own s3Config: checked like the input
        if not isinstance(s3, Mapping):
            raise WorkerError("INVALID_INPUT", "must be an object", field="s3Config", fix=S3CONFIG_FIX)
        for key, value in s3.items():
            if key in S3CONFIG_KEYS and not (isinstance(value, str) and 0 < len(value) <= MAX_STORAGE_TEXT):
                raise WorkerError(
                    "INVALID_INPUT",
                    f"must be a non-empty string of at most {MAX_STORAGE_TEXT} characters",
                    field=f"s3Config.{key}",
                    fix=S3CONFIG_FIX,
                )
        changes = {**{S3CONFIG_KEYS[k]: v for k, v in s3.items() if k in S3CONFIG_KEYS}, **changes}
    if not changes:
        return base
    if changes.get("endpoint_url"):  # a store the request chose is an outbound target, like a URL
        inputs.check_url(changes["endpoint_url"], "storage.endpoint_url", policy, deadline)
    try:
        return base.with_overrides(changes)
    except storage.StorageConfigError as exc:
        field = exc.field if exc.field.startswith("storage.") else f"storage.{exc.field}"
        raise WorkerError("INVALID_INPUT", exc.message, field=field) from None


def deliver(
    result, store: storage.StorageConfig, job_id: str, deadline: float | None = None
) -> tuple[list[dict], list[str]]:
    """Upload and/or base64-encode every image of an EditResult; returns (entries, warnings).

    Uploads run at once and end by `deadline` (time.monotonic(); default: the store's own timeouts):
    the first that fails stops the wait for the others, and every image not uploaded by then comes back
    inline. Each entry says where its image went (`delivery`: storage, inline or storage+inline) and,
    when an upload was tried and failed, why (`upload_error`)."""
    pngs = [result.png_bytes(i) for i in range(len(result.images))]  # the parameters embedded
    uploads = _upload(pngs, store, job_id, deadline) if store.upload_enabled else [None] * len(pngs)
    entries, warnings = [], []
    for i, (image, data, upload) in enumerate(zip(result.images, pngs, uploads, strict=True)):
        entry = {"index": i, "format": "png", "width": image.width, "height": image.height}
        entry["bytes"] = len(data)
        uploaded = upload is not None and upload.ok
        if uploaded:
            done = upload.value
            entry.update(bucket=done.bucket, object_key=done.key)
            if done.url:
                entry["url"] = done.url
        elif upload is not None:  # whatever went wrong, the image goes back as base64 below
            reason = _why(upload.error)
            entry["upload_error"] = reason
            warnings.append(f"image {i}: upload failed ({reason}); returned as base64 instead")
        if not uploaded or store.return_base64:
            if not uploaded and store.return_base64 is False and upload is None:
                warnings.append(
                    f"image {i}: base64 is off but the image was not uploaded; returned as base64"
                )
            entry["base64"] = base64.b64encode(data).decode("ascii")
        entry["delivery"] = "+".join(
            place for place, there in (("storage", uploaded), ("inline", "base64" in entry)) if there
        )
        entries.append(entry)
    inline = sum(len(entry.get("base64", "")) for entry in entries)
    if inline > RESPONSE_WARN_BYTES:
        warnings.append(
            f"the response carries {inline / 2**20:.1f} MiB of base64 and RunPod caps /runsync results at "
            "20 MB: configure RUNPOD_STORAGE_* uploads for large batches"
        )
    return entries, warnings


def _upload(
    pngs: list[bytes], store: storage.StorageConfig, job_id: str, deadline: float | None
) -> list[Outcome]:
    """Every PNG put at its output key, all at once, by the deadline (see deliver)."""
    now = time.monotonic()
    if deadline is None:
        deadline = now + store.max_attempts * (store.connect_timeout + store.read_timeout)
    remaining = deadline - now
    if remaining <= 0:
        return [Outcome(error=DeadlinePassed("no time was left before the job's deadline"))] * len(pngs)
    store = store.bounded_by(remaining)  # so that calls given up on end soon after, on their own
    try:
        client = storage.make_client(store)
    except Exception as exc:
        return [Outcome(error=exc)] * len(pngs)

    def put(index: int, data: bytes):
        key = storage.output_key(store, job_id, index)
        return storage.upload_bytes(store, key, data, "image/png", client=client)

    calls = [partial(put, i, data) for i, data in enumerate(pngs)]
    return calls_by(deadline, calls, stop_at_first_error=True)


def _why(error: BaseException) -> str:
    if isinstance(error, DeadlinePassed):
        return f"not done by the job's deadline: {error}" if error.__cause__ is None else str(error)
    return clip(str(error), 500)
