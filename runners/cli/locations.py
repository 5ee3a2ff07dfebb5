"""Where the CLI looks for model folders when it is not told (--models-dir / --config).

RunPod's conventions (configs/runpod-pod.yaml, configs/runpod-serverless.yaml): a pod's persistent disk
is /workspace, with ComfyUI templates keeping models in /workspace/ComfyUI/models; a serverless worker's
network volume is /runpod-volume. $QWEN_EDIT_MODELS names a folder ahead of all of them, and ./models
(the current directory) comes first of the guesses, so a local checkout works without flags.
"""

from __future__ import annotations

import os
from pathlib import Path

from qwen_edit.paths import comfy_layout

MODELS_ENV = "QWEN_EDIT_MODELS"
# ComfyUI `models/` folders, most specific first.
RUNPOD_MODEL_BASES = (
    Path("/workspace/ComfyUI/models"),
    Path("/workspace/data/models"),
    Path("/runpod-volume/ComfyUI/models"),
    Path("/runpod-volume/models"),
)
# Mount points worth reporting in `doctor` even when they hold no models yet.
RUNPOD_ROOTS = (Path("/workspace"), Path("/runpod-volume"))


def candidate_model_bases() -> list[Path]:
    """Every folder the CLI would search, in order (existing or not)."""
    bases = []
    if os.environ.get(MODELS_ENV):
        bases.append(Path(os.environ[MODELS_ENV]).expanduser())
    bases.append(Path("models").absolute())
    bases.extend(RUNPOD_MODEL_BASES)
    return list(dict.fromkeys(bases))


def existing_model_bases() -> list[Path]:
    """The candidate folders that exist; ./models (absolute) when none does, so errors name a place."""
    found = [b for b in candidate_model_bases() if b.is_dir()]
    return found or [candidate_model_bases()[0]]


def default_download_dir() -> Path:
    """Where `qwen-edit download` writes without --models-dir: the first existing models folder, else
    a models folder on the pod's persistent disk (/workspace, /runpod-volume), else ./models."""
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV]).expanduser()
    for base in RUNPOD_MODEL_BASES:
        if base.is_dir():
            return base
    if RUNPOD_ROOTS[0].is_dir():
        return RUNPOD_ROOTS[0] / "data" / "models"
    if RUNPOD_ROOTS[1].is_dir():
        return RUNPOD_ROOTS[1] / "models"
    return Path("models").absolute()


def settings_layers(configs: list[str] | None, models_dir: str | Path | None) -> list:
    """`load_settings` layers for --config (repeatable, in order) and --models-dir.

    Later layers' model_paths replace earlier ones whole, so the order is: the existing default folders
    (used only when no file names model folders, e.g. a generation preset alone), the files, then
    --models-dir, which wins over everything.
    """
    bases = existing_model_bases()
    layers: list = [{"model_paths": {f"default_{i}": comfy_layout(b) for i, b in enumerate(bases)}}]
    layers.extend(str(c) for c in configs or [])
    if models_dir is not None:
        layers.append({"model_paths": {"models_dir": comfy_layout(Path(models_dir).expanduser().absolute())}})
    return layers
