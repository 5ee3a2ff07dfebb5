"""S3-compatible storage for edit inputs and outputs: RunPod network volumes, AWS S3, R2, MinIO, ...

Configured by environment variables (`StorageConfig.from_env`, the RunPod worker's `RUNPOD_STORAGE_*`)
and optionally per request (`StorageConfig.with_overrides`). boto3 is imported only when a client is
made, so only uploads and object-key inputs need it.

Client settings and why (RunPod's S3 API: runpod/docs@a900806 storage/s3-api.mdx; boto3's checksums:
runpod-workers/worker-comfyui issue #156):
- path-style addressing and s3v4 signatures: custom endpoints (RunPod's `s3api-<dc>.runpod.io`, MinIO)
  have no per-bucket DNS names;
- `request_checksum_calculation` / `response_checksum_validation` = "when_required": boto3 >= 1.36
  adds CRC checksums by default, which many non-AWS stores reject (SignatureDoesNotMatch);
- RunPod's volume API has no presigned URLs, so an upload returns its key, and a URL only when a public
  base URL is configured (or presigning is asked for, for stores that support it);
- bounded retries and timeouts: an unreachable store must fail the upload in seconds, not minutes, so
  that the worker can still return the image as base64.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import quote, urlsplit

from qwen_edit.errors import QwenEditError

ENV_PREFIX = "RUNPOD_STORAGE_"
MAX_KEY_BYTES = 1024  # S3's limit on key length
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


class StorageError(QwenEditError, RuntimeError):
    """A storage operation failed; the message names the operation, bucket and key. `client_fault`: the
    store refused the request itself (no such key or bucket, access denied): trying again won't help."""

    kind = "storage"
    client_fault = False


class StorageTooLargeError(StorageError):
    """An object over the caller's size limit (refused before or while reading it)."""


class StorageConfigError(QwenEditError, ValueError):
    """Storage settings that cannot work (a missing bucket, half the credentials, a bad URL)."""

    kind = "storage"
    field_in_message = True

    def __init__(self, field_name: str, message: str):
        super().__init__(message, field=field_name)


@dataclass(frozen=True)
class StorageConfig:
    endpoint_url: str | None = None
    bucket: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    region: str | None = None
    public_url: str | None = None  # base URL under which uploaded keys are publicly readable
    output_prefix: str = "outputs/"
    input_prefix: str = ""  # object-key inputs must start with this (empty: any key)
    upload: bool | None = None  # None: upload when the store is configured
    return_base64: bool | None = None  # None: base64 only for images that were not uploaded
    presign_seconds: int = 0  # > 0: presigned GET URLs (not on RunPod volumes)
    max_attempts: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 30.0

    @property
    def configured(self) -> bool:
        return bool(self.bucket)

    @property
    def upload_enabled(self) -> bool:
        return self.configured and (self.upload is None or self.upload)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StorageConfig:
        """Read `RUNPOD_STORAGE_*` (see the README's worker section for the table)."""
        env = os.environ if environ is None else environ

        def get(*names: str) -> str | None:
            for name in names:
                value = env.get(ENV_PREFIX + name)
                if value is not None and value.strip():
                    return value.strip()
            return None

        config = cls(
            endpoint_url=get("ENDPOINT", "ENDPOINT_URL"),
            bucket=get("BUCKET", "VOLUME_ID"),
            access_key_id=get("ACCESS_KEY_ID", "ACCESS_KEY"),
            secret_access_key=get("SECRET_ACCESS_KEY", "SECRET_KEY"),
            region=get("REGION"),
            public_url=get("PUBLIC_URL"),
            output_prefix=get("OUTPUT_PREFIX") or cls.output_prefix,
            input_prefix=get("INPUT_PREFIX") or "",
            upload=_flag("UPLOAD", get("UPLOAD")),
            return_base64=_flag("BASE64", get("BASE64", "RETURN_BASE64")),
            presign_seconds=_int("PRESIGN_SECONDS", get("PRESIGN_SECONDS"), 0),
            max_attempts=_int("MAX_ATTEMPTS", get("MAX_ATTEMPTS"), cls.max_attempts),
            connect_timeout=float(_int("CONNECT_TIMEOUT", get("CONNECT_TIMEOUT"), 5)),
            read_timeout=float(_int("READ_TIMEOUT", get("READ_TIMEOUT"), 30)),
        )
        config.check()
        return config

    def with_overrides(self, overrides: Mapping) -> StorageConfig:
        """Per-request settings. A request that names its own store gives the whole target (endpoint,
        bucket and both keys): the worker's credentials are never sent to a store the request chose."""
        target_keys = {"endpoint_url", "bucket", "access_key_id", "secret_access_key", "region", "public_url"}
        given = {k: v for k, v in overrides.items() if v is not None}
        changes = dict(given)
        if target_keys & given.keys():
            missing = [
                k
                for k in ("endpoint_url", "bucket", "access_key_id", "secret_access_key")
                if not given.get(k)
            ]
            if missing:
                raise StorageConfigError(
                    f"storage.{missing[0]}",
                    "a request that names its own store must give endpoint_url, bucket, access_key_id "
                    "and secret_access_key together (the worker's credentials are not reused for it)",
                )
            reset = {"region": None, "public_url": None, "presign_seconds": 0, "input_prefix": ""}
            changes = {**reset, **changes}
        config = replace(self, **changes)
        config.check()
        return config

    def bounded_by(self, seconds: float) -> StorageConfig:
        """These settings with each connect and read timeout at most `seconds` (at least 1 s): a call
        given up at a deadline still ends soon after it, on its own timeouts."""
        cap = max(1.0, seconds)
        return replace(
            self, connect_timeout=min(self.connect_timeout, cap), read_timeout=min(self.read_timeout, cap)
        )

    def check(self) -> None:
        if self.endpoint_url is not None:
            parts = urlsplit(self.endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise StorageConfigError("endpoint_url", f"must be an http(s) URL, got {self.endpoint_url!r}")
        if self.public_url is not None and urlsplit(self.public_url).scheme not in ("http", "https"):
            raise StorageConfigError("public_url", f"must be an http(s) URL, got {self.public_url!r}")
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise StorageConfigError(
                "access_key_id", "give both the access key id and the secret, or neither"
            )
        if self.upload and not self.bucket:
            raise StorageConfigError("bucket", "upload is on but no bucket is configured")
        for name, prefix in (("output_prefix", self.output_prefix), ("input_prefix", self.input_prefix)):
            if prefix:
                check_object_key(prefix, name)

    def resolved_region(self) -> str:
        """The region to sign with: configured, else RunPod's datacenter id from `s3api-<dc>.runpod.io`."""
        if self.region:
            return self.region
        host = urlsplit(self.endpoint_url or "").hostname or ""
        match = re.fullmatch(r"s3api-([a-z0-9-]+)\.runpod\.io", host)
        return match.group(1).upper() if match else "us-east-1"


def _flag(name: str, value: str | None) -> bool | None:
    if value is None or value.lower() == "auto":
        return None
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise StorageConfigError(ENV_PREFIX + name, f"use true/false (or auto), got {value!r}")


def _int(name: str, value: str | None, default: int) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise StorageConfigError(ENV_PREFIX + name, f"must be an integer, got {value!r}") from None
    if number < 0:
        raise StorageConfigError(ENV_PREFIX + name, f"must be >= 0, got {number}")
    return number


def check_object_key(key: str, field_name: str = "key") -> str:
    """Refuse keys that are not plain relative paths. On RunPod volumes keys are file paths on the
    volume, so `..`, leading slashes and backslashes are refused as they are for model names."""
    if not isinstance(key, str) or not key:
        raise StorageConfigError(field_name, "must be a non-empty string")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise StorageConfigError(field_name, f"longer than {MAX_KEY_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in key) or "\\" in key:
        raise StorageConfigError(field_name, "control characters and backslashes are not allowed")
    if key.startswith("/") or ".." in key.split("/"):
        raise StorageConfigError(field_name, f"{key!r} must be a relative key without '..' segments")
    return key


def make_client(config: StorageConfig):
    """A boto3 S3 client with the settings above."""
    if not config.configured:
        raise StorageConfigError("bucket", "storage is not configured (no bucket)")
    import boto3
    from botocore.config import Config

    client_config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "total_max_attempts": max(1, config.max_attempts)},
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.resolved_region(),
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        config=client_config,
    )


@dataclass(frozen=True)
class Uploaded:
    bucket: str
    key: str
    url: str | None


def output_key(config: StorageConfig, job_id: str, index: int, extension: str = "png") -> str:
    """`<output_prefix><job_id>/<index>.<ext>`, the job id reduced to safe characters."""
    safe_job = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id).strip(".") or "job"
    prefix = config.output_prefix
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return check_object_key(f"{prefix}{safe_job}/{index}.{extension}", "output key")


def upload_bytes(config: StorageConfig, key: str, data: bytes, content_type: str, client=None) -> Uploaded:
    """PutObject `data` at `key`; returns the key and a URL where one can be given."""
    check_object_key(key)
    client = client or make_client(config)
    try:
        client.put_object(Bucket=config.bucket, Key=key, Body=data, ContentType=content_type)
    except Exception as exc:  # botocore's errors share no useful base with connection errors
        raise StorageError(f"upload of {key!r} to bucket {config.bucket!r} failed: {_describe(exc)}") from exc
    return Uploaded(config.bucket, key, object_url(config, key, client))


def object_url(config: StorageConfig, key: str, client=None) -> str | None:
    if config.public_url:
        return f"{config.public_url.rstrip('/')}/{quote(key)}"
    if config.presign_seconds > 0:
        client = client or make_client(config)
        return client.generate_presigned_url(
            "get_object", Params={"Bucket": config.bucket, "Key": key}, ExpiresIn=config.presign_seconds
        )
    return None


def download_bytes(config: StorageConfig, key: str, max_bytes: int, client=None) -> bytes:
    """GetObject, refusing objects larger than `max_bytes` (checked before and while reading)."""
    check_object_key(key)
    if config.input_prefix and not key.startswith(config.input_prefix):
        raise StorageConfigError(
            "key", f"{key!r} is outside the allowed input prefix {config.input_prefix!r}"
        )
    client = client or make_client(config)
    try:
        response = client.get_object(Bucket=config.bucket, Key=key)
    except Exception as exc:
        error = StorageError(f"download of {key!r} from bucket {config.bucket!r} failed: {_describe(exc)}")
        error.client_fault = _client_fault(exc)
        raise error from exc
    size = response.get("ContentLength")
    body = response["Body"]
    try:
        if size is not None and size > max_bytes:
            raise StorageTooLargeError(f"object {key!r} is {size} bytes, more than the limit of {max_bytes}")
        data = body.read(max_bytes + 1)
    finally:
        body.close()
    if len(data) > max_bytes:
        raise StorageTooLargeError(f"object {key!r} is more than the limit of {max_bytes} bytes")
    return data


def _client_fault(exc: Exception) -> bool:
    """The store answered 4xx (but not 408 or 429, which ask to try again)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _describe(exc: Exception) -> str:
    """botocore's ClientError carries the service's code (NoSuchKey, AccessDenied, ...): say it."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}".strip(": ")
    return f"{type(exc).__name__}: {exc}"
