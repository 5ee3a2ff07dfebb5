"""The worker end to end on the demo model, through the runpod SDK's local API server (in process).

Every job goes through the SDK's own `/runsync` (or `/run` + `/status`) app with the real async
handler; only the CUDA failure tests replace `edit`, because no CUDA error can happen on a CPU.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time

import pytest
import torch
from safetensors.torch import save_file
from test_worker_inputs import decompression_bomb, png_header_only
from test_worker_support import (
    DEMO_CACHE,
    INPUT_DIR,
    TMP,
    LoopbackHTTP,
    api_client,
    b64,
    decode_png,
    demo_worker,
    encode,
    error_of,
    picture,
    runsync,
    valid_input,
    worker_with,
)

from qwen_edit import conditioning
from qwen_edit.pipeline import GPUOutOfMemoryError
from runners.worker.handler import Worker, WorkerConfig, make_handler
from runners.worker.schema import ERROR_CODES

CHEAP = {"width": 32, "height": 32, "steps": 1}  # the "next valid job" after each bad one


@pytest.fixture(scope="module")
def worker():
    return demo_worker()


@pytest.fixture(scope="module")
def client(worker):
    return api_client(worker)


@pytest.fixture(scope="module")
def http():
    with LoopbackHTTP() as server:
        server.routes["/img.png"] = (200, {"Content-Type": "image/png"}, encode(picture(80, 60, seed=3)))
        for name, target in {
            "/to-metadata": "http://169.254.169.254/latest/meta-data/",
            "/to-loopback": "http://127.0.0.2:9/a.png",
            "/to-private": "http://10.1.2.3/a.png",
            "/to-file": "file:///etc/passwd",
        }.items():
            server.routes[name] = (302, {"Location": target}, b"")
        yield server


@pytest.fixture(scope="module")
def escapes(tmp_path_factory):
    """Symlinks inside the model and input folders that lead outside them."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.safetensors").write_bytes(b"secret")
    (outside / "secret.png").write_bytes(encode(picture(8, 8)))
    links = {DEMO_CACHE / "escape.safetensors": outside / "secret.safetensors",
             INPUT_DIR / "escape.png": outside / "secret.png"}  # fmt: skip
    for link, target in links.items():
        if not link.is_symlink():
            os.symlink(target, link)
    return links


# -- the good path -----------------------------------------------------------------------------------


def test_runsync_returns_pngs_with_parameters_seed_and_timings(client):
    body = runsync(client, valid_input(batch_size=2, negative_prompt="blurry", cfg=2.0))
    assert body["status"] == "COMPLETED", body
    out = body["output"]
    assert [im["index"] for im in out["images"]] == [0, 1]
    for entry in out["images"]:
        image = decode_png(entry["base64"])
        assert image.size == (64, 64) == (entry["width"], entry["height"])
        assert "object_key" not in entry and "upload_error" not in entry
    params = conditioning.read_png_parameters(base64.b64decode(out["images"][0]["base64"]))
    assert params["prompt"] == "make it blue" and params["seed"] == 7 and params["cfg"] == 2.0
    assert out["seed"] == 7 and out["parameters"]["negative_prompt"] == "blurry"
    assert len(out["timings"]["steps"]) == 4 and out["timings"]["total"] >= out["timings"]["edit"] > 0
    assert {"fetch_images", "load_models", "text_encode", "vae_decode"} <= set(out["timings"])
    assert out["model"]["backend"] == "portable" and "warnings" not in out


def test_run_then_status_and_a_random_seed_that_reproduces(client):
    job = client.post("/run", json={"input": valid_input(seed=None)}).json()
    assert job["status"] == "IN_PROGRESS"
    first = client.post(f"/status/{job['id']}").json()
    assert first["status"] == "COMPLETED", first
    seed = first["output"]["seed"]
    assert 0 <= seed < 2**53
    again = runsync(client, valid_input(seed=seed))["output"]
    assert again["images"][0]["base64"] == first["output"]["images"][0]["base64"]
    other = runsync(client, valid_input(seed=-1))["output"]
    assert other["seed"] != seed


def test_three_images_from_a_file_a_url_and_base64(client, http):
    (INPUT_DIR / "in.png").write_bytes(encode(picture(70, 50, seed=1)))
    payload = valid_input(
        image_base64=None,
        image_name="in.png",
        images=[http.url("/img.png"), {"image_base64": b64(encode(picture(40, 40), "JPEG"))}],
    )
    body = runsync(client, payload)
    assert body["status"] == "COMPLETED", body
    assert "/img.png" in http.hits


def test_offload_fields_are_applied_without_reloading(client, worker):
    pipe = worker.pipe
    out = runsync(client, valid_input(cpu_offload="enable", num_blocks_on_gpu=1, use_pin_memory=True))[
        "output"
    ]
    assert "cpu_offload='enable', num_blocks_on_gpu=1" in out["model"]["offload"]
    assert out["timings"]["load_models"] < 1.0 and worker.pipe is pipe
    error = error_of(runsync(client, valid_input(cpu_offload="enable", num_blocks_on_gpu=60)))
    assert error["code"] == "INVALID_INPUT" and error["field"] == "num_blocks_on_gpu"
    out = runsync(client, valid_input())["output"]  # back to the settings' offload
    assert "nothing to offload" in out["model"]["offload"]


def write_lora(path, seed: int = 0, stray: bool = False) -> None:
    """A PEFT-format LoRA for two layers of the demo transformer (width 128, 64 latent channels); with
    `stray`, also a layer the model doesn't have (applied with a warning)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"transformer_blocks.0.attn.to_q": (128, 128), "proj_out": (64, 128)}
    if stray:
        shapes["transformer_blocks.99.attn.to_q"] = (128, 128)
    tensors = {}
    for name, (n, k) in shapes.items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(4, k, generator=gen).bfloat16()
        tensors[f"{name}.lora_B.weight"] = torch.randn(n, 4, generator=gen).bfloat16()
    save_file(tensors, str(path))


def test_loras_by_name_with_strength_then_removed(client, worker):
    write_lora(DEMO_CACHE / "loras" / "style.safetensors")
    (DEMO_CACHE / "loras" / "broken.safetensors").write_bytes(b"not a safetensors file")
    base = runsync(client, valid_input())["output"]
    styled = runsync(client, valid_input(lora_name=[{"name": "style.safetensors", "strength": 0.8}]))[
        "output"
    ]
    assert styled["parameters"]["loras"][0][1] == 0.8
    assert styled["images"][0]["base64"] != base["images"][0]["base64"]
    single = runsync(client, valid_input(lora_name="style.safetensors", lora_strength=0.8))["output"]
    assert single["images"][0]["base64"] == styled["images"][0]["base64"]
    error = error_of(runsync(client, valid_input(lora_name="broken.safetensors")))
    assert error["code"] == "LORA_ERROR" and error["field"] == "lora_name"
    again = runsync(client, valid_input())["output"]  # the failed LoRA left nothing behind
    assert again["parameters"]["loras"] == [] and again["images"][0]["base64"] == base["images"][0]["base64"]


def test_loras_are_reported_as_the_request_named_them(client):
    """A response (and its PNGs) names LoRA files as the client did, never by the server's paths."""
    write_lora(DEMO_CACHE / "loras" / "style.safetensors")
    out = runsync(client, valid_input(lora_name=[{"name": "style.safetensors", "strength": 0.8}]))["output"]
    assert out["parameters"]["loras"] == [["style.safetensors", 0.8]]
    embedded = conditioning.read_png_parameters(base64.b64decode(out["images"][0]["base64"]))
    assert embedded["loras"] == [["style.safetensors", 0.8]]
    text = json.dumps({k: v for k, v in out.items() if k != "images"}) + json.dumps(embedded)
    assert str(DEMO_CACHE) not in text and str(DEMO_CACHE.resolve()) not in text


def _other_vae() -> str:
    copy = DEMO_CACHE / "other-vae.safetensors"
    if not copy.exists():
        copy.write_bytes(next(DEMO_CACHE.glob("qwen_image_vae*.safetensors")).read_bytes())
    return copy.name


@pytest.mark.slow
def test_after_a_model_switch_a_job_reports_no_lora_warning_of_the_job_before(client, worker):
    write_lora(DEMO_CACHE / "loras" / "stray.safetensors", stray=True)
    first = runsync(client, valid_input(lora_name="stray.safetensors"))["output"]
    assert [w for w in first["warnings"] if w.startswith("LoRA stray: 1 keys match no module")]
    switched = runsync(client, valid_input(vae_name=_other_vae()))["output"]  # other models, no LoRA
    assert worker.loaded[2].name == "other-vae.safetensors"
    assert "warnings" not in switched and switched["parameters"]["loras"] == []
    again = runsync(client, valid_input(vae_name=_other_vae(), lora_name="stray.safetensors"))["output"]
    assert len(again["warnings"]) == 1  # the LoRA's own warning, on the pipeline it applies to
    assert "warnings" not in runsync(client, valid_input())["output"]  # back to the default models


@pytest.mark.slow
def test_a_request_naming_other_model_files_reloads_and_switches_back(client, worker):
    before = worker.loaded
    out = runsync(client, valid_input(vae_name=_other_vae()))["output"]
    assert worker.loaded[2].name == "other-vae.safetensors" and out["timings"]["load_models"] > 0.1
    same = runsync(client, valid_input(vae_name="other-vae.safetensors"))["output"]
    assert same["timings"]["load_models"] < 0.1  # no second load for the same names
    runsync(client, valid_input())
    assert worker.loaded == before
    error = error_of(runsync(client, valid_input(model_name="nope.safetensors")))
    assert error["code"] == "MODEL_NOT_FOUND" and "'nope.safetensors'" in error["message"]
    assert "svdq-int4_r16-demo.safetensors" not in error["message"]  # no listing of the model folders


# -- the deadline and cancellation --------------------------------------------------------------------


def test_a_deadline_mid_sampling_stops_within_one_step(client):
    """The deadline is derived from this machine's pace (a busy 2-core machine is several times slower):
    twice what came before sampling plus a few steps, so sampling has begun and 200 steps don't fit."""
    timings = runsync(client, valid_input(steps=8))["output"]["timings"]
    step = max(timings["steps"])
    before_sampling = sum(v for k, v in timings.items() if k in ("fetch_images", "text_encode", "vae_encode"))
    timeout = round(2 * before_sampling + 4 * step + 0.2, 3)
    error = error_of(runsync(client, valid_input(steps=200, timeout=timeout)))
    assert error["code"] == "TIMEOUT" and error["field"] == "timeout"
    assert 0 < error["steps_done"] < error["total_steps"] == 200
    # This job's own pace, in case the machine slowed down since the measurement above
    slowest = max(step, (error["elapsed"] - before_sampling) / error["steps_done"])
    overshoot = error["elapsed"] - timeout
    assert 0 <= overshoot <= 2 * slowest + 0.1, (overshoot, step, slowest)
    assert runsync(client, valid_input(**CHEAP))["status"] == "COMPLETED"


def test_a_platform_cancel_stops_the_edit_at_the_next_step(worker):
    """Cancels come once the edit is under way and the lock must be let go within a few steps, both
    derived from a cheap job's pace on this machine (no fixed times: a busy machine is slower)."""
    stop = threading.Event()
    timings = worker.run({"id": "c0", "input": valid_input(steps=2)}, threading.Event())["timings"]
    step, started = max(timings["steps"]), timings["edit"]
    threading.Timer(started, stop.set).start()
    result = worker.run({"id": "c1", "input": valid_input(steps=200)}, stop)
    assert result["error"]["code"] == "CANCELLED"

    async def cancel_the_task() -> float:
        task = asyncio.create_task(make_handler(worker)({"id": "c2", "input": valid_input(steps=200)}))
        await asyncio.sleep(started)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        start = time.monotonic()
        while worker.lock.locked() and time.monotonic() - start < 5:
            await asyncio.sleep(0.01)
        return time.monotonic() - start

    # the thread let go of the pipeline at the next check: a step or a text-encoder layer
    assert asyncio.run(cancel_the_task()) < 3 * step + 0.5


# -- errors that refresh the worker -------------------------------------------------------------------


def sdk_envelope(worker: Worker, payload: dict) -> dict:
    """What the SDK sends to the platform for this job (rp_job.run_job)."""
    from runpod.serverless.modules.rp_job import run_job

    return asyncio.run(run_job(make_handler(worker), {"id": "r1", "input": payload}))


def test_cuda_oom_is_reported_with_settings_that_fit_and_refreshes(monkeypatch):
    worker = worker_with()
    suggestion = {"cpu_offload": "enable", "num_blocks_on_gpu": 12, "use_pin_memory": True}

    def out_of_memory(*args, **kwargs):
        raise GPUOutOfMemoryError("CUDA ran out of GPU memory during sampling", suggestion)

    monkeypatch.setattr(worker.pipe, "edit", out_of_memory)
    envelope = sdk_envelope(worker, valid_input())
    assert envelope["stopPod"] is True
    error = error_of(envelope)
    assert error["code"] == "CUDA_OOM" and error["suggestion"] == suggestion and error["retryable"]


def test_a_fatal_cuda_error_refreshes_and_the_worker_takes_no_more_jobs(monkeypatch):
    worker = worker_with()

    def illegal_access(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(worker.pipe, "edit", illegal_access)
    for _ in range(2):
        envelope = sdk_envelope(worker, valid_input())
        assert envelope["stopPod"] is True and error_of(envelope)["code"] == "CUDA_ERROR"


def test_an_unexpected_error_is_internal_and_the_worker_goes_on(monkeypatch, client, worker):
    def broken(*args, **kwargs):
        raise KeyError("surprise")

    with monkeypatch.context() as patch:
        patch.setattr(worker.pipe, "edit", broken)
        error = error_of(runsync(client, valid_input()))
    assert error["code"] == "INTERNAL" and "KeyError" in error["message"]
    assert runsync(client, valid_input(**CHEAP))["status"] == "COMPLETED"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_no_cuda_gpu_after_waiting_is_reported_and_refreshes():
    settings = TMP / "cuda.yaml"
    settings.write_text("device: cuda\n")
    worker = Worker(
        WorkerConfig(demo=True, demo_cache=str(DEMO_CACHE), settings=str(settings), cuda_wait=0.5)
    )
    envelope = sdk_envelope(worker, valid_input())
    assert envelope["stopPod"] is True and error_of(envelope)["code"] == "CUDA_UNAVAILABLE"


def test_configuration_errors_are_reported_per_job(monkeypatch):
    worker = Worker(WorkerConfig(settings=str(TMP / "missing.yaml")))
    error = error_of(sdk_envelope(worker, valid_input()))
    assert error["code"] == "CONFIG_ERROR" and "missing.yaml" in error["message"]
    assert str(TMP) not in error["message"]  # the operator's paths are in the log, not the response
    import runners.worker.handler as module

    monkeypatch.setattr(module, "_worker", None)
    monkeypatch.setenv("QWEN_EDIT_JOB_TIMEOUT", "soon")
    error = error_of(asyncio.run(module.handler({"id": "e1", "input": valid_input()})))
    assert error["code"] == "CONFIG_ERROR" and "QWEN_EDIT_JOB_TIMEOUT" in error["message"]


# -- the bad-input suite -------------------------------------------------------------------------------

TRUNCATED_PNG = b64(encode(picture(64, 64))[:400])
BAD_INPUTS = [
    # wrong types
    ({"prompt": 5}, "INVALID_INPUT", "prompt"),
    ({"steps": "4"}, "INVALID_INPUT", "steps"),
    ({"steps": 4.5}, "INVALID_INPUT", "steps"),
    ({"cfg": "high"}, "INVALID_INPUT", "cfg"),
    ({"seed": "abc"}, "INVALID_INPUT", "seed"),
    ({"seed": True}, "INVALID_INPUT", "seed"),
    ({"batch_size": [1]}, "INVALID_INPUT", "batch_size"),
    ({"use_pin_memory": "yes"}, "INVALID_INPUT", "use_pin_memory"),
    ({"lora_name": 5}, "INVALID_INPUT", "lora_name"),
    ({"image_base64": None, "images": "a.png"}, "INVALID_INPUT", "images"),
    ({"image_base64": 123}, "INVALID_INPUT", "image_base64"),
    ({"storage": "s3://bucket"}, "INVALID_INPUT", "storage"),
    ({"promt": "typo"}, "INVALID_INPUT", "promt"),
    ({"prompt": None}, "INVALID_INPUT", "prompt"),
    # out of range
    ({"steps": 0}, "INVALID_INPUT", "steps"),
    ({"steps": 1000}, "INVALID_INPUT", "steps"),
    ({"cfg": -1}, "INVALID_INPUT", "cfg"),
    ({"denoise": 0}, "INVALID_INPUT", "denoise"),
    ({"denoise": 1.5}, "INVALID_INPUT", "denoise"),
    ({"shift": -1}, "INVALID_INPUT", "shift"),
    ({"shift": 0}, "INVALID_INPUT", "shift"),
    ({"seed": -2}, "INVALID_INPUT", "seed"),
    ({"seed": 2**64}, "INVALID_INPUT", "seed"),
    ({"batch_size": 9}, "INVALID_INPUT", "batch_size"),
    ({"sampler_name": "dpm_fast"}, "INVALID_INPUT", "sampler_name"),
    ({"scheduler": "linear"}, "INVALID_INPUT", "scheduler"),
    ({"cpu_offload": "sometimes"}, "INVALID_INPUT", "cpu_offload"),
    ({"num_blocks_on_gpu": -1}, "INVALID_INPUT", "num_blocks_on_gpu"),
    ({"lora_name": [{"name": "a.safetensors", "strength": 1000}]}, "INVALID_INPUT", "lora_name[0].strength"),
    ({"timeout": 0}, "INVALID_INPUT", "timeout"),
    ({"timeout": -5}, "INVALID_INPUT", "timeout"),
    ({"timeout": 10**7}, "INVALID_INPUT", "timeout"),
    ({"prompt": "x" * 20_001}, "INVALID_INPUT", "prompt"),
    # sizes
    ({"width": 100_000}, "INVALID_INPUT", "width"),
    ({"width": 63}, "INVALID_INPUT", "width"),
    ({"height": None}, "INVALID_INPUT", "height"),
    ({"image_base64": b64(png_header_only(20_000, 20_000))}, "IMAGE_TOO_LARGE", "image_base64"),
    ({"image_base64": b64(decompression_bomb())}, "IMAGE_TOO_LARGE", "image_base64"),
    # images that are not (whole) images
    ({"image_base64": "%%%not-base64%%%"}, "INVALID_IMAGE", "image_base64"),
    ({"image_base64": "data:text/html;base64,PGgxPmhpPC9oMT4="}, "INVALID_IMAGE", "image_base64"),
    ({"image_base64": TRUNCATED_PNG}, "INVALID_IMAGE", "image_base64"),
    ({"image_base64": None, "image_name": TRUNCATED_PNG * 2}, "INVALID_IMAGE", "image_name"),
    ({"image_base64": b64(encode(picture(64, 64), "JPEG")[:300])}, "INVALID_IMAGE", "image_base64"),
    ({"image_base64": b64(b"just some text, long enough to be a file")}, "INVALID_IMAGE", "image_base64"),
    ({"image_base64": None, "image_name": "A" * 300 + "!"}, "INVALID_INPUT", "image_name"),
    # path traversal in every name field
    ({"image_base64": None, "image_name": "../../etc/passwd"}, "UNSAFE_NAME", "image_name"),
    ({"image_base64": None, "image_name": "escape.png"}, "UNSAFE_NAME", "image_name"),
    ({"image_base64": None, "images": [{"image_name": "/etc/hosts"}]}, "UNSAFE_NAME", "images[0].image_name"),
    ({"model_name": "../../../etc/passwd"}, "UNSAFE_NAME", "model_name"),
    ({"model_name": "escape.safetensors"}, "UNSAFE_NAME", "model_name"),
    ({"clip_name": "/etc/passwd"}, "UNSAFE_NAME", "clip_name"),
    ({"vae_name": "sub/../../vae.safetensors"}, "UNSAFE_NAME", "vae_name"),
    ({"lora_name": "../loras/x.safetensors"}, "UNSAFE_NAME", "lora_name"),
    ({"lora_name": [{"name": "~/.ssh/id_rsa"}]}, "UNSAFE_NAME", "lora_name[0]"),
    ({"image_base64": None, "image_object_key": "../other/x.png"}, "UNSAFE_NAME", "image_object_key"),
    # URLs
    ({"image_base64": None, "image_url": "http://127.0.0.2:9/a.png"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "http://[::1]:9/a.png"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "http://10.0.0.1/a.png"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "http://172.16.5.4/a.png"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "http://192.168.0.10/a.png"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "http://169.254.169.254/latest/"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "http://100.64.1.1/a.png"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "http://0.0.0.0:9/a.png"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "REDIRECT:/to-metadata"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "REDIRECT:/to-loopback"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "REDIRECT:/to-private"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "REDIRECT:/to-file"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "file:///etc/passwd"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "ftp://127.0.0.1/a.png"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "image_url": "gopher://127.0.0.1:70/_x"}, "URL_NOT_ALLOWED", "image_url"),
    ({"image_base64": None, "images": ["file:///etc/passwd"]}, "URL_NOT_ALLOWED", "images[0]"),
    # missing, doubled or absent things
    ({"image_base64": None}, "INVALID_INPUT", "images"),
    ({"image_url": "https://example.com/a.png"}, "INVALID_INPUT", "image_url"),
    ({"images": ["a.png", "b.png", "c.png"]}, "INVALID_INPUT", "images"),
    ({"model_name": "missing.safetensors"}, "MODEL_NOT_FOUND", "model_name"),
    ({"lora_name": "missing.safetensors"}, "MODEL_NOT_FOUND", "lora_name"),
    ({"image_base64": None, "image_name": "missing.png"}, "IMAGE_NOT_FOUND", "image_name"),
    ({"image_base64": None, "image_object_key": "in/a.png"}, "STORAGE_NOT_CONFIGURED", "image_object_key"),
    ({"storage": {"bucket": "someone-elses"}}, "INVALID_INPUT", "storage.endpoint_url"),
    ({"storage": {"endpoint_url": "http://169.254.169.254", "bucket": "b", "access_key_id": "a",
                  "secret_access_key": "s"}}, "URL_NOT_ALLOWED", "storage.endpoint_url"),
    ({"storage": {"upload": "yes"}}, "INVALID_INPUT", "storage.upload"),
]  # fmt: skip


def test_the_suite_is_big_enough():
    assert len(BAD_INPUTS) >= 40


@pytest.mark.parametrize(
    "changes, code, field", BAD_INPUTS, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_INPUTS)]
)
def test_bad_input_gets_a_clear_error_and_the_worker_serves_the_next_job(
    client, http, escapes, changes, code, field
):
    changes = dict(changes)
    if str(changes.get("image_url", "")).startswith("REDIRECT:"):
        changes["image_url"] = http.url(changes["image_url"].split(":", 1)[1])
    body = runsync(client, valid_input(**changes))  # a None removes the field
    error = error_of(body)
    assert (error["code"], error["field"]) == (code, field), error
    assert error["code"] in ERROR_CODES and error["message"] and error["fix"]
    assert "Traceback" not in body["error"]
    assert runsync(client, valid_input(**CHEAP))["status"] == "COMPLETED"
