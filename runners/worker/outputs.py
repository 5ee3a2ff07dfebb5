"""Where a job's images go: the store (the worker's, or one the request names) and/or base64.

No output is ever lost: an image that was not uploaded (uploads off, or the upload failed) always
comes back as base64, whatever the base64 setting says, with the reason in `upload_error` and
`warnings`.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

from . import images as inputs
from . import storage
from .schema import WorkerError

RESPONSE_WARN_BYTES = 15 * 2**20  # RunPod keeps /runsync results up to 20 MB (handler-functions.mdx)
# RunPod's job-level s3Config (send-requests.mdx) -> our storage settings.
S3CONFIG_KEYS = {
    "endpointUrl": "endpoint_url",
    "bucketName": "bucket",
    "accessId": "access_key_id",
    "accessSecret": "secret_access_key",
}


def request_storage(
    base: storage.StorageConfig, job: Mapping, overrides: Mapping, policy: inputs.UrlPolicy
) -> storage.StorageConfig:
    """The store for this job: the worker's, changed by the request's `storage` and `s3Config`."""
    changes = dict(overrides)
    s3 = job.get("s3Config")
    if isinstance(s3, Mapping):
        changes = {**{S3CONFIG_KEYS[k]: v for k, v in s3.items() if k in S3CONFIG_KEYS}, **changes}
    if not changes:
        return base
    if changes.get("endpoint_url"):  # a store the request chose is an outbound target, like a URL
        inputs.check_url(changes["endpoint_url"], "storage.endpoint_url", policy)
    try:
        return base.with_overrides(changes)
    except storage.StorageConfigError as exc:
        field = exc.field if exc.field.startswith("storage.") else f"storage.{exc.field}"
        raise WorkerError("INVALID_INPUT", exc.message, field=field) from None


def deliver(result, store: storage.StorageConfig, job_id: str) -> tuple[list[dict], list[str]]:
    """Upload and/or base64-encode every image of an EditResult; returns (entries, warnings)."""
    entries, warnings, client = [], [], None
    for i, image in enumerate(result.images):
        data = result.png_bytes(i)  # PNG with the parameters embedded
        entry = {
            "index": i,
            "format": "png",
            "width": image.width,
            "height": image.height,
            "bytes": len(data),
        }
        uploaded = False
        if store.upload_enabled:
            try:
                client = client or storage.make_client(store)
                key = storage.output_key(store, job_id, i)
                done = storage.upload_bytes(store, key, data, "image/png", client=client)
                entry.update(bucket=done.bucket, object_key=done.key)
                if done.url:
                    entry["url"] = done.url
                uploaded = True
            except Exception as exc:  # whatever went wrong, the image goes back as base64 below
                entry["upload_error"] = str(exc)
                warnings.append(f"image {i}: upload failed ({exc}); returned as base64 instead")
        if not uploaded or store.return_base64:
            if not uploaded and store.return_base64 is False and "upload_error" not in entry:
                warnings.append(
                    f"image {i}: base64 is off but the image was not uploaded; returned as base64"
                )
            entry["base64"] = base64.b64encode(data).decode("ascii")
        entries.append(entry)
    inline = sum(len(entry.get("base64", "")) for entry in entries)
    if inline > RESPONSE_WARN_BYTES:
        warnings.append(
            f"the response carries {inline / 2**20:.1f} MiB of base64 and RunPod caps /runsync results at "
            "20 MB: configure RUNPOD_STORAGE_* uploads for large batches"
        )
    return entries, warnings
