"""The worker under hostile input (issue 16), through the runpod SDK's local API app on the demo model.

Every piece of a request is bounded before any work; the deadline covers every stage, uploads and
object-key downloads included (a store that accepts and never answers is a real socket here); what a
client can send ends as a field error or a result, never INTERNAL; errors are of a fixed size and name
files as the client named them. Time limits are derived from step times measured on this machine.
"""

from __future__ import annotations

import json
import time

import pytest
from test_worker_handler import escapes, sdk_envelope, write_lora  # noqa: F401 (escapes: a fixture)
from test_worker_support import (
    DEMO_CACHE,
    INPUT_DIR,
    TMP,
    LoopbackHTTP,
    StalledServer,
    api_client,
    b64,
    decode_png,
    demo_worker,
    encode,
    error_of,
    picture,
    valid_input,
    worker_with,
)

from qwen_edit import conditioning
from qwen_edit.params import MAX_PROMPT
from runners.worker import deadline
from runners.worker.public import clip
from runners.worker.storage import StorageConfig

CHEAP = {"width": 32, "height": 32, "steps": 1}
MAX_ERROR_BYTES = 32_000  # an error's JSON, whatever the input: far below RunPod's 20 MB result cap
SERVER_PATHS = (str(TMP), str(TMP.resolve()), str(DEMO_CACHE), str(INPUT_DIR))


@pytest.fixture(scope="module")
def worker():
    return demo_worker()


@pytest.fixture(scope="module")
def client(worker):
    return api_client(worker)


@pytest.fixture(scope="module")
def pace(client) -> dict:
    """This machine's pace now: seconds per step and per whole small job (the slowest of a few)."""
    outs = [runsync(client, valid_input(steps=4))["output"] for _ in range(2)]
    return {
        "step": max(max(o["timings"]["steps"]) for o in outs),
        "job": max(o["timings"]["total"] for o in outs),
    }


def runsync(client, payload) -> dict:
    """/runsync with the body as Python's json writes it: lone surrogates as \\ud800 escapes and NaN as
    NaN, both of which JSON parsers take (httpx's own encoder refuses them)."""
    body = json.dumps({"input": payload})
    response = client.post("/runsync", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    return response.json()


def stalled_store(server: StalledServer, **changes) -> StorageConfig:
    settings = {"endpoint_url": server.url, "bucket": "volume-1", "access_key_id": "a",
                "secret_access_key": "b", **changes}  # fmt: skip
    return StorageConfig(**settings)


def assert_client_fault(body: dict, code: str, field: str) -> dict:
    error = error_of(body)
    assert (error["code"], error["field"]) == (code, field), error
    assert error["retryable"] is False and error["message"] and error["fix"]
    assert len(body["error"]) <= MAX_ERROR_BYTES, len(body["error"])
    return error


# -- bounds before any work --------------------------------------------------------------------------


def test_a_10_mb_negative_prompt_is_refused_at_once_and_the_next_job_is_answered(client, pace):
    start = time.monotonic()
    body = runsync(client, valid_input(negative_prompt="x" * 10_000_000, cfg=2.0, timeout=10))
    refused = time.monotonic() - start
    error = assert_client_fault(body, "INVALID_INPUT", "negative_prompt")
    assert f"longer than {MAX_PROMPT}" in error["message"]
    # Refused before the lock and the model: sooner than one small job runs (JSON and HTTP included).
    assert refused < pace["job"] + 1.0, (refused, pace)
    assert runsync(client, valid_input(**CHEAP))["status"] == "COMPLETED"


HUGE_INPUTS = [
    ({"seed": "x" * 1_000_000}, "seed"),
    ({"k" * 1_000_000: 1}, clip("k" * 1_000_000, 40)),
    ({"image_base64": None, "images": [5] * 100_000}, "input"),
    ({"storage": {f"key{i}": 1 for i in range(50_000)}}, "storage.key0"),
    ({"prompt": "x" * 1_000_000}, "prompt"),
    ({"lora_name": [{"name": f"l{i}.safetensors"} for i in range(100_000)]}, "input"),
    ({"cfg": 10**400}, "cfg"),
    ({"overrides": "x" * 100_000}, "overrides"),
]  # fmt: skip


@pytest.mark.parametrize("changes, field", HUGE_INPUTS, ids=[c[1][:12] for c in HUGE_INPUTS])
def test_errors_stay_small_whatever_the_input_echoes(client, changes, field):
    start = time.monotonic()
    body = runsync(client, valid_input(**changes))
    error = assert_client_fault(body, "INVALID_INPUT", field)
    assert time.monotonic() - start < 10  # linear in the input: no per-key guessing, no quadratic text
    assert len(error.get("errors", [])) <= 20


def test_nesting_is_bounded_without_recursion(client, worker):
    deep: list = []
    tip = deep
    for _ in range(100_000):  # what the SDK passes to the handler as it is
        tip.append([])
        tip = tip[0]
    envelope = sdk_envelope(worker, valid_input(image_base64=None, images=deep))
    error = error_of(envelope)
    assert error["code"] == "INVALID_INPUT" and error["field"].startswith("images[0]")
    assert "nests more than" in error["message"] and not error["retryable"]
    # The same as JSON text inside the input (some clients send it so): json's own recursion is caught.
    text = "[" * 100_000 + "]" * 100_000
    error = error_of(sdk_envelope(worker, text))
    assert (error["code"], error["field"], error["retryable"]) == ("INVALID_INPUT", "input", False)
    # Through the API's JSON, as deep as a JSON parser takes.
    nested: list = [1]
    for _ in range(40):
        nested = [nested]
    error = error_of(runsync(client, valid_input(prompt={"a": nested})))
    assert error["code"] == "INVALID_INPUT" and error["field"].startswith("prompt.a[0][0]")
    assert runsync(client, valid_input(**CHEAP))["status"] == "COMPLETED"


# -- what a client can send: a field error or a result, never INTERNAL --------------------------------


@pytest.fixture(scope="module")
def http():
    with LoopbackHTTP() as server:
        image = (200, {"Content-Type": "image/png"}, encode(picture(48, 40, seed=2)))
        server.routes["/%C3%A4pfel.png"] = image  # requested as /äpfel.png
        server.routes["/a%20b.png?x=%C3%BC"] = image  # requested as /a b.png?x=ü
        server.routes["/gone.png"] = (404, {}, b"no")
        yield server


ODD_BUT_ALLOWED = [
    {"image_base64": None, "image_url": "/äpfel.png"},
    {"image_base64": None, "image_url": "/a b.png?x=ü"},
    {"prompt": "make it blue \u2014 with emoji \U0001f600 and a NUL \x00"},
]


@pytest.mark.parametrize("changes", ODD_BUT_ALLOWED, ids=["non-ascii-path", "space-and-query", "text"])
def test_odd_but_valid_input_gets_a_result(client, http, changes):
    changes = dict(changes)
    if "image_url" in changes:
        changes["image_url"] = http.url(changes["image_url"])
    body = runsync(client, valid_input(**changes))
    assert body["status"] == "COMPLETED", body


CLIENT_FAULTS = [
    ({"prompt": "a lone surrogate \ud800"}, "INVALID_INPUT", "prompt"),
    ({"negative_prompt": "\udfff", "cfg": 2.0}, "INVALID_INPUT", "negative_prompt"),
    ({"storage": {"output_prefix\ud800": "x"}}, "INVALID_INPUT", "storage"),
    ({"image_base64": None, "image_url": "http://[::1/a.png"}, "INVALID_INPUT", "image_url"),
    ({"image_base64": None, "image_url": "REDIRECT:/gone.png"}, "IMAGE_FETCH_FAILED", "image_url"),
    ({"seed": 10**30}, "INVALID_INPUT", "seed"),
    ({"cfg": float("nan")}, "INVALID_INPUT", "cfg"),
    ({"lora_name": "style\x00.safetensors"}, "UNSAFE_NAME", "lora_name"),
    ({"image_base64": None, "image_name": "in\x00.png"}, "UNSAFE_NAME", "image_name"),
    ({"model_name": "../\x00x.safetensors"}, "UNSAFE_NAME", "model_name"),
]  # fmt: skip


@pytest.mark.parametrize(
    "changes, code, field", CLIENT_FAULTS, ids=[f"{i}-{c[2]}" for i, c in enumerate(CLIENT_FAULTS)]
)
def test_client_faults_are_field_errors_not_internal_nor_retryable(client, http, changes, code, field):
    changes = dict(changes)
    if str(changes.get("image_url", "")).startswith("REDIRECT:"):
        changes["image_url"] = http.url(changes["image_url"].split(":", 1)[1])
    error = assert_client_fault(runsync(client, valid_input(**changes)), code, field)
    if "\x00" in json.dumps(changes):
        assert "NUL" in error["message"] and ".." not in error["message"]
    assert runsync(client, valid_input(**CHEAP))["status"] == "COMPLETED"


def test_a_jobs_s3config_is_checked_like_its_input(worker):
    for s3config, field in [("s3://bucket", "s3Config"), ({"endpointUrl": 5}, "s3Config.endpointUrl"),
                            ({"bucketName": ["b"]}, "s3Config.bucketName")]:  # fmt: skip
        error = worker.run({"id": "s3", "input": valid_input(**CHEAP), "s3Config": s3config})["error"]
        assert (error["code"], error["field"], error["retryable"]) == ("INVALID_INPUT", field, False)


# -- files as the client named them --------------------------------------------------------------------


def _transformer_file() -> str:
    return next(DEMO_CACHE.glob("svdq-*.safetensors")).name


def _vae_file() -> str:
    return next(DEMO_CACHE.glob("qwen_image_vae*.safetensors")).name


def test_errors_name_files_as_the_client_did_and_each_load_failure_its_field(client, escapes):  # noqa: F811
    write_lora(DEMO_CACHE / "loras" / "good.safetensors")
    (DEMO_CACHE / "loras" / "broken.safetensors").write_bytes(b"not a safetensors file")
    cases = [
        ({"model_name": "missing.safetensors"}, "MODEL_NOT_FOUND", "model_name", "missing.safetensors"),
        ({"vae_name": "missing.safetensors"}, "MODEL_NOT_FOUND", "vae_name", "missing.safetensors"),
        ({"lora_name": "missing.safetensors"}, "MODEL_NOT_FOUND", "lora_name", "missing.safetensors"),
        ({"image_base64": None, "image_name": "missing.png"}, "IMAGE_NOT_FOUND", "image_name", "missing.png"),
        ({"model_name": "escape.safetensors"}, "UNSAFE_NAME", "model_name", "escape.safetensors"),
        ({"image_base64": None, "image_name": "escape.png"}, "UNSAFE_NAME", "image_name", "escape.png"),
        ({"vae_name": _transformer_file()}, "MODEL_LOAD_FAILED", "vae_name", _transformer_file()),
        ({"clip_name": _vae_file()}, "MODEL_LOAD_FAILED", "clip_name", _vae_file()),
        ({"model_name": _vae_file()}, "MODEL_LOAD_FAILED", "model_name", _vae_file()),
        ({"lora_name": "broken.safetensors"}, "LORA_ERROR", "lora_name", "broken.safetensors"),
        ({"lora_name": ["good.safetensors", "broken.safetensors"]}, "LORA_ERROR", "lora_name[1]",
         "broken.safetensors"),
    ]  # fmt: skip
    for changes, code, field, name in cases:
        body = runsync(client, valid_input(**changes))
        error = assert_client_fault(body, code, field)
        assert name in error["message"], error
        for path in SERVER_PATHS:
            assert path not in body["error"], (path, error)
        assert "available" not in error["message"]  # no listing of what the folders hold
    assert runsync(client, valid_input(**CHEAP))["status"] == "COMPLETED"


# -- the deadline covers every stage -----------------------------------------------------------------


def test_a_long_allowed_prompt_with_a_short_timeout_ends_in_text_encoding(client, worker):
    """Both prompts at the cap and cfg 2: text encoding alone takes seconds on the demo model. The
    deadline falls inside the first prompt's encoding and stops it at the next layer, instead of after
    both prompts (where sampling's first check would have been)."""
    prompt = ("turn the sky a deep orange and " * 700)[:MAX_PROMPT]
    node_image = conditioning.scale_to_megapixels(picture(), worker.pipe.output_megapixels)  # as the job's
    start = time.monotonic()
    worker.pipe._encode(prompt, [node_image], lambda stage: None)
    one_prompt = time.monotonic() - start
    timeout = one_prompt / 2
    body = runsync(client, valid_input(prompt=prompt, negative_prompt=prompt, cfg=2.0, timeout=timeout))
    error = error_of(body)
    assert error["code"] == "TIMEOUT" and error["stage"] == "text_encode" and error["steps_done"] == 0
    # Without the checks inside text encoding the job would end after both prompts: >= 2 * one_prompt.
    assert error["elapsed"] < timeout + one_prompt, (error, one_prompt)
    assert runsync(client, valid_input(**CHEAP))["status"] == "COMPLETED"


def test_a_stalled_store_costs_the_job_no_more_than_its_deadline_and_no_image(pace):
    """An S3 endpoint that accepts the connection and never answers: the uploads (in parallel) are given
    up at the job's deadline and every image comes back inline, saying so."""
    with StalledServer() as server:
        api = api_client(worker_with(storage=stalled_store(server)))
        timeout = 3 * pace["job"] + 2 * pace["step"] + 1.0  # room for the edit, then the store stalls
        start = time.monotonic()
        body = runsync(api, valid_input(batch_size=2, timeout=timeout))
        elapsed = time.monotonic() - start
        assert server.accepted  # the uploads did reach the store
    assert body["status"] == "COMPLETED", body
    out = body["output"]
    assert elapsed < timeout + pace["job"] + 1.0, (elapsed, timeout, pace)  # botocore alone: 3 x 30 s
    assert out["timings"]["total"] <= timeout + 0.5, out["timings"]
    for entry in out["images"]:
        assert entry["delivery"] == "inline" and "object_key" not in entry
        assert "deadline" in entry["upload_error"] and decode_png(entry["base64"]).size == (64, 64)
    assert len([w for w in out["warnings"] if "upload failed" in w]) == 2


def test_no_time_left_for_uploads_means_inline_at_once(pace):
    with StalledServer() as server:
        worker = worker_with(storage=stalled_store(server))
        from runners.worker import outputs

        result = worker.pipe.edit(picture(), "x", width=32, height=32, steps=1)
        start = time.monotonic()
        entries, warnings = outputs.deliver(result, worker.config.storage, "j", deadline=time.monotonic())
        assert time.monotonic() - start < pace["job"] + 0.5
    assert entries[0]["delivery"] == "inline" and "no time was left" in entries[0]["upload_error"]


def test_an_object_key_from_a_stalled_store_fails_at_the_deadline(pace):
    with StalledServer() as server:
        api = api_client(worker_with(storage=stalled_store(server, upload=False)))
        timeout = pace["job"] + 1.0
        start = time.monotonic()
        body = runsync(api, valid_input(image_base64=None, image_object_key="in/a.png", timeout=timeout))
        elapsed = time.monotonic() - start
    error = error_of(body)
    assert (error["code"], error["field"]) == ("IMAGE_FETCH_FAILED", "image_object_key")
    assert "deadline" in error["message"] and error["retryable"]
    assert elapsed < timeout + pace["job"] + 1.0, (elapsed, timeout)


def test_the_first_failure_stops_the_wait_for_the_rest():
    def fails():
        raise OSError("refused")

    start = time.monotonic()
    calls = [fails, lambda: time.sleep(60)]
    outcomes = deadline.calls_by(time.monotonic() + 60, calls, stop_at_first_error=True)
    assert time.monotonic() - start < 30  # not the 60 s the second call would take
    assert isinstance(outcomes[0].error, OSError) and isinstance(outcomes[1].error, deadline.DeadlinePassed)
    assert outcomes[1].error.__cause__ is outcomes[0].error
    assert [o.value for o in deadline.calls_by(time.monotonic() + 60, [lambda: 1, lambda: 2])] == [1, 2]


# -- worker-comfyui's request shape ------------------------------------------------------------------


def test_workflow_requests_are_bounded_and_name_loader_nodes(client):
    from test_workflow import seed_api
    from test_workflow import write_lora as write_workflow_lora

    from qwen_edit.testing.demo import demo_settings

    write_workflow_lora(demo_settings(DEMO_CACHE).folders.folders["loras"][0] / "a.safetensors", 1)

    def workflow(changes: dict | None = None, **extra) -> dict:
        graph = seed_api(1)
        for node, inputs in (changes or {}).items():
            graph[node]["inputs"].update(inputs)
        image = [{"name": "pic1.png", "image": b64(encode(picture(72, 56, seed=1)))}]
        return {"workflow": graph, "images": image, **extra}

    start = time.monotonic()
    body = runsync(client, workflow(overrides={"negative_prompt": "x" * 10_000_000}))
    assert_client_fault(body, "INVALID_INPUT", "negative_prompt")
    assert time.monotonic() - start < 10
    nested = "[" * 100_000 + "]" * 100_000  # the workflow as JSON text, as worker-comfyui clients send it
    assert_client_fault(runsync(client, {"workflow": nested}), "INVALID_INPUT", "workflow")
    body = runsync(client, workflow({"6": {"vae_name": _transformer_file()}}))
    error = assert_client_fault(body, "MODEL_LOAD_FAILED", "workflow.6.vae_name")
    assert _transformer_file() in error["message"]
    body = runsync(client, workflow({"1": {"model_name": "missing.safetensors"}}))
    assert_client_fault(body, "MODEL_NOT_FOUND", "workflow.1.model_name")
    missing_image = {"workflow": seed_api(1), "images": []}  # pic1.png is in no input folder
    wrong_vae = workflow({"6": {"vae_name": _transformer_file()}})
    for body in (runsync(client, wrong_vae), runsync(client, missing_image)):
        for path in SERVER_PATHS:
            assert path not in json.dumps(body), path
    assert runsync(client, workflow())["status"] == "COMPLETED"
