"""The handler as RunPod runs it: `python -m runners.worker` in the SDK's own local test mode.

Each test starts the worker process the way the container does (the handler as the entry point), on
the demo model, with every network target on 127.0.0.1: moto's S3 server for the object-key input
and the upload, and a loopback HTTP server standing in for the platform's job-done URL, where the
SDK's per-step progress updates arrive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from test_worker_support import (
    DEMO_CACHE,
    REPO,
    TMP,
    LoopbackHTTP,
    StalledServer,
    demo_worker,
    encode,
    free_port,
    moto_s3,
    picture,
    valid_input,
)

from qwen_edit.testing.demo import DEMO_VERSION

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env():
    """The worker's environment: demo mode, reusing the demo files this test process wrote."""
    demo_worker()  # writes the demo files once
    cache = TMP / "sdk-cache"
    link = cache / "qwen-edit" / f"demo-v{DEMO_VERSION}"  # where the library looks under QWEN_EDIT_CACHE
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(DEMO_CACHE, link)
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "TMPDIR", "VIRTUAL_ENV")
    out = {k: v for k, v in os.environ.items() if k in keep}
    out.update(QWEN_EDIT_DEMO="1", QWEN_EDIT_CACHE=str(cache), QWEN_EDIT_INPUT_DIRS=str(TMP / "input"))
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), out.get("PYTHONPATH")]))
    return out


def run_worker(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runners.worker", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_the_shipped_test_input_passes_the_sdk_test_mode(env):
    payload = json.loads((REPO / "test_input.json").read_text())
    assert payload["input"]["prompt"] and payload["input"]["image_base64"].startswith(
        "data:image/png;base64,"
    )
    done = run_worker(env)  # no flag: the SDK reads ./test_input.json
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Using test_input.json as job input" in done.stdout + done.stderr
    assert "completed successfully" in done.stdout + done.stderr


def test_object_key_in_upload_out_and_progress_through_the_sdk(env):
    with moto_s3("volume-1") as (endpoint, s3), LoopbackHTTP() as platform:
        s3.put_object(Bucket="volume-1", Key="inputs/photo.png", Body=encode(picture(80, 64, seed=4)))
        job_env = dict(env)
        job_env.update(
            RUNPOD_STORAGE_ENDPOINT=endpoint,
            RUNPOD_STORAGE_BUCKET="volume-1",
            RUNPOD_STORAGE_ACCESS_KEY_ID="user_test",
            RUNPOD_STORAGE_SECRET_ACCESS_KEY="rps_test",
            RUNPOD_STORAGE_OUTPUT_PREFIX="edits/",
            RUNPOD_WEBHOOK_POST_OUTPUT=platform.url("/job-done?id=$ID"),
        )
        job = {
            "id": "sdk-job-1",
            "input": {
                "image_object_key": "inputs/photo.png",
                "prompt": "make it blue",
                "seed": 5,
                "steps": 4,
                "width": 64,
                "height": 64,
            },
        }
        done = run_worker(job_env, "--test_input", json.dumps(job))
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-4000:]
        stored = s3.get_object(Bucket="volume-1", Key="edits/sdk-job-1/0.png")["Body"].read()
        assert stored.startswith(b"\x89PNG")
        updates = [
            json.loads(body) for path, body in platform.posts if path.startswith("/job-done?id=sdk-job-1")
        ]
    steps = [u["output"] for u in updates if u["output"].get("stage") == "sampling"]
    assert steps and all(u["status"] == "IN_PROGRESS" for u in updates)
    assert all(s["total"] == 4 and 1 <= s["step"] <= 4 and s["percent"] == 25 * s["step"] for s in steps)
    assert "'object_key': 'edits/sdk-job-1/0.png'" in log and "'base64'" not in log


def test_a_bad_job_fails_the_sdk_test_mode_with_a_structured_error(env):
    job = {"input": {"image_url": "file:///etc/passwd", "prompt": "x", "steps": 0}}
    done = run_worker(env, "--test_input", json.dumps(job))
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]
    line = next(line for line in log.splitlines() if "failed with error:" in line)
    error = json.loads(line.split("failed with error:", 1)[1])
    assert error["code"] == "URL_NOT_ALLOWED" and error["field"] == "image_url"
    assert [e["field"] for e in error["errors"]] == ["image_url", "steps"]
    assert "Traceback" not in log


@contextmanager
def api_server(env: dict):
    """`python -m runners.worker --rp_serve_api`: the SDK's local API server in its own process; yields
    its base URL once it answers."""
    import httpx

    port = free_port()
    args = ["--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)]
    log = open(TMP / f"api-{port}.log", "w+")  # noqa: SIM115 (closed below, read on failure)
    process = subprocess.Popen(
        [sys.executable, "-m", "runners.worker", *args], cwd=REPO, env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        while True:
            assert process.poll() is None, log.seek(0) or log.read()[-3000:]
            try:
                httpx.get(f"{url}/docs", timeout=2)  # any answer: the server is up
                break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - start < 180, "the API server did not start"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_a_10_mb_negative_prompt_and_a_stalled_store_through_the_sdk_api_server(env):
    """The two jobs that used to stop the worker, sent over HTTP to the SDK's own server: the prompt is
    refused before any work and the next job is answered; with a store that accepts and never answers,
    the job returns within its deadline with its images inline, saying so."""
    import httpx

    with StalledServer() as store:
        server_env = dict(env)
        server_env.update(
            RUNPOD_STORAGE_ENDPOINT=store.url,
            RUNPOD_STORAGE_BUCKET="volume-1",
            RUNPOD_STORAGE_ACCESS_KEY_ID="user_test",
            RUNPOD_STORAGE_SECRET_ACCESS_KEY="rps_test",
        )
        with api_server(server_env) as url, httpx.Client(base_url=url, timeout=300) as http:

            def runsync(payload: dict) -> tuple[dict, float]:
                start = time.monotonic()
                body = http.post("/runsync", json={"input": payload}).json()
                return body, time.monotonic() - start

            # This machine's pace, without the store: the deadline below is derived from it.
            paces = [runsync(valid_input(steps=4, storage={"upload": False}))[0] for _ in range(2)]
            assert all(b["status"] == "COMPLETED" for b in paces), paces
            job = max(b["output"]["timings"]["total"] for b in paces)
            step = max(max(b["output"]["timings"]["steps"]) for b in paces)

            body, refused = runsync(valid_input(negative_prompt="x" * 10_000_000, cfg=2.0, timeout=10))
            error = json.loads(body["error"])
            assert (error["code"], error["field"], error["retryable"]) == (
                "INVALID_INPUT", "negative_prompt", False
            )  # fmt: skip
            assert len(body["error"]) < 32_000
            assert refused < job + 2.0, (refused, job)  # 10 MB over HTTP, refused before the model runs
            body, _ = runsync(valid_input(steps=1, width=32, height=32, storage={"upload": False}))
            assert body["status"] == "COMPLETED", body

            timeout = 3 * job + 2 * step + 1.0
            body, elapsed = runsync(valid_input(timeout=timeout))
            assert store.accepted  # the upload reached the store, which never answered
    assert body["status"] == "COMPLETED", body
    entry = body["output"]["images"][0]
    assert entry["delivery"] == "inline" and "deadline" in entry["upload_error"] and entry["base64"]
    assert body["output"]["timings"]["total"] <= timeout + 0.5
    assert elapsed < timeout + job + 2.0, (elapsed, timeout)  # botocore alone would wait 3 x 30 s
    print(f"pace {job:.2f} s/job; 10 MB prompt refused in {refused:.2f} s; stalled store: "
          f"timeout {timeout:.2f} s, answered in {elapsed:.2f} s")  # fmt: skip
