"""Settings + overrides -> one PipelineSpec: files found, options checked, each error naming its slot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qwen_edit.errors import (
    ModelNotFoundError,
    ParameterError,
    SettingsError,
    SettingsNotFoundError,
    UnsafeModelNameError,
    kind_of,
)
from qwen_edit.settings import LoraSpec, ModelFiles, PipelineSpec, load_settings, resolve_spec
from qwen_edit.testing.demo import demo_settings

T4 = "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors"
T4_R32 = "svdq-int4_r32-qwen-image-edit-2509-lightningv2.0-4steps.safetensors"
T8 = "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-8steps.safetensors"
TE = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
VAE = "qwen_image_vae.safetensors"


@pytest.fixture
def models(tmp_path) -> Path:
    """A ComfyUI models/ folder with files under the real names (resolution never reads them)."""
    root = tmp_path / "models"
    names = [f"diffusion_models/{T4}", f"diffusion_models/{T8}", f"text_encoders/{TE}", f"vae/{VAE}"]
    names += ["vae/other-vae.safetensors", "loras/style.safetensors", "loras/sub/anime.safetensors"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / "tokenizers" / "qwen25").mkdir(parents=True)
    return root


def settings_for(root: Path, **top) -> dict:
    section = {"base_path": str(root), "diffusion_models": "diffusion_models", "clip": "text_encoders",
               "vae": "vae", "loras": "loras", "tokenizers": "tokenizers"}  # fmt: skip
    return {"model_paths": {"volume": section}, **top}


def test_names_resolve_to_files_and_options_to_checked_values(models):
    settings = load_settings(
        settings_for(
            models,
            models={"loras": [{"name": "style.safetensors", "strength": 0.8}], "tokenizer": "qwen25"},
            cpu_offload="enable",
            num_blocks_on_gpu=3,
        )
    )
    spec = resolve_spec(settings, device="cpu")
    assert isinstance(spec, PipelineSpec)
    assert spec.files == ModelFiles(
        (models / "diffusion_models" / T4).resolve(),  # "auto": the 4-step Lightning file of the card
        (models / "text_encoders" / TE).resolve(),
        (models / "vae" / VAE).resolve(),
        (models / "tokenizers" / "qwen25").resolve(),
    )
    assert spec.loras == (LoraSpec((models / "loras/style.safetensors").resolve(), 0.8, "style.safetensors"),)
    assert spec.offload == ("enable", 3, False) and (spec.device, spec.backend, spec.compute) == (
        "cpu",
        "auto",
        "auto",
    )
    # Overrides replace the settings' values, LoRAs as a whole list.
    other = resolve_spec(
        settings, vae="other-vae.safetensors", transformer=T8, loras=[("sub/anime.safetensors", 1)],
        cpu_offload="disable", backend="portable", compute="bf16",
    )  # fmt: skip
    assert other.files.vae.name == "other-vae.safetensors" and other.files.transformer.name == T8
    assert other.loras == (
        LoraSpec((models / "loras/sub/anime.safetensors").resolve(), 1.0, "sub/anime.safetensors"),
    )
    assert (other.cpu_offload, other.backend, other.compute, other.num_blocks_on_gpu) == (
        "disable",
        "portable",
        "bf16",
        3,
    )
    assert resolve_spec(settings, loras=[]).loras == ()
    # The old entry points go through the same resolution.
    kwargs = settings.pipeline_kwargs()
    assert kwargs["vae"] == spec.files.vae and kwargs["loras"] == [(spec.loras[0].path, 0.8)]
    assert settings.transformer_path("cpu") == spec.files.transformer


def test_auto_transformer_falls_back_to_rank_32_and_says_what_it_looked_for(models):
    for step in (4, 8):
        (models / "diffusion_models" / T4.replace("4steps", f"{step}steps")).unlink()
    (models / "diffusion_models" / T4_R32).write_bytes(b"x")
    settings = load_settings(settings_for(models))
    assert resolve_spec(settings, device="cpu").files.transformer.name == T4_R32
    eight = load_settings([settings_for(models), {"models": {"transformer": "auto-8steps"}}])
    with pytest.raises(ModelNotFoundError, match=f"looked for {T8}") as info:
        resolve_spec(eight, device="cpu")
    assert info.value.field == "models.transformer" and kind_of(info.value) == "model_not_found"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_spec(settings, transformer="auto-8steps", device="cpu")
    assert info.value.field == "transformer"


@pytest.mark.parametrize(
    "overrides, error, field",
    [
        ({"vae": "missing.safetensors"}, ModelNotFoundError, "vae"),
        ({"text_encoder": "../../etc/passwd"}, UnsafeModelNameError, "text_encoder"),
        ({"transformer": "/abs/svdq.safetensors"}, UnsafeModelNameError, "transformer"),
        ({"tokenizer": "nope"}, ModelNotFoundError, "tokenizer"),
        ({"loras": [("style.safetensors", 1.0), ("nope.safetensors", 1.0)]}, ModelNotFoundError, "loras[1]"),
        ({"loras": [("~/.ssh/id_rsa", 1.0)]}, UnsafeModelNameError, "loras[0]"),
        ({"loras": [("style.safetensors", "strong")]}, ParameterError, "loras[0].strength"),
        ({"backend": "tensorrt"}, ParameterError, "backend"),
        ({"compute": "fp4"}, ParameterError, "compute"),
        ({"text_encoder_compute": "auto"}, ParameterError, "text_encoder_compute"),
        ({"cpu_offload": "sometimes"}, ParameterError, "cpu_offload"),
        ({"num_blocks_on_gpu": -1}, ParameterError, "num_blocks_on_gpu"),
        ({"use_pin_memory": "yes"}, ParameterError, "use_pin_memory"),
    ],
)
def test_each_override_error_names_its_slot(models, overrides, error, field):
    settings = load_settings(settings_for(models))
    with pytest.raises(error) as info:
        resolve_spec(settings, device="cpu", **overrides)
    assert info.value.field == field and info.value.message
    assert not isinstance(info.value, SettingsError)  # the caller's value, not the settings file's


@pytest.mark.parametrize(
    "top, error, field, kind",
    [
        ({"models": {"vae": "missing.safetensors"}}, ModelNotFoundError, "models.vae", "model_not_found"),
        (
            {"models": {"loras": ["nope.safetensors"]}},
            ModelNotFoundError,
            "models.loras[0]",
            "model_not_found",
        ),
        (
            {"models": {"text_encoder": "a/../../b"}},
            UnsafeModelNameError,
            "models.text_encoder",
            "unsafe_name",
        ),
    ],
)
def test_each_settings_name_error_names_its_key(models, top, error, field, kind):
    settings = load_settings(settings_for(models, **top))
    with pytest.raises(error) as info:
        resolve_spec(settings, device="cpu")
    assert (info.value.field, kind_of(info.value)) == (field, kind)


@pytest.mark.parametrize(
    "top, field",
    [
        ({"backend": "tensorrt"}, "backend"),
        ({"device": "banana"}, "device"),
        ({"compute": "int8"}, "compute"),
        ({"text_encoder_compute": "bf16"}, "text_encoder_compute"),
        ({"num_blocks_on_gpu": "two"}, "num_blocks_on_gpu"),
        ({"use_pin_memory": "yes"}, "use_pin_memory"),
        ({"models": {"loras": [5]}}, "models.loras[0]"),
        ({"models": {"unet": "x"}}, "models.unet"),
        ({"generation": {"steps": 0}}, "generation.steps"),
        ({"generation": {"guidance": 2}}, "generation.guidance"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_a_bad_settings_file_is_a_settings_error_naming_the_key(models, top, field):
    with pytest.raises(SettingsError) as info:
        load_settings(settings_for(models, **top))
    assert info.value.field == field and isinstance(info.value, ParameterError)  # as it always was
    assert kind_of(info.value) == "config"


@pytest.mark.parametrize("device", ["banana", "cuda:x", "mps", ""])
def test_a_device_that_is_not_one_is_refused_before_loading(models, device):
    with pytest.raises(ParameterError) as info:
        resolve_spec(load_settings(settings_for(models)), device=device)
    assert info.value.field == "device" and "cpu, cuda or cuda:N" in info.value.message
    for good, kept in (("cpu", "cpu"), ("cpu:0", "cpu:0"), ("auto", None)):
        assert resolve_spec(load_settings(settings_for(models)), device=good).device == kept


def test_settings_files_that_are_missing_or_not_yaml(tmp_path):
    with pytest.raises(SettingsNotFoundError, match="settings file not found") as info:
        load_settings(str(tmp_path / "missing.yaml"))
    assert isinstance(info.value, FileNotFoundError) and kind_of(info.value) == "config_not_found"
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_paths: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML") as info:
        load_settings(str(broken))
    assert info.value.field == str(broken)
    with pytest.raises(SettingsError) as info:
        load_settings({"model_paths": {"volume": "not a mapping"}})
    assert info.value.field == "model_paths.volume"


def test_paths_are_taken_only_where_the_caller_allows_them(models, tmp_path, monkeypatch):
    settings = load_settings(settings_for(models))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.safetensors").write_bytes(b"x")
    os.symlink(elsewhere / "mine.safetensors", tmp_path / "link.safetensors")
    monkeypatch.chdir(tmp_path)
    # The command line: an existing file is used as it is (a symlink to anywhere included: it's the
    # user's own machine); LoRAs keep the path as given, absolute, and report the name as given.
    spec = resolve_spec(
        settings, vae="link.safetensors", loras=[("elsewhere/mine.safetensors", 0.5)], allow_paths=True
    )
    assert spec.files.vae == (elsewhere / "mine.safetensors").resolve()
    assert spec.loras == (
        LoraSpec((tmp_path / "elsewhere/mine.safetensors").absolute(), 0.5, "elsewhere/mine.safetensors"),
    )
    with pytest.raises(ModelNotFoundError, match="LoRA file not found: ./gone.safetensors") as info:
        resolve_spec(settings, loras=[("./gone.safetensors", 1.0)], allow_paths=True)
    assert info.value.field == "loras[0]"
    # A request: names inside the folders only, whatever exists elsewhere.
    with pytest.raises(ModelNotFoundError):
        resolve_spec(settings, vae="link.safetensors")
    with pytest.raises(UnsafeModelNameError):
        resolve_spec(settings, loras=[(str(elsewhere / "mine.safetensors"), 1.0)])


def test_the_demo_as_settings_and_a_pipeline_built_from_the_spec(tmp_path, demo_dir):
    import shutil

    from qwen_edit import QwenEditPipeline
    from qwen_edit.testing.demo import DEMO_OUTPUT_MEGAPIXELS, DEMO_REFERENCE_AREA

    shutil.copytree(demo_dir, tmp_path / "demo")  # the session's files; a LoRA is added below
    settings = demo_settings(tmp_path / "demo", [{"num_blocks_on_gpu": 2}])
    assert settings.demo and settings.text_encoder_config and settings.num_blocks_on_gpu == 2
    gen = torch.Generator().manual_seed(0)
    save_file(  # a LoRA on one layer of the demo transformer, and a key it doesn't have
        {
            "proj_out.lora_A.weight": torch.randn(4, 128, generator=gen).bfloat16(),
            "proj_out.lora_B.weight": torch.randn(64, 4, generator=gen).bfloat16(),
            "no_such_layer.lora_A.weight": torch.randn(4, 128, generator=gen).bfloat16(),
            "no_such_layer.lora_B.weight": torch.randn(64, 4, generator=gen).bfloat16(),
        },
        str(tmp_path / "demo" / "loras" / "style.safetensors"),
    )
    spec = resolve_spec(settings, loras=[("style.safetensors", 0.5)])
    assert spec.demo and spec.files.tokenizer is None and spec.device == "cpu" and spec.backend == "portable"
    with pytest.warns(UserWarning, match="no_such_layer"):
        pipe = QwenEditPipeline.from_spec(spec)
    assert pipe.spec is spec
    assert (pipe.reference_area, pipe.output_megapixels) == (DEMO_REFERENCE_AREA, DEMO_OUTPUT_MEGAPIXELS)
    info = pipe.info()
    assert info["backend"] == "portable" and info["device"] == "cpu" and info["precision"] == "int4"
    assert info["files"]["vae"] == str(spec.files.vae)
    assert info["files"]["tokenizer"].endswith("qwen25_tokenizer")  # found beside the encoder
    assert info["offload"] and info["offload_plan"]["num_blocks"] > 0
    assert info["loras"] == [
        {"name": "style.safetensors", "strength": 0.5, "layers": 1, "unmatched": ["no_such_layer"]}
    ]
    assert set(info["load_seconds"]) >= {"transformer", "text_encoder", "vae", "loras", "total"}
    assert info["text_encoder_compute"] == "upcast"  # ComfyUI's numbers unless fp8 is asked for
    # Results name LoRAs as the caller did: never the file's path.
    result = pipe.edit([_picture()], "p", width=32, height=32, steps=1)
    assert result.parameters["loras"] == [("style.safetensors", 0.5)]
    pipe.set_loras([])
    assert pipe.info()["loras"] == [] and pipe.lora_report.unmatched == {}


def _picture():
    from PIL import Image

    return Image.new("RGB", (48, 32), (120, 60, 30))
