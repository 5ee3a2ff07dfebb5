"""The `qwen-edit` command, run as a real subprocess on the tiny demo model (CPU).

Each test runs the installed console script when it points at runners.cli (else `python -m
runners.cli`) in a temporary directory and checks what a user or a script sees: the PNGs and the
parameters embedded in them, the NDJSON stream of `--json` (events, one final envelope), the exit codes
(0 ok, 2 usage or bad input, 3 missing model, 4 environment) and the error messages. Everything that
can fail before the models load is checked before they load, so those cases take a couple of seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from twins import cli_command

from qwen_edit.conditioning import read_png_parameters

REPO = Path(__file__).resolve().parents[1]
T4 = "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors"
T8 = "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-8steps.safetensors"
TE = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
VAE = "qwen_image_vae.safetensors"


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """QWEN_EDIT_CACHE for every subprocess: the first one writes the demo files, the others reuse them."""
    return tmp_path_factory.mktemp("qwen-edit-cache")


@pytest.fixture
def run(cache_root, tmp_path):
    def run(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "QWEN_EDIT_"))}
        env.update(
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            QWEN_EDIT_CACHE=str(cache_root),
            HF_HUB_OFFLINE="1",
            HF_HOME=str(tmp_path / "hf"),
        )
        return subprocess.run(
            [*cli_command(), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
        )

    return run


@pytest.fixture
def pictures(tmp_path) -> tuple[str, str]:
    Image.new("RGB", (96, 64), (200, 40, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64), (20, 40, 200)).save(tmp_path / "b.png")
    return "a.png", "b.png"


def ndjson(stdout: str) -> list[dict]:
    """The stream contract: every line JSON with schema and type, exactly one envelope, last."""
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines, "no output"
    for line in lines[:-1]:
        assert line["schema"] == "event/1" and isinstance(line["type"], str)
    assert lines[-1]["schema"] == "envelope/1" and lines[-1]["type"] == "envelope"
    assert {"ok", "command", "version", "data", "error"} <= set(lines[-1])
    return lines


def png_parameters(path: Path) -> dict:
    return read_png_parameters(path.read_bytes())


def test_edit_writes_pngs_with_the_parameters(run, pictures, tmp_path):
    proc = run(
        "edit",
        *pictures,
        "-p",
        "make it blue",
        "-n",
        "blurry",
        "--seed",
        "1",
        "2",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "48",
        "--sampler",
        "heun",
        "--demo",
        "--out",
        "out/e_{seed}.png",
    )
    assert proc.returncode == 0, proc.stderr
    for seed in (1, 2):
        path = tmp_path / f"out/e_{seed}.png"
        assert f"saved out/e_{seed}.png" in proc.stdout
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 48)
        params = png_parameters(path)
        assert params["prompt"] == "make it blue" and params["negative_prompt"] == "blurry"
        assert (params["seed"], params["steps"], params["sampler_name"]) == (seed, 2, "heun")
        assert (params["width"], params["height"], params["size"]) == (64, 48, [64, 48])
    assert not proc.stdout.lstrip().startswith("{")  # people get text, not JSON


def test_edit_json_batch_file_loads_the_models_once(run, pictures, tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(
        "\n".join(
            [
                "# a comment, then a blank line",
                "",
                "turn it green",
                json.dumps(
                    {
                        "prompt": "two pictures",
                        "images": ["b.png", "a.png"],
                        "seed": 7,
                        "steps": 1,
                        "batch_size": 2,
                        "out": "batch/{job}_{index}.png",
                    }
                ),
                json.dumps({"seed": [3, 4], "cfg": 2.0, "negative_prompt": "noise"}),
            ]
        )
    )
    proc = run(
        "edit",
        "a.png",
        "-p",
        "default prompt",
        "--demo",
        "--batch-file",
        "jobs.txt",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--seed",
        "11",
        "--out",
        "out/{job}.png",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    lines = ndjson(proc.stdout)
    types = [e["type"] for e in lines]
    assert types[0] == "plan" and types.count("loading") == 1 and types.count("loaded") == 1
    assert types.index("loaded") < types.index("job_start")
    plan = lines[0]["jobs"]
    assert [j["source"] for j in plan] == ["jobs.txt:3", "jobs.txt:4", "jobs.txt:5", "jobs.txt:5"]
    assert [j["parameters"]["seed"] for j in plan] == [11, 7, 3, 4]
    assert [j["parameters"]["prompt"] for j in plan] == [
        "turn it green",
        "two pictures",
        *["default prompt"] * 2,
    ]
    for job, total in enumerate([2, 1, 2, 2]):
        steps = [(e["step"], e["total"]) for e in lines if e["type"] == "progress" and e["job"] == job]
        assert steps == [(s, total) for s in range(1, total + 1)]
    envelope = lines[-1]
    assert envelope["ok"] and envelope["command"] == "edit" and envelope["error"] is None
    outputs = envelope["data"]["outputs"]
    assert outputs == ["out/0.png", "batch/1_0.png", "batch/1_1.png", "out/2.png", "out/3.png"]
    assert [e["path"] for e in lines if e["type"] == "output"] == outputs
    assert all((tmp_path / p).is_file() for p in outputs)
    second = png_parameters(tmp_path / "batch/1_1.png")
    assert (second["seed"], second["batch_index"], second["batch_size"], second["steps"]) == (7, 1, 2, 1)
    third = png_parameters(tmp_path / "out/2.png")
    assert (third["seed"], third["cfg"], third["negative_prompt"]) == (3, 2.0, "noise")
    assert [j["ok"] for j in envelope["data"]["jobs"]] == [True] * 4


@pytest.mark.parametrize(
    ("args", "code", "error", "field"),
    [
        (["--sampler", "foo"], 2, "bad_parameter", "sampler_name"),
        (["--width", "100", "--height", "100"], 2, "bad_parameter", "width"),
        (["--width", "64"], 2, "bad_parameter", "height"),
        (["--models-dir", "empty-models"], 3, "model_not_found", None),
        (["--bogus-flag"], 2, "usage", None),
        (["--config", "missing.yaml"], 2, "config_not_found", None),
    ],
    ids=["unknown-sampler", "bad-size", "half-a-size", "missing-model", "unknown-flag", "missing-config"],
)
def test_edit_errors_before_loading(run, pictures, tmp_path, args, code, error, field):
    (tmp_path / "empty-models").mkdir()
    proc = run("edit", "a.png", "-p", "x", *args, "--json")
    assert proc.returncode == code, proc.stderr
    lines = ndjson(proc.stdout)
    assert [e["type"] for e in lines if e["type"] in ("loading", "loaded")] == []  # nothing was loaded
    envelope = lines[-1]
    assert envelope["ok"] is False and envelope["error"]["code"] == error
    assert envelope["error"]["exit_code"] == code
    if field:
        assert envelope["error"]["details"]["field"] == field
    if error == "bad_parameter" and field == "sampler_name":
        assert "euler" in envelope["error"]["message"]  # the allowed values are named
    if error == "bad_parameter" and field == "width":
        assert "multiple of 16" in envelope["error"]["message"]
    if error == "model_not_found":
        assert "qwen-edit download --models-dir empty-models" in envelope["error"]["fix"]


def test_edit_error_messages_for_people(run, pictures, tmp_path):
    (tmp_path / "empty-models").mkdir()
    missing = run("edit", "a.png", "-p", "x", "--models-dir", "empty-models")
    assert missing.returncode == 3 and missing.stdout == ""
    assert "error: " in missing.stderr and "svdq-int4_r128" in missing.stderr
    assert "fix: qwen-edit download" in missing.stderr

    no_image = run("edit", "nope.png", "-p", "x", "--demo")
    assert no_image.returncode == 2 and "no such file: nope.png" in no_image.stderr

    (tmp_path / "jobs.txt").write_text('make it red\n{"prompt": "x", "colour": "red"}\n')
    bad_line = run("edit", "a.png", "--demo", "--batch-file", "jobs.txt")
    assert bad_line.returncode == 2 and "jobs.txt:2: unknown key 'colour'" in bad_line.stderr


def _models_dir(root: Path, cache_root: Path) -> Path:
    """A ComfyUI models/ folder holding files under the real names (tiny stand-ins)."""
    from safetensors.torch import save_file

    from qwen_edit.testing.demo import DEMO_VERSION

    demo = cache_root / "qwen-edit" / f"demo-v{DEMO_VERSION}"
    if not (demo / "svdq-int4_r16-demo.safetensors").is_file():  # this test ran first
        from qwen_edit.testing.transformer import write_tiny_transformer

        demo.mkdir(parents=True, exist_ok=True)
        write_tiny_transformer(demo / "svdq-int4_r16-demo.safetensors", precision="int4", rank=16)
    for sub in ("diffusion_models", "text_encoders/qwen25_tokenizer", "vae", "loras"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(demo / "svdq-int4_r16-demo.safetensors", root / "diffusion_models" / T4)
    shutil.copy(demo / "svdq-int4_r16-demo.safetensors", root / "diffusion_models" / T8)
    save_file({"scaled_fp8": torch.zeros(0)}, str(root / "text_encoders" / TE))
    save_file({"conv1.weight": torch.zeros(4, 4)}, str(root / "vae" / VAE))
    for name in ("vocab.json", "merges.txt"):
        (root / "text_encoders/qwen25_tokenizer" / name).write_text("{}")
    (root / "loras/style.safetensors").write_bytes(b"")
    return root


def test_edit_dry_run_resolves_models_and_presets(run, pictures, tmp_path, cache_root):
    models = _models_dir(tmp_path / "models", cache_root)
    proc = run(
        "edit",
        "a.png",
        "-p",
        "x",
        "--models-dir",
        "models",
        "--lora",
        "style.safetensors:0.7",
        "--config",
        str(REPO / "configs/lightning-8step.yaml"),
        "--dry-run",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    lines = ndjson(proc.stdout)
    data = lines[-1]["data"]
    assert data["dry_run"] and data["models"]["transformer"] == str(
        (models / "diffusion_models" / T8).resolve()
    )
    assert data["models"]["vae"] == str((models / "vae" / VAE).resolve())
    assert data["models"]["loras"] == [[str((models / "loras/style.safetensors").resolve()), 0.7]]
    assert data["jobs"][0]["parameters"]["steps"] == 8  # the preset's generation defaults

    missing_lora = run(
        "edit", "a.png", "-p", "x", "--models-dir", "models", "--lora", "nope.safetensors", "--dry-run"
    )
    assert missing_lora.returncode == 3 and "nope.safetensors" in missing_lora.stderr


def test_demo_command(run, tmp_path):
    proc = run("demo")  # the README's "run it" command
    assert proc.returncode == 0, proc.stderr
    assert "saved qwen-edit-demo.png" in proc.stdout and "random weights" in proc.stderr
    params = png_parameters(tmp_path / "qwen-edit-demo.png")
    assert params["prompt"] and params["seed"] == 0 and params["steps"] == 4

    as_json = run("demo", "--json", "--out", "d/{seed}.png", "--seed", "5", "--steps", "2")
    assert as_json.returncode == 0, as_json.stderr
    lines = ndjson(as_json.stdout)
    assert [e["type"] for e in lines if e["type"] != "progress"] == [
        "plan",
        "loading",
        "loaded",
        "job_start",
        "output",
        "job_done",
        "envelope",
    ]
    assert [e["step"] for e in lines if e["type"] == "progress"] == [1, 2]
    data = lines[-1]["data"]
    assert data["outputs"] == ["d/5.png"] and data["model"]["backend"] == "portable"
    assert png_parameters(tmp_path / "d/5.png")["seed"] == 5


def test_doctor(run, tmp_path, cache_root):
    gpu = torch.cuda.is_available()
    (tmp_path / "empty").mkdir()
    proc = run("doctor", "--models-dir", "empty", "--json")
    lines = ndjson(proc.stdout)
    checks = {e["name"]: e for e in lines if e["type"] == "check"}
    assert set(checks) >= {
        "python",
        "torch",
        "gpu",
        "nunchaku",
        "models",
        "disk",
        "backend",
        "offload",
        "memory",
        "locations",
    }
    envelope = lines[-1]
    assert envelope["ok"] is False and envelope["data"]["ready"] is False
    assert envelope["error"]["code"] == "not_ready" and "NOT READY" in envelope["data"]["verdict"]
    assert (
        checks["models"]["status"] == "error" and "qwen-edit download --models-dir" in checks["models"]["fix"]
    )
    assert "/runpod-volume" in json.dumps(checks["locations"]) and "/workspace" in json.dumps(
        checks["locations"]
    )
    if gpu:
        assert checks["gpu"]["status"] in ("ok", "warn") and proc.returncode in (3, 4)
    else:  # this machine: the GPU is the first thing to fix, and the verdict says so
        assert checks["gpu"]["status"] == "error" and checks["gpu"]["fix"]
        assert proc.returncode == 4
        assert checks["backend"]["details"]["backend"] == "portable"

    models = _models_dir(tmp_path / "models", cache_root)
    human = run("doctor", "--models-dir", "models")
    # Ready on a GPU whose setup is right; on this CPU machine the GPU is still missing.
    assert human.returncode in ((0, 4) if gpu else (4,)), human.stdout + human.stderr
    assert "verdict:" in human.stdout
    models_line = next(line for line in human.stdout.splitlines() if "] models" in line)
    assert "[ok" in models_line and T4 in models_line
    backend_line = next(line for line in human.stdout.splitlines() if "] backend" in line)
    assert "int4" in backend_line and T4 in backend_line

    vae = models / "vae" / VAE
    vae.write_bytes(vae.read_bytes()[:-20])  # an interrupted download
    cut = run("doctor", "--models-dir", "models", "--json")
    models_check = next(e for e in ndjson(cut.stdout) if e["type"] == "check" and e["name"] == "models")
    assert models_check["status"] == "error" and "truncated" in models_check["summary"]
    assert cut.returncode in (3, 4)


def test_configs_load_and_layer():
    """configs/: ComfyUI extra_model_paths.yaml sections for RunPod, and generation presets on top."""
    import yaml

    from qwen_edit.paths import KIND_KEYS
    from qwen_edit.settings import load_settings

    comfy_keys = {"base_path", *(key for keys in KIND_KEYS.values() for key in keys)}
    for name, root in (("runpod-serverless.yaml", "/runpod-volume"), ("runpod-pod.yaml", "/workspace")):
        data = yaml.safe_load((REPO / "configs" / name).read_text())
        for section in data["model_paths"].values():
            assert set(section) <= comfy_keys and section["base_path"].startswith(root)
        settings = load_settings(str(REPO / "configs" / name))
        assert all(str(p).startswith(root) for p in settings.folders.folders["vae"])
    pod = str(REPO / "configs/runpod-pod.yaml")
    assert any("/workspace/data/models" in str(p) for p in load_settings(pod).folders.folders["vae"])
    eight = load_settings([pod, str(REPO / "configs/lightning-8step.yaml")])
    assert eight.models["transformer"] == "auto-8steps" and eight.edit_defaults()["steps"] == 8
    four = load_settings(
        [pod, str(REPO / "configs/lightning-8step.yaml"), str(REPO / "configs/lightning-4step.yaml")]
    )
    assert four.models["transformer"] == "auto" and four.edit_defaults()["steps"] == 4


def test_a_failing_job_does_not_stop_the_others(tmp_path, monkeypatch):
    """In-process: the batch runner reports a job that fails at run time and runs the rest."""
    import io

    from qwen_edit.pipeline import EditResult, GPUOutOfMemoryError
    from runners.cli import Job, run_jobs
    from runners.cli.output import Reporter

    class FakePipe:
        lora_specs: tuple = ()

        def edit(self, images, prompt, callback=None, **params):
            if prompt == "too big":
                raise GPUOutOfMemoryError("CUDA ran out of GPU memory", {"cpu_offload": "enable"})
            callback(1, 1, None)
            return EditResult(
                [Image.new("RGB", (16, 16))], params["seed"], {"prompt": prompt}, {"total": 0.1}
            )

    monkeypatch.chdir(tmp_path)
    jobs = [
        Job(i, f"jobs.txt:{i + 1}", ["a.png"], {"prompt": p, "seed": i}, "out.png", [])
        for i, p in enumerate(["fine", "too big", "fine again"])
    ]
    out = io.StringIO()
    results, error = run_jobs(FakePipe(), jobs, Reporter("edit", True, stdout=out))
    assert [r["ok"] for r in results] == [True, False, True]
    assert error.code == "out_of_memory" and error.exit_code == 4
    assert error.details["suggestion"] == {"cpu_offload": "enable"}
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["type"] for e in lines if e["type"] != "progress"] == [
        "job_start",
        "output",
        "job_done",
        "job_start",
        "job_error",
        "job_start",
        "output",
        "job_done",
    ]
    assert [e["path"] for e in lines if e["type"] == "output"] == [
        "out.png",
        "out_job2.png",
    ]  # never overwritten


def test_ctrl_c_is_exit_130_with_an_envelope(monkeypatch, capsys):
    import runners.cli as cli

    def interrupted(args, reporter):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_download", interrupted)
    assert cli.main(["download", "--json"]) == 130
    envelope = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert envelope["error"]["code"] == "cancelled" and envelope["ok"] is False


def test_lora_specs_and_output_names():
    from runners.cli import Job, output_paths, parse_lora

    assert parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora("dir/style.safetensors:0.75") == ("dir/style.safetensors", 0.75)
    assert parse_lora("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
    assert parse_lora(["a.safetensors", 0.5]) == ("a.safetensors", 0.5)
    assert parse_lora({"name": "a.safetensors", "strength": 2}) == ("a.safetensors", 2.0)
    written: set[str] = set()
    job = Job(0, "command line", [], {}, "out/{seed}")
    assert [str(p) for p in output_paths(job, 5, 2, 1, written)] == ["out/5_0.png", "out/5_1.png"]
    job = Job(1, "command line", [], {}, "img_{job}_{index}.webp.png")
    assert [str(p) for p in output_paths(job, 5, 2, 2, written)] == ["img_1_0.webp.png", "img_1_1.webp.png"]
