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

import pytest
from test_worker_support import DEMO_CACHE, REPO, TMP, LoopbackHTTP, demo_worker, encode, moto_s3, picture

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
