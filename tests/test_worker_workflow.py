"""The worker answering runpod-workers/worker-comfyui's request: a ComfyUI workflow and named images,
through the RunPod SDK's local API, on the demo model."""

from __future__ import annotations

import base64
import copy
import io

import pytest
from PIL import Image
from test_worker_support import DEMO_CACHE, api_client, b64, demo_worker, encode, error_of, picture, runsync
from test_workflow import seed_api, write_lora

from qwen_edit import QwenEditPipeline
from qwen_edit.testing.demo import demo_settings


@pytest.fixture(scope="module")
def client():
    worker = demo_worker()
    loras = demo_settings(DEMO_CACHE).folders.folders["loras"][0]
    write_lora(loras / "a.safetensors", 1)  # the seed graph's LoRA loader names it
    return api_client(worker)


def request(graph: dict, image=None, **extra) -> dict:
    image = picture(72, 56, seed=1) if image is None else image
    return {"workflow": graph, "images": [{"name": "pic1.png", "image": b64(encode(image))}], **extra}


def test_a_workflow_request_gives_worker_comfyuis_answer_and_the_librarys_image(client):
    body = runsync(client, request(seed_api(1), overrides={"40.seed": 11, "prompt": "make it red"}))
    assert body["status"] == "COMPLETED", body
    out = body["output"]
    [image] = out["images"]
    assert image["filename"] == "ComfyUI_00001_.png" and image["type"] == "base64"
    assert out["seed"] == 11 and out["parameters"]["prompt"] == "make it red"

    pipe = QwenEditPipeline.from_workflow(seed_api(1), demo_settings(DEMO_CACHE))
    expected = pipe.run_workflow(
        seed_api(1), {"pic1.png": picture(72, 56, seed=1)}, {"40.seed": 11, "prompt": "make it red"}
    )
    got = Image.open(io.BytesIO(base64.b64decode(image["data"])))
    assert got.tobytes() == expected.images[0].tobytes()  # the library's pixels
    assert out["parameters"]["loras"] == [["a.safetensors", 0.8]]  # named as the workflow names it


def test_bad_workflows_and_images_are_named_and_the_worker_goes_on(client):
    graph = copy.deepcopy(seed_api(1))
    graph["70"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "x.pth"}}
    error = error_of(runsync(client, request(graph)))
    assert error["code"] == "INVALID_WORKFLOW" and error["field"] == "workflow.70"
    assert "UpscaleModelLoader" in error["message"]

    unsafe = request(seed_api(1))
    unsafe["images"][0]["name"] = "../../etc/passwd"
    assert error_of(runsync(client, unsafe))["field"] == "images[0].name"

    error = error_of(runsync(client, {"workflow": "not json", "images": []}))
    assert error["code"] == "INVALID_INPUT" and error["field"] == "workflow"

    missing = {"workflow": seed_api(1), "images": []}  # pic1.png is in no input folder
    assert error_of(runsync(client, missing))["field"].startswith("workflow.10")

    assert runsync(client, request(seed_api(1)))["status"] == "COMPLETED"
