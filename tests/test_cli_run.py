"""`qwen-edit run WORKFLOW.json`: a ComfyUI workflow through the CLI, in process, on the demo model
(and once in a real process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from test_workflow import PICTURES, seed_api, write_lora

from qwen_edit import QwenEditPipeline
from qwen_edit.testing.demo import demo_settings
from runners.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory, qwen_edit_cache):
    """The demo's folder (its model files, copied from the session's, and a LoRA in loras/ as the seed
    graph names it: a folder of its own, since the LoRA is written into it)."""
    from qwen_edit.testing.demo import DEMO_VERSION

    cache = tmp_path_factory.mktemp("cli-run") / "demo"
    shutil.copytree(qwen_edit_cache / "qwen-edit" / f"demo-v{DEMO_VERSION}", cache)
    settings = demo_settings(cache)
    write_lora(settings.folders.resolve("diffusion_models", "svdq-int4_r16-demo.safetensors").parent
               / "loras" / "a.safetensors", 1)  # fmt: skip
    return cache


def run(args: list[str], capsys) -> tuple[int, list[dict]]:
    code = main([*args, "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return code, lines


def workflow_file(tmp_path, graph: dict) -> str:
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(graph))
    return str(path)


def test_run_writes_what_the_library_gives_comfyui_named_and_never_overwrites(demo, tmp_path, capsys):
    picture = tmp_path / "in.png"
    PICTURES["pic1.png"].save(picture)
    workflow = workflow_file(tmp_path, seed_api(1))
    args = ["run", workflow, "--demo", "--cache-dir", str(demo), "--image", f"pic1.png={picture}",
            "-o", str(tmp_path / "out"), "--set", "40.seed=11"]  # fmt: skip
    code, lines = run(args, capsys)
    assert code == 0, lines[-1]
    envelope = lines[-1]
    assert envelope["ok"] and envelope["data"]["seed"] == 11
    first = tmp_path / "out" / "ComfyUI_00001_.png"
    assert envelope["data"]["outputs"] == [str(first)]
    assert [e["step"] for e in lines if e.get("type") == "progress"] == [1, 2]

    pipe = QwenEditPipeline.from_workflow(seed_api(1), demo_settings(demo))
    expected = pipe.run_workflow(seed_api(1), {"pic1.png": picture}, {"40.seed": 11})
    assert first.read_bytes() == expected.png_bytes(0)
    assert Image.open(first).size == (64, 48)

    assert run(args, capsys)[0] == 0  # again: SaveImage's counter moves on
    assert (tmp_path / "out" / "ComfyUI_00002_.png").read_bytes() == first.read_bytes()


def test_refusals_before_loading_name_the_node(demo, tmp_path, capsys):
    graph = seed_api(1)
    graph["70"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "x.pth"}}
    code, lines = run(["run", workflow_file(tmp_path, graph), "--demo", "--dry-run"], capsys)
    assert code == 2
    error = lines[-1]["error"]
    assert error["code"] == "bad_workflow" and "70" in error["message"]
    assert "UpscaleModelLoader" in error["message"]

    code, lines = run(
        ["run", workflow_file(tmp_path, seed_api(1)), "--set", "40.seed=many", "--dry-run"], capsys
    )
    assert code == 2 and "40" in lines[-1]["error"]["message"]

    missing = ["run", workflow_file(tmp_path, seed_api(1)), "--input-dir", str(tmp_path), "--dry-run"]
    code, lines = run(missing, capsys)
    assert code == 2 and "pic1.png" in lines[-1]["error"]["message"]

    shutil.copy(tmp_path / "workflow.json", tmp_path / "copy.json")
    code, lines = run(["run", str(tmp_path / "copy.json"), "--image", "pic1.png", "--dry-run"], capsys)
    assert code == 2 and "NAME=PATH" in lines[-1]["error"]["message"]


def test_the_model_files_are_checked_before_loading(demo, tmp_path, capsys):
    """--dry-run (and a run, before it loads) finds the loaders' files and reads their headers."""
    picture = tmp_path / "in.png"
    PICTURES["pic1.png"].save(picture)
    workflow = workflow_file(tmp_path, seed_api(1))
    (tmp_path / "empty").mkdir()
    empty = str(tmp_path / "empty")
    args = ["run", workflow, "--image", f"pic1.png={picture}", "--models-dir", empty, "--dry-run"]
    code, lines = run(args, capsys)
    assert code == 3 and lines[-1]["error"]["code"] == "model_not_found"

    broken = tmp_path / "broken"
    shutil.copytree(demo, broken)
    (broken / "qwen_image_vae_demo.safetensors").write_text("not a VAE\n")
    for dry_run in (["--dry-run"], []):
        args = ["run", workflow, "--demo", "--cache-dir", str(broken), "--image", f"pic1.png={picture}"]
        code, lines = run([*args, "-o", str(tmp_path / "out"), *dry_run], capsys)
        error = lines[-1]["error"]
        assert code == 3 and (error["code"], error["details"]["field"]) == ("model_invalid", "vae")
        assert not [e for e in lines if e.get("type") == "loading"] and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_run_in_a_real_process(demo, tmp_path, subprocess_timeout):
    from twins import cli_command

    picture = tmp_path / "in.png"
    PICTURES["pic1.png"].save(picture)
    args = ["run", workflow_file(tmp_path, seed_api(1)), "--demo", "--cache-dir", str(demo),
            "--image", f"pic1.png={picture}", "--dry-run", "--json"]  # fmt: skip
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([*cli_command(), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=subprocess_timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    envelope = json.loads(proc.stdout.splitlines()[-1])
    assert envelope["ok"] and envelope["data"]["dry_run"] and envelope["command"] == "run"
