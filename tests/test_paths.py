"""Model folders (ComfyUI's extra_model_paths.yaml keys) and safe name resolution."""

from __future__ import annotations

import os

import pytest
import yaml

from qwen_edit.paths import ModelFolders, ModelNotFoundError, UnsafeModelNameError


@pytest.fixture
def volume(tmp_path):
    models = tmp_path / "ComfyUI" / "models"
    for sub in ("diffusion_models", "unet", "clip", "vae", "loras"):
        (models / sub).mkdir(parents=True)
    (models / "unet" / "svdq.safetensors").write_bytes(b"x")
    (models / "clip" / "te.safetensors").write_bytes(b"x")
    (models / "loras" / "style").mkdir()
    (models / "loras" / "style" / "anime.safetensors").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    return tmp_path


def test_extra_model_paths_yaml_is_understood(volume):
    text = f"""
comfyui:
    base_path: {volume}/ComfyUI/
    diffusion_models: |
        models/diffusion_models
        models/unet
    clip: models/clip/
    vae: models/vae/
    loras: models/loras/
"""
    folders = ModelFolders.from_extra_model_paths(yaml.safe_load(text))
    assert folders.resolve("diffusion_models", "svdq.safetensors").name == "svdq.safetensors"
    assert folders.resolve("text_encoders", "te.safetensors").parent.name == "clip"
    assert folders.resolve("loras", "style/anime.safetensors").name == "anime.safetensors"


def test_missing_model_lists_where_it_looked_and_what_exists(volume):
    folders = ModelFolders.from_base(volume / "ComfyUI" / "models")
    with pytest.raises(
        ModelNotFoundError, match=r"'nope.safetensors' not found in .*unet.*available: \['svdq"
    ):
        folders.resolve("diffusion_models", "nope.safetensors")


@pytest.mark.parametrize(
    "name",
    [
        "../secret.safetensors",
        "/etc/passwd",
        "loras/../../secret.safetensors",
        "~/x.safetensors",
        "",
        " a",
        "C:\\x.safetensors",
        "a\x00b",
    ],
)
def test_names_cannot_leave_the_model_folders(volume, name):
    folders = ModelFolders.from_base(volume / "ComfyUI" / "models")
    with pytest.raises(UnsafeModelNameError):
        folders.resolve("loras", name)


def test_symlink_escape_is_refused(volume):
    loras = volume / "ComfyUI" / "models" / "loras"
    os.symlink(volume / "secret.safetensors", loras / "link.safetensors")
    folders = ModelFolders.from_base(volume / "ComfyUI" / "models")
    with pytest.raises(UnsafeModelNameError, match="outside"):
        folders.resolve("loras", "link.safetensors")
