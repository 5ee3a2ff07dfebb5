"""S3 storage against a real S3 server on 127.0.0.1 (moto's server mode): uploads, object-key inputs,
per-request stores, and a store that can't be reached (the image still comes back as base64)."""

from __future__ import annotations

import base64

import pytest
from test_worker_support import (
    api_client,
    decode_png,
    encode,
    error_of,
    free_port,
    moto_s3,
    picture,
    runsync,
    valid_input,
    worker_with,
)

from qwen_edit import conditioning
from runners.worker import storage
from runners.worker.storage import StorageConfig, StorageConfigError

BUCKET = "volume-1"


@pytest.fixture(scope="module")
def s3():
    with moto_s3(BUCKET) as (endpoint, client):
        yield endpoint, client


def store(endpoint: str, **changes) -> StorageConfig:
    settings = {
        "endpoint_url": endpoint,
        "bucket": BUCKET,
        "access_key_id": "user_test",
        "secret_access_key": "rps_test",
        "region": "EU-RO-1",
        **changes,
    }
    return StorageConfig(**settings)


def client_for(config: StorageConfig):
    return api_client(worker_with(storage=config))


# -- the library module ---------------------------------------------------------------------------


def test_env_settings_and_the_runpod_region():
    env = {
        "RUNPOD_STORAGE_ENDPOINT": "https://s3api-eu-ro-1.runpod.io",
        "RUNPOD_STORAGE_BUCKET": "abc123",
        "RUNPOD_STORAGE_ACCESS_KEY_ID": "user_x",
        "RUNPOD_STORAGE_SECRET_ACCESS_KEY": "rps_y",
        "RUNPOD_STORAGE_PUBLIC_URL": "https://cdn.example.com/out",
        "RUNPOD_STORAGE_OUTPUT_PREFIX": "edits",
        "RUNPOD_STORAGE_UPLOAD": "true",
        "RUNPOD_STORAGE_BASE64": "false",
    }
    config = StorageConfig.from_env(env)
    assert config.upload_enabled and config.return_base64 is False
    assert config.resolved_region() == "EU-RO-1"
    assert storage.output_key(config, "job/../1", 0) == "edits/job_.._1/0.png"
    assert storage.object_url(config, "edits/a b.png") == "https://cdn.example.com/out/edits/a%20b.png"
    assert not StorageConfig.from_env({}).upload_enabled
    for bad in (
        {"RUNPOD_STORAGE_UPLOAD": "maybe"},
        {"RUNPOD_STORAGE_BUCKET": "b", "RUNPOD_STORAGE_ACCESS_KEY_ID": "x"},
        {"RUNPOD_STORAGE_ENDPOINT": "ftp://x"},
        {"RUNPOD_STORAGE_OUTPUT_PREFIX": "../up"},
    ):
        with pytest.raises(StorageConfigError):
            StorageConfig.from_env(bad)


def test_the_client_uses_settings_that_non_aws_stores_accept():
    client = storage.make_client(store("https://s3api-eu-ro-1.runpod.io", region=None))
    config = client.meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.s3["addressing_style"] == "path" and config.signature_version == "s3v4"
    assert client.meta.region_name == "EU-RO-1" and config.retries["total_max_attempts"] == 3


def test_upload_download_and_their_limits(s3):
    endpoint, client = s3
    config = store(endpoint)
    done = storage.upload_bytes(config, "outputs/j/0.png", b"\x89PNG data", "image/png")
    assert (done.bucket, done.key, done.url) == (BUCKET, "outputs/j/0.png", None)
    head = client.head_object(Bucket=BUCKET, Key="outputs/j/0.png")
    assert head["ContentType"] == "image/png" and head["ContentLength"] == 9
    assert storage.download_bytes(config, "outputs/j/0.png", 100) == b"\x89PNG data"
    with pytest.raises(storage.StorageTooLargeError):
        storage.download_bytes(config, "outputs/j/0.png", 4)
    with pytest.raises(storage.StorageError, match="NoSuchKey"):
        storage.download_bytes(config, "outputs/j/missing.png", 100)
    presigned = storage.object_url(store(endpoint, presign_seconds=60), "outputs/j/0.png")
    assert presigned.startswith(f"{endpoint}/{BUCKET}/outputs/j/0.png?") and "X-Amz-Signature" in presigned


def test_per_request_stores_never_borrow_the_workers_credentials():
    base = store("https://s3.example.com")
    assert base.with_overrides({"output_prefix": "mine/", "upload": False}).bucket == BUCKET
    with pytest.raises(StorageConfigError) as info:
        base.with_overrides({"bucket": "someone-elses"})
    assert info.value.field == "storage.endpoint_url"
    own = base.with_overrides(
        {
            "endpoint_url": "https://r2.example.com",
            "bucket": "b",
            "access_key_id": "k",
            "secret_access_key": "s",
        }
    )
    assert own.public_url is None and own.region is None and own.access_key_id == "k"


# -- the worker -------------------------------------------------------------------------------------


def test_outputs_are_uploaded_with_key_and_public_url(s3):
    endpoint, client = s3
    api = client_for(store(endpoint, public_url="https://cdn.example.com/vol", output_prefix="edits/"))
    body = api.post("/runsync", json={"input": valid_input(batch_size=2)}).json()
    assert body["status"] == "COMPLETED", body
    job_id = body["id"]
    for i, entry in enumerate(body["output"]["images"]):
        key = f"edits/{job_id}/{i}.png"
        assert (entry["bucket"], entry["object_key"]) == (BUCKET, key)
        assert entry["url"] == f"https://cdn.example.com/vol/{key}"
        assert "base64" not in entry  # uploaded, and base64 is off by default then
        data = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert conditioning.read_png_parameters(data)["prompt"] == "make it blue"
        assert len(data) == entry["bytes"]


def test_base64_as_well_when_asked_per_request(s3):
    endpoint, client = s3
    api = client_for(store(endpoint))
    out = runsync(api, valid_input(storage={"return_base64": True, "output_prefix": "req/"}))["output"]
    entry = out["images"][0]
    assert entry["object_key"].startswith("req/") and "url" not in entry
    stored = client.get_object(Bucket=BUCKET, Key=entry["object_key"])["Body"].read()
    assert base64.b64decode(entry["base64"]) == stored
    out = runsync(api, valid_input(storage={"upload": False}))["output"]
    assert "object_key" not in out["images"][0] and decode_png(out["images"][0]["base64"])


def test_an_unreachable_store_still_returns_the_image_as_base64():
    api = client_for(store(f"http://127.0.0.1:{free_port()}", return_base64=False))
    body = runsync(api, valid_input())
    assert body["status"] == "COMPLETED", body
    entry = body["output"]["images"][0]
    assert decode_png(entry["base64"]).size == (64, 64)
    assert "Could not connect" in entry["upload_error"] and "object_key" not in entry
    assert any("upload failed" in w and "base64" in w for w in body["output"]["warnings"])


def test_object_key_inputs_are_downloaded(s3):
    endpoint, client = s3
    client.put_object(Bucket=BUCKET, Key="inputs/photo.png", Body=encode(picture(72, 48, seed=9)))
    client.put_object(Bucket=BUCKET, Key="inputs/notes.txt", Body=b"hello")
    api = client_for(store(endpoint, upload=False))
    body = runsync(
        api,
        valid_input(
            image_base64=None,
            image_object_key="inputs/photo.png",
            images=[{"image_object_key": "inputs/photo.png"}],
        ),
    )
    assert body["status"] == "COMPLETED", body
    for key, code in [("inputs/missing.png", "IMAGE_FETCH_FAILED"), ("inputs/notes.txt", "INVALID_IMAGE")]:
        error = error_of(runsync(api, valid_input(image_base64=None, image_object_key=key)))
        assert (error["code"], error["field"]) == (code, "image_object_key"), error


def test_object_keys_are_capped_in_size_and_prefix(s3):
    from runners.worker.images import ImageLimits

    endpoint, client = s3
    client.put_object(Bucket=BUCKET, Key="inputs/large.png", Body=encode(picture(200, 200)))
    api = api_client(
        worker_with(
            storage=store(endpoint, upload=False, input_prefix="inputs/"),
            limits=ImageLimits(max_bytes=10_000),
        )
    )
    error = error_of(runsync(api, valid_input(image_base64=None, image_object_key="inputs/large.png")))
    assert error["code"] == "IMAGE_TOO_LARGE"
    error = error_of(runsync(api, valid_input(image_base64=None, image_object_key="outputs/x.png")))
    assert error["code"] == "UNSAFE_NAME" and "input prefix" in error["message"]


def test_a_request_can_bring_its_own_store_and_runpods_s3config(s3):
    endpoint, client = s3
    client.create_bucket(Bucket="own-bucket")
    api = client_for(StorageConfig())  # the worker itself has no store
    own = {"endpoint_url": endpoint, "bucket": "own-bucket", "access_key_id": "a", "secret_access_key": "b"}
    out = runsync(api, valid_input(storage=own))["output"]
    assert out["images"][0]["bucket"] == "own-bucket"
    client.head_object(Bucket="own-bucket", Key=out["images"][0]["object_key"])
    worker = worker_with(storage=StorageConfig())
    s3config = {"endpointUrl": endpoint, "bucketName": "own-bucket", "accessId": "a", "accessSecret": "b"}
    result = worker.run({"id": "s3cfg", "input": valid_input(), "s3Config": s3config})
    assert result["images"][0]["object_key"] == "outputs/s3cfg/0.png"
