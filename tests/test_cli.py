"""The `qwen-edit` command as a user meets it, on the tiny demo model (CPU) and PIL-made pictures.

Most tests call `runners.cli.main([...])` in this process (what a subprocess would add is an
interpreter start and the imports, seconds to minutes on a busy machine) and check what a user or a
script sees: the files written and what they embed, the NDJSON stream of `--json` (events, one final
envelope), the exit codes (0 ok, 2 usage or bad input, 3 model files, 4 environment, 130 Ctrl-C) and
the messages. One subprocess test per command (marked slow) runs the real console script. Everything
that can fail before the models load is checked before they load, and the tests say so.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from twins import cli_command

from qwen_edit.conditioning import read_png_parameters
from qwen_edit.params import EditParams
from runners.cli import main

REPO = Path(__file__).resolve().parents[1]
T4 = "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors"
T8 = "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-8steps.safetensors"
TE = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
VAE = "qwen_image_vae.safetensors"
SMALL = ["--steps", "2", "--width", "32", "--height", "32"]  # a demo edit in about a second


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def loaded() -> dict:
    """Pipelines this module has loaded, by what they were loaded from (see `cli`)."""
    return {}


@pytest.fixture
def cli(qwen_edit_cache, tmp_path, monkeypatch, capsys, loaded):
    """`cli(*args)`: the command in this process, in a fresh folder, the session's demo files as its
    cache, no model folder or setting from the environment. A pipeline is loaded once per module for
    the same files and options (the command still goes through its loading step and events): loading
    is most of a demo edit's time, and what the tests check is the command, not the loader."""
    from qwen_edit import QwenEditPipeline

    for key in list(os.environ):
        if key.startswith("QWEN_EDIT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("QWEN_EDIT_CACHE", str(qwen_edit_cache))
    monkeypatch.chdir(tmp_path)
    load = QwenEditPipeline.from_spec

    def from_spec(cls, spec):
        key = repr(spec)
        if key not in loaded:
            loaded[key] = load(spec)
        return loaded[key]

    monkeypatch.setattr(QwenEditPipeline, "from_spec", classmethod(from_spec))

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


@pytest.fixture
def run_subprocess(qwen_edit_cache, tmp_path, subprocess_timeout):
    """The installed console script (else `python -m runners.cli`) in a fresh process."""

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "QWEN_EDIT_"))}
        env.update(
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            QWEN_EDIT_CACHE=str(qwen_edit_cache),
            HF_HUB_OFFLINE="1",
            HF_HOME=str(tmp_path / "hf"),
        )
        return subprocess.run(
            [*cli_command(), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=subprocess_timeout,
        )  # fmt: skip

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


def demo_folder(cache: Path) -> Path:
    from qwen_edit.testing.demo import DEMO_VERSION

    return cache / "qwen-edit" / f"demo-v{DEMO_VERSION}"


def write_lora(path: Path) -> Path:
    """A small LoRA file (a real safetensors file; the header checks read it)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)}, str(path))  # fmt: skip
    return path


def models_dir(root: Path, cache: Path) -> Path:
    """A ComfyUI models/ folder holding the demo's files under the real names."""
    demo = demo_folder(cache)
    for sub in ("diffusion_models", "text_encoders/qwen25_tokenizer", "vae", "loras"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(demo / "svdq-int4_r16-demo.safetensors", root / "diffusion_models" / T4)
    shutil.copy(demo / "svdq-int4_r16-demo.safetensors", root / "diffusion_models" / T8)
    shutil.copy(demo / "qwen_2.5_vl_demo_fp8_scaled.safetensors", root / "text_encoders" / TE)
    shutil.copy(demo / "qwen_image_vae_demo.safetensors", root / "vae" / VAE)
    for name in ("vocab.json", "merges.txt"):
        (root / "text_encoders/qwen25_tokenizer" / name).write_text("{}")
    write_lora(root / "loras/style.safetensors")
    return root


# -- edit: what it writes ------------------------------------------------------------------------


def test_edit_writes_pngs_with_the_parameters_and_what_made_them(cli, pictures, tmp_path):
    proc = cli("edit", *pictures, "-p", "make it blue", "-n", "blurry", "--seed", "1", "2", "--steps", "2",
               "--width", "64", "--height", "48", "--sampler", "heun", "--demo",
               "--out", "out/e_{seed}.png")  # fmt: skip
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
        # What made it: model files by name and short hash (no paths), how they ran, the inputs.
        assert params["models"]["transformer"]["file"] == "svdq-int4_r16-demo.safetensors"
        assert all(len(params["models"][s]["sha256"]) == 12 for s in ("transformer", "text_encoder", "vae"))
        assert (params["backend"], params["compute"], params["device"], params["demo"]) == (
            "portable", "bf16", "cpu", True
        )  # fmt: skip
        assert params["generator"].startswith("qwen-edit ") and params["precision"] == "int4"
        assert params["text_encoder_compute"] == "upcast"  # ComfyUI's numbers, the default
        assert [p["file"] for p in params["images"]] == list(pictures)
        assert len({p["sha256"] for p in params["images"]}) == 2
        assert str(tmp_path) not in json.dumps(params)
    assert not proc.stdout.lstrip().startswith("{")  # people get text, not JSON


def test_the_text_encoder_compute_is_a_flag_the_picture_records_and_from_takes(cli, pictures, tmp_path):
    """--text-encoder-compute fp8 (opt-in; upcast, ComfyUI's numbers, is the default) reaches the encoder,
    is written into the PNG, and `--from` runs it again the same way."""
    made = cli("edit", "a.png", "-p", "make it blue", "--seed", "5", "--demo", *SMALL,
               "--text-encoder-compute", "fp8", "-o", "fp8.png")  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert png_parameters(tmp_path / "fp8.png")["text_encoder_compute"] == "fp8"
    again = cli("edit", "--from", "fp8.png", "-o", "again.png")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "fp8.png").read_bytes()
    upcast = cli("edit", "--from", "fp8.png", "--text-encoder-compute", "upcast", "-o", "upcast.png")
    assert upcast.returncode == 0, upcast.stderr
    assert png_parameters(tmp_path / "upcast.png")["text_encoder_compute"] == "upcast"
    assert (tmp_path / "upcast.png").read_bytes() != (tmp_path / "fp8.png").read_bytes()
    assert "text_encoder_compute (fp8 then, upcast now)" in upcast.stderr
    bad = cli("edit", "a.png", "-p", "x", "--demo", "--text-encoder-compute", "auto", "-o", "bad.png")
    assert bad.returncode == 2 and "--text-encoder-compute" in bad.stderr


def test_edit_from_a_picture_makes_the_same_bytes_again(cli, pictures, tmp_path):
    first = cli("edit", "a.png", "-p", "make it blue", "--seed", "5", "--demo", *SMALL, "-o", "first.png")
    assert first.returncode == 0, first.stderr
    again = cli("edit", "--from", "first.png", "-o", "again.png")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "first.png").read_bytes()
    assert "not the same as what made" not in again.stderr

    # A flag changes what the picture says; the rest still comes from it.
    other = cli("edit", "--from", "first.png", "--seed", "6", "-o", "other.png")
    assert other.returncode == 0, other.stderr
    params = png_parameters(tmp_path / "other.png")
    assert (params["seed"], params["prompt"], params["width"]) == (6, "make it blue", 32)
    assert (tmp_path / "other.png").read_bytes() != (tmp_path / "first.png").read_bytes()

    # A changed input picture: it runs, and says the result will differ.
    Image.new("RGB", (96, 64), (0, 0, 0)).save(tmp_path / "a.png")
    changed = cli("edit", "--from", "first.png", "-o", "changed.png")
    assert changed.returncode == 0 and "the input pictures" in changed.stderr

    # Pictures that carry nothing to re-run: refused before loading.
    cli("edit", "a.png", "-p", "x", "--seed", "5", "--demo", *SMALL, "-o", "plain.jpg")
    for name in ("plain.jpg", "a.png"):
        refused = cli("edit", "--from", name, "--json")
        assert refused.returncode == 2, refused.stderr
        assert "no qwen-edit parameters" in ndjson(refused.stdout)[-1]["error"]["message"]


def test_outputs_are_never_overwritten_silently(cli, pictures, tmp_path):
    args = ["edit", "a.png", "-p", "x", "--seed", "3", "--demo", *SMALL]
    assert cli(*args).returncode == 0
    earlier = (tmp_path / "qwen-edit_3.png").read_bytes()
    changed = cli(*args[:2], "-p", "y", *args[4:])  # the same seed, a new prompt: mflux's _1
    assert changed.returncode == 0 and "saved qwen-edit_3_1.png" in changed.stdout
    assert (tmp_path / "qwen-edit_3.png").read_bytes() == earlier
    assert cli(*args).returncode == 0 and (tmp_path / "qwen-edit_3_2.png").is_file()

    replaced = cli(*args[:2], "-p", "y", *args[4:], "--overwrite")
    assert replaced.returncode == 0 and "saved qwen-edit_3.png" in replaced.stdout
    assert (tmp_path / "qwen-edit_3.png").read_bytes() == (tmp_path / "qwen-edit_3_1.png").read_bytes()

    # A folder as -o takes the default name inside it (an existing one, or a name ending in /).
    (tmp_path / "outs").mkdir()
    for out, expected in [("outs", "outs/qwen-edit_3.png"), ("new/", "new/qwen-edit_3.png"),
                          ("--output=outs", "outs/qwen-edit_3_1.png")]:  # fmt: skip
        flags = [out] if out.startswith("--") else ["-o", out]
        proc = cli(*args, *flags, "--json")
        assert proc.returncode == 0, proc.stderr
        assert ndjson(proc.stdout)[-1]["data"]["outputs"] == [expected]


@pytest.mark.parametrize(
    "suffix, kind", [(".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP"), ("", "PNG")]
)
def test_the_suffix_picks_the_format(cli, pictures, tmp_path, suffix, kind):
    proc = cli("edit", "a.png", "-p", "x", "--seed", "3", "--demo", *SMALL, "-o", f"pic{suffix}")
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / f"pic{suffix or '.png'}"
    with Image.open(path) as image:
        assert image.format == kind and image.size == (32, 32)
        assert ("parameters" in getattr(image, "text", {})) == (kind == "PNG")  # only PNGs carry them


def test_edit_json_batch_file_loads_the_models_once(cli, pictures, tmp_path):
    jobs = tmp_path / "jobs.txt"
    lines = [
        "# a comment, then a blank line",
        "",
        "turn it green",
        json.dumps({"prompt": "two pictures", "images": ["b.png", "a.png"], "seed": 7, "steps": 1,
                    "batch_size": 2, "out": "batch/{job}_{index}.png"}),
        json.dumps({"seed": [3, -1], "cfg": 2.0, "negative_prompt": "noise"}),
    ]  # fmt: skip
    jobs.write_text("\n".join(lines))
    proc = cli("edit", "a.png", "-p", "default prompt", "--demo", "--batch-file", "jobs.txt", "--steps", "2",
               "--width", "32", "--height", "32", "--seed", "11", "--out", "out/{job}.png",
               "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = ndjson(proc.stdout)
    types = [e["type"] for e in lines]
    assert types[0] == "plan" and types.count("loading") == 1 and types.count("loaded") == 1
    assert types.index("loaded") < types.index("job_start")
    plan = lines[0]["jobs"]
    assert [j["source"] for j in plan] == ["jobs.txt:3", "jobs.txt:4", "jobs.txt:5", "jobs.txt:5"]
    seeds = [j["parameters"]["seed"] for j in plan]
    assert seeds[:3] == [11, 7, 3] and 0 <= seeds[3] < 2**32  # -1: a random seed, reported
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
    second = png_parameters(tmp_path / "batch/1_1.png")
    assert (second["seed"], second["batch_index"], second["batch_size"], second["steps"]) == (7, 1, 2, 1)
    assert [p["file"] for p in second["images"]] == ["b.png", "a.png"]
    third = png_parameters(tmp_path / "out/2.png")
    assert (third["seed"], third["cfg"], third["negative_prompt"]) == (3, 2.0, "noise")
    assert png_parameters(tmp_path / "out/3.png")["seed"] == seeds[3]  # the random seed is embedded
    assert [j["ok"] for j in envelope["data"]["jobs"]] == [True] * 4


# -- edit: mistakes, caught before loading ----------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    """A truncated JPEG (PIL's verify() passes it), a picture too large to decode, a text file named
    .safetensors, a file where the output folder should be; made once (the large picture takes a
    second to encode), linked into each test's folder."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (10, 200, 30)).save(buffer, "JPEG")
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[:-30])
    Image.new("1", (20000, 20000)).save(folder / "huge.png")  # 400 MP, a few KB on disk
    (folder / "notes.safetensors").write_text("not a model\n")
    (folder / "a-file").write_text("")
    return folder


def _link_bad_inputs(folder: Path, tmp_path: Path) -> None:
    for path in folder.iterdir():
        (tmp_path / path.name).symlink_to(path)
    (tmp_path / "empty-models").mkdir()


BEFORE_LOADING = [
    (["--sampler", "foo"], 2, "bad_parameter", "sampler_name"),
    (["--width", "100", "--height", "100"], 2, "bad_parameter", "width"),
    (["--width", "64"], 2, "bad_parameter", "height"),
    (["--seed", "-2"], 2, "bad_parameter", "seed"),
    (["--bogus-flag"], 2, "usage", None),
    (["--config", "missing.yaml", "--no-demo"], 2, "config_not_found", None),
    (["--device", "banana"], 2, "bad_parameter", "device"),
    (["--num-blocks-on-gpu", "-3"], 2, "bad_parameter", "num_blocks_on_gpu"),
    (["--offload", "enable", "--num-blocks-on-gpu", "99"], 2, "bad_parameter", "num_blocks_on_gpu"),
    (["--images-after", "cut.jpg"], 2, "bad_image", "images"),
    (["--images-after", "huge.png"], 2, "bad_image", "images"),
    (["--images-after", "nope.png"], 2, "image_not_found", "images"),
    (["-o", "out.tiff"], 2, "bad_parameter", "out"),
    (["-o", "out/{size}.png"], 2, "bad_parameter", "out"),
    (["-o", "a-file/x.png"], 4, "output_not_writable", "out"),
    (["--lora", "notes.safetensors"], 3, "model_invalid", "loras[0]"),
    (["--lora", "./nope.safetensors"], 3, "model_not_found", "loras[0]"),
    (["--models-dir", "empty-models", "--no-demo"], 3, "model_not_found", None),
]


@pytest.mark.parametrize(("args", "code", "error", "field"), BEFORE_LOADING,
                         ids=[" ".join(a[0]) for a in BEFORE_LOADING])  # fmt: skip
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_edit_mistakes_are_caught_before_loading(
    cli, pictures, bad_inputs, tmp_path, args, code, error, field, dry_run
):
    _link_bad_inputs(bad_inputs, tmp_path)
    images = ["a.png"]
    if args[0] == "--images-after":
        images, args = [args[1]], []
    demo = [] if "--no-demo" in args else ["--demo"]
    args = [a for a in args if a != "--no-demo"]
    proc = cli("edit", *images, "-p", "x", *demo, *args, *(["--dry-run"] if dry_run else []), "--json")
    assert proc.returncode == code, proc.stderr
    lines = ndjson(proc.stdout)
    assert not [e for e in lines if e["type"] in ("loading", "loaded")]  # nothing was loaded
    envelope = lines[-1]
    assert envelope["ok"] is False and envelope["error"]["code"] == error
    assert envelope["error"]["exit_code"] == code and "Traceback" not in proc.stderr
    if field:
        assert envelope["error"]["details"]["field"] == field
    if error == "model_not_found" and "--models-dir" in args:
        assert "qwen-edit download --models-dir empty-models" in envelope["error"]["fix"]


def test_model_files_of_the_wrong_kind_are_caught_before_loading(cli, pictures, tmp_path, qwen_edit_cache):
    models = models_dir(tmp_path / "models", qwen_edit_cache)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a model\n")
    vae, te = models / "vae" / VAE, models / "text_encoders" / TE
    cases = [
        (["--transformer", str(text)], "transformer", "not a readable .safetensors"),
        (["--transformer", str(vae)], "transformer", "no SVDQ layers"),
        (["--text-encoder", str(vae)], "text_encoder", "a VAE file"),
        (["--vae", str(te)], "vae", "looks like a text encoder"),
    ]
    for flags, field, words in cases:
        proc = cli("edit", "a.png", "-p", "x", "--models-dir", "models", *flags, "--dry-run", "--json")
        assert proc.returncode == 3, (flags, proc.stderr)
        error = ndjson(proc.stdout)[-1]["error"]
        assert (error["code"], error["details"]["field"]) == ("model_invalid", field) and words in error[
            "message"
        ]
    cut = models / "diffusion_models" / T4
    cut.write_bytes(cut.read_bytes()[:-100])  # an interrupted download
    proc = cli("edit", "a.png", "-p", "x", "--models-dir", "models", "--dry-run")
    assert proc.returncode == 3 and "truncated" in proc.stderr


def test_edit_error_messages_for_people(cli, pictures, tmp_path):
    (tmp_path / "empty-models").mkdir()
    missing = cli("edit", "a.png", "-p", "x", "--models-dir", "empty-models")
    assert missing.returncode == 3 and missing.stdout == ""
    assert "error: " in missing.stderr and "svdq-int4_r128" in missing.stderr
    assert "fix: qwen-edit download" in missing.stderr

    no_image = cli("edit", "nope.png", "-p", "x", "--demo")
    assert no_image.returncode == 2 and "no such file: nope.png" in no_image.stderr

    (tmp_path / "jobs.txt").write_text('make it red\n{"prompt": "x", "colour": "red"}\n')
    bad_line = cli("edit", "a.png", "--demo", "--batch-file", "jobs.txt")
    assert bad_line.returncode == 2 and "jobs.txt:2: unknown key 'colour'" in bad_line.stderr


def test_edit_dry_run_resolves_models_and_presets(cli, pictures, tmp_path, qwen_edit_cache):
    models = models_dir(tmp_path / "models", qwen_edit_cache)
    proc = cli("edit", "a.png", "-p", "x", "--models-dir", "models", "--lora", "style.safetensors:0.7",
               "--config", str(REPO / "configs/lightning-8step.yaml"), "--dry-run", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = ndjson(proc.stdout)[-1]["data"]
    assert data["dry_run"]
    assert data["models"]["transformer"] == str((models / "diffusion_models" / T8).resolve())
    assert data["models"]["vae"] == str((models / "vae" / VAE).resolve())
    assert data["models"]["loras"] == [[str((models / "loras/style.safetensors").resolve()), 0.7]]
    assert data["jobs"][0]["parameters"]["steps"] == 8  # the preset's generation defaults

    missing_lora = cli("edit", "a.png", "-p", "x", "--models-dir", "models", "--lora", "nope.safetensors",
                       "--dry-run")  # fmt: skip
    assert missing_lora.returncode == 3 and "nope.safetensors" in missing_lora.stderr


def test_settings_backend_is_not_overridden_by_flag_defaults(tmp_path):
    """`edit` without --backend/--compute keeps the settings' (doctor's "auto" defaults are its own)."""
    from runners.cli.parser import build_parser

    parser = build_parser()
    edit = parser.parse_args(["edit", "a.png", "-p", "x"])
    assert (edit.backend, edit.compute, edit.device) == (None, None, None)
    assert parser.parse_args(["doctor"]).backend == "auto"


# -- edit: conventions -------------------------------------------------------------------------------


def test_seeds_pictures_and_output_flags_as_other_tools_take_them(cli, pictures):
    def plan(*args: str) -> list[dict]:
        proc = cli("edit", *args, "-p", "x", "--demo", "--dry-run", "--json")
        assert proc.returncode == 0, proc.stderr
        return ndjson(proc.stdout)[-1]["data"]["jobs"]

    jobs = plan("--seed", "1", "2", "a.png")  # the seeds stop where the pictures start
    assert [j["parameters"]["seed"] for j in jobs] == [1, 2] and jobs[0]["images"] == ["a.png"]
    jobs = plan("a.png", "--seed", "4", "b.png")  # a picture after other flags is still a picture
    assert jobs[0]["images"] == ["a.png", "b.png"]
    random = plan("a.png", "--seed", "-1")
    assert random[0]["parameters"]["seed"] >= 0
    assert plan("a.png", "--output", "o.png")[0]["out"] == "o.png"
    bad = cli("edit", "a.png", "-p", "x", "--demo", "--dry-run", "--seed", "1", "b.png", "--frobnicate")
    assert bad.returncode == 2 and "--frobnicate" in bad.stderr


def test_edit_help_shows_the_defaults(cli):
    with pytest.raises(SystemExit) as exit_:
        cli("edit", "--help")
    assert exit_.value.code == 0
    from runners.cli.parser import EDIT

    helps = {names[-1]: options.get("help", "") for names, options in EDIT}
    defaults = {field.name: field.default for field in EditParams.__dataclass_fields__.values()}
    for flag, name in [("--steps", "steps"), ("--guidance", "cfg"), ("--sampler", "sampler_name"),
                       ("--scheduler", "scheduler"), ("--denoise", "denoise"), ("--shift", "shift"),
                       ("--batch-size", "batch_size")]:  # fmt: skip
        assert f"else {defaults[name]})" in helps[flag], flag  # what --help says is what EditParams does


def test_help_text_names_each_default(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("(default: settings, else 4)", "edit_{seed}.png)", "-1: random",
                  "--output PATH", "(default: settings, else euler)"):  # fmt: skip
        assert words in text, words
    with pytest.raises(SystemExit):
        main(["download", "--help"])
    assert "(default: 4; --steps 4 8 for both)" in " ".join(capsys.readouterr().out.split())


def test_the_readme_documents_every_exit_code_and_error_code():
    import re

    from runners.cli.output import ERROR_CODES, EXIT_CODES, KIND_ERRORS

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("### Exit codes") :]
    assert {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)} == set(EXIT_CODES)
    assert [code for code in ERROR_CODES if f"`{code}`" not in readme] == []
    raised = {code for code, _, _ in KIND_ERRORS.values()}
    for path in (REPO / "runners/cli").glob("*.py"):  # the codes the CLI's own errors use
        text = path.read_text()
        for pair in re.findall(r'CliError\(\s*"([a-z_]+)"(?: if \w+ else "([a-z_]+)")?', text):
            raised |= set(pair) - {""}
        raised |= set(re.findall(r'\(errors\.\w+, "([a-z_]+)"', text))  # download's hub errors
    assert {"disk_full", "output_not_writable", "hub_unauthorized", "usage"} <= raised  # the patterns work
    assert raised - set(ERROR_CODES) == set()


# -- the batch runner, in-process with a stand-in pipeline ----------------------------------------------


class FakePipe:
    lora_specs: tuple = ()

    def edit(self, images, prompt, callback=None, **params):
        from qwen_edit.pipeline import EditResult, GPUOutOfMemoryError

        if prompt == "too big":
            raise GPUOutOfMemoryError("CUDA ran out of GPU memory", {"cpu_offload": "enable"})
        if prompt == "interrupted":
            raise KeyboardInterrupt
        callback(1, 1, None)
        return EditResult([Image.new("RGB", (16, 16))], params["seed"], {"prompt": prompt}, {"total": 0.1})


def _jobs(prompts: list[str], outs: list[str] | None = None):
    from runners.cli import Job

    outs = outs or ["out.png"] * len(prompts)
    return [Job(i, f"jobs.txt:{i + 1}", ["a.png"], {"prompt": p, "seed": i}, outs[i], [])
            for i, p in enumerate(prompts)]  # fmt: skip


def test_a_failing_job_does_not_stop_the_others(tmp_path, monkeypatch):
    from runners.cli import run_jobs
    from runners.cli.output import Reporter

    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    results, error = run_jobs(
        FakePipe(), _jobs(["fine", "too big", "fine again"]), Reporter("edit", True, out)
    )
    assert [r["ok"] for r in results] == [True, False, True]
    assert error.code == "out_of_memory" and error.exit_code == 4
    assert error.details["suggestion"] == {"cpu_offload": "enable"}
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["type"] for e in lines if e["type"] != "progress"] == [
        "job_start", "output", "job_done", "job_start", "job_error", "job_start", "output", "job_done"
    ]  # fmt: skip
    assert [e["path"] for e in lines if e["type"] == "output"] == [
        "out.png",
        "out_1.png",
    ]  # never overwritten


def test_an_output_that_cannot_be_written_fails_its_job_not_the_batch(tmp_path, monkeypatch):
    from runners.cli import run_jobs, saving
    from runners.cli.output import Reporter

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    real_write = saving.write_picture

    def write(path, data, overwrite):  # the disk fills up for one picture
        if path.name == "full.png":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data, overwrite)

    monkeypatch.setattr(saving, "write_picture", write)
    out = io.StringIO()
    jobs = _jobs(["a", "b", "c"], ["a-file/x.png", "full.png", "fine.png"])
    results, error = run_jobs(FakePipe(), jobs, Reporter("edit", True, out))
    assert [r["ok"] for r in results] == [False, False, True] and (tmp_path / "fine.png").is_file()
    assert (error.code, error.exit_code, error.details["field"]) == ("output_not_writable", 4, "out")
    assert results[1]["error"]["code"] == "disk_full" and results[1]["error"]["exit_code"] == 4
    assert "a-file" in results[0]["error"]["message"] and "jobs.txt:1" in results[0]["error"]["message"]


def test_ctrl_c_says_what_it_interrupted(tmp_path, monkeypatch, capsys):
    import runners.cli as cli
    from runners.cli import run_jobs
    from runners.cli.output import CliError, Reporter

    def interrupted(args, reporter):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_download", interrupted)
    assert cli.main(["download", "--json"]) == 130
    envelope = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert envelope["error"]["code"] == "cancelled" and envelope["ok"] is False
    assert "partial downloads" in envelope["error"]["message"]

    monkeypatch.setattr(cli, "cmd_edit", interrupted)  # while loading
    assert cli.main(["edit", "a.png", "-p", "x"]) == 130
    err = capsys.readouterr().err
    assert "before the edit finished" in err and "download" not in err

    monkeypatch.chdir(tmp_path)  # during an edit: which job, and what was saved before it
    with pytest.raises(CliError) as info:
        run_jobs(FakePipe(), _jobs(["fine", "interrupted"]), Reporter("edit", True, io.StringIO()))
    assert info.value.exit_code == 130 and "job 1 (jobs.txt:2)" in info.value.message
    assert info.value.details["outputs"] == ["out.png"] and "download" not in info.value.message


def test_output_names():
    from runners.cli import Job, output_paths, parse_lora
    from runners.cli.saving import fill, format_of

    assert parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora("dir/style.safetensors:0.75") == ("dir/style.safetensors", 0.75)
    assert parse_lora("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
    assert parse_lora(["a.safetensors", 0.5]) == ("a.safetensors", 0.5)
    assert parse_lora({"name": "a.safetensors", "strength": 2}) == ("a.safetensors", 2.0)
    taken: set[str] = set()
    job = Job(0, "command line", [], {}, "out/{seed}")
    assert [str(p) for p in output_paths(job, 5, 2, taken)] == ["out/5_0.png", "out/5_1.png"]
    job = Job(1, "command line", [], {}, "img_{job}_{index}.webp.png")
    assert [str(p) for p in output_paths(job, 5, 2, taken)] == ["img_1_0.webp.png", "img_1_1.webp.png"]
    taken = set()
    assert [str(p) for p in output_paths(Job(2, "", [], {}, "out/{seed}"), 5, 1, taken)] == ["out/5.png"]
    again = output_paths(Job(3, "", [], {}, "out/{seed}"), 5, 1, taken, overwrite=True)
    assert [str(p) for p in again] == ["out/5_1.png"]  # --overwrite never replaces the run's own
    assert str(fill("pics/", 7, 0, 0)) == "pics/qwen-edit_7.png"
    assert [format_of(Path(n)) for n in ("a.png", "b.JPG", "c.jpeg", "d.webp")] == [
        "PNG",
        "JPEG",
        "JPEG",
        "WEBP",
    ]


# -- demo, doctor, configs ----------------------------------------------------------------------------


def test_demo_command(cli, tmp_path, qwen_edit_cache):
    proc = cli("demo", "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    assert "saved qwen-edit-demo.png" in proc.stdout and "random weights" in proc.stderr
    # It says where its picture and its files went.
    assert (
        str(tmp_path / "qwen-edit-demo.png") in proc.stderr
        and str(demo_folder(qwen_edit_cache)) in proc.stderr
    )
    params = png_parameters(tmp_path / "qwen-edit-demo.png")
    assert params["prompt"] and params["seed"] == 0 and params["steps"] == 2 and params["demo"] is True

    as_json = cli("demo", "--json", "--out", "d/{seed}.png", "--seed", "5", "--steps", "2")
    assert as_json.returncode == 0, as_json.stderr
    lines = ndjson(as_json.stdout)
    assert [e["type"] for e in lines if e["type"] != "progress"] == [
        "plan", "loading", "loaded", "job_start", "output", "job_done", "envelope"
    ]  # fmt: skip
    assert [e["step"] for e in lines if e["type"] == "progress"] == [1, 2]
    data = lines[-1]["data"]
    assert data["outputs"] == ["d/5.png"] and data["model"]["backend"] == "portable"
    assert data["cache_dir"] == str(demo_folder(qwen_edit_cache))
    assert png_parameters(tmp_path / "d/5.png")["seed"] == 5


def test_doctor(cli, tmp_path, qwen_edit_cache):
    gpu = torch.cuda.is_available()
    (tmp_path / "empty").mkdir()
    proc = cli("doctor", "--models-dir", "empty", "--json")
    lines = ndjson(proc.stdout)
    checks = {e["name"]: e for e in lines if e["type"] == "check"}
    assert set(checks) >= {"python", "torch", "gpu", "nunchaku", "models", "disk", "backend", "offload",
                           "memory", "locations"}  # fmt: skip
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

    models = models_dir(tmp_path / "models", qwen_edit_cache)
    human = cli("doctor", "--models-dir", "models")
    # Ready on a GPU whose setup is right; on this CPU machine the GPU is still missing.
    assert human.returncode in ((0, 4) if gpu else (4,)), human.stdout + human.stderr
    assert "verdict:" in human.stdout
    models_line = next(line for line in human.stdout.splitlines() if "] models" in line)
    assert "[ok" in models_line and T4 in models_line
    backend_line = next(line for line in human.stdout.splitlines() if "] backend" in line)
    assert "int4" in backend_line and T4 in backend_line

    vae = models / "vae" / VAE
    vae.write_bytes(vae.read_bytes()[:-20])  # an interrupted download
    cut = cli("doctor", "--models-dir", "models", "--json")
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


# -- one real process per command -------------------------------------------------------------------


@pytest.mark.slow
def test_edit_in_a_real_process(run_subprocess, pictures, tmp_path):
    proc = run_subprocess(
        "edit", "a.png", "-p", "x", "--seed", "1", "--demo", *SMALL, "-o", "e.png", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    lines = ndjson(proc.stdout)  # nothing but NDJSON on stdout, even from a real process
    assert lines[-1]["data"]["outputs"] == ["e.png"] and png_parameters(tmp_path / "e.png")["seed"] == 1
    again = run_subprocess("edit", "--from", "e.png", "-o", "again.png")  # another process, another load
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "e.png").read_bytes()
    bad = run_subprocess("edit", "a.png", "-p", "x", "--demo", "--device", "banana")
    assert bad.returncode == 2 and "device" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_demo_in_a_real_process(run_subprocess, tmp_path):
    proc = run_subprocess("demo")  # the README's "run it" command
    assert proc.returncode == 0, proc.stderr
    assert (
        "saved qwen-edit-demo.png" in proc.stdout
        and png_parameters(tmp_path / "qwen-edit-demo.png")["steps"] == 4
    )


@pytest.mark.slow
def test_doctor_in_a_real_process(run_subprocess, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_subprocess("doctor", "--models-dir", "empty", "--json")
    assert proc.returncode in (3, 4) and ndjson(proc.stdout)[-1]["error"]["code"] == "not_ready"


@pytest.mark.slow
def test_version_and_help_in_a_real_process(run_subprocess):
    version = run_subprocess("--version")
    assert version.returncode == 0 and version.stdout.startswith("qwen-edit ")
    usage = run_subprocess()
    assert usage.returncode == 2 and "edit" in usage.stderr
