"""Pipeline settings files: where the models are, which ones, and generation defaults.

A settings file is YAML (or the same as a dict):

    model_paths:              # sections exactly like ComfyUI's extra_model_paths.yaml
      volume:
        base_path: /runpod-volume/ComfyUI/models
        diffusion_models: diffusion_models
        clip: clip
        vae: vae
        loras: loras
    models:
      transformer: auto       # the Lightning 4-step file of this card's precision (auto-8steps: the
                              # 8-step one), or a file name
      text_encoder: qwen_2.5_vl_7b_fp8_scaled.safetensors
      vae: qwen_image_vae.safetensors
      tokenizer: null         # a folder name under `tokenizers`, or null to look beside the encoder
      loras: [{name: qwen-anime.safetensors, strength: 0.8}]
    device: auto              # auto, cuda, cuda:1, cpu
    backend: auto             # auto, nunchaku, portable
    compute: auto             # auto, bf16, fp8
    cpu_offload: auto         # auto, enable, disable (ComfyUI-nunchaku's loader settings)
    num_blocks_on_gpu: 1      # with enable: transformer blocks kept on the GPU
    use_pin_memory: false     # pinned host memory for streamed blocks
    compile: false            # torch.compile the transformer blocks (portable) and the text encoder
    generation: {steps: 4, cfg: 1.0, sampler_name: euler, scheduler: simple, shift: 3.0}

A bare extra_model_paths.yaml (sections with a base_path at the top level) works too, with the
default model names. Several files can be layered (`load_settings([paths, preset])`): later ones
override earlier ones key by key, so a generation preset (configs/lightning-8step.yaml) can sit on top
of a paths file (configs/runpod-pod.yaml).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .hardware import describe_device, nunchaku_precision_error
from .params import EditParams, ParameterError
from .paths import ModelFolders, ModelNotFoundError

DEFAULT_MODELS = {
    "transformer": "auto",
    "text_encoder": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
    "vae": "qwen_image_vae.safetensors",
    "tokenizer": None,
    "loras": [],
}
TRANSFORMER_FILE = "svdq-{precision}_r{rank}-qwen-image-edit-2509-lightningv2.0-{steps}steps.safetensors"
AUTO_TRANSFORMERS = {"auto": 4, "auto-4steps": 4, "auto-8steps": 8}  # the Lightning file for this card
TOP_LEVEL_KEYS = {
    "model_paths", "models", "device", "backend", "compute", "generation",
    "cpu_offload", "num_blocks_on_gpu", "use_pin_memory", "compile",
}  # fmt: skip


@dataclass
class Settings:
    folders: ModelFolders
    models: dict = field(default_factory=lambda: dict(DEFAULT_MODELS))
    device: str = "auto"
    backend: str = "auto"
    compute: str = "auto"
    cpu_offload: str = "auto"
    num_blocks_on_gpu: int = 1
    use_pin_memory: bool = False
    compile: bool = False
    generation: dict = field(default_factory=dict)

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments for QwenEditPipeline.from_files, every name resolved to a file."""
        device = None if self.device == "auto" else self.device
        tokenizer = self.models.get("tokenizer")
        return {
            "transformer": self.transformer_path(device),
            "text_encoder": self.folders.resolve("text_encoders", self.models["text_encoder"]),
            "vae": self.folders.resolve("vae", self.models["vae"]),
            "tokenizer": None if tokenizer is None else self.folders.resolve("tokenizers", tokenizer),
            "loras": [(self.folders.resolve("loras", name), strength) for name, strength in self.lora_list()],
            "device": device,
            "backend": self.backend,
            "compute": self.compute,
            "cpu_offload": self.cpu_offload,
            "num_blocks_on_gpu": self.num_blocks_on_gpu,
            "use_pin_memory": self.use_pin_memory,
            "compile": self.compile,
        }

    def transformer_path(self, device: str | None) -> Path:
        name = self.models["transformer"]
        if name not in AUTO_TRANSFORMERS:
            return self.folders.resolve("diffusion_models", name)
        info = describe_device(device)
        native = "fp4" if nunchaku_precision_error(info, "fp4") is None else "int4"
        candidates = [
            TRANSFORMER_FILE.format(precision=p, rank=r, steps=AUTO_TRANSFORMERS[name])
            for p in (native, "int4" if native == "fp4" else "fp4")
            for r in (128, 32)
        ]
        for candidate in candidates:
            try:
                return self.folders.resolve("diffusion_models", candidate)
            except ModelNotFoundError:
                continue
        folders = [str(p) for p in self.folders.folders["diffusion_models"]]
        raise ModelNotFoundError(
            f"no Qwen-Image-Edit-2509 SVDQ transformer in {folders}; "
            f"looked for {candidates[0]} (this card's precision: {native}) and its variants. "
            "Run `qwen-edit download` or set models.transformer to a file name."
        )

    def lora_list(self) -> list[tuple[str, float]]:
        out = []
        for i, entry in enumerate(self.models.get("loras") or []):
            if isinstance(entry, str):
                out.append((entry, 1.0))
            elif isinstance(entry, Mapping) and "name" in entry:
                out.append((str(entry["name"]), float(entry.get("strength", 1.0))))
            elif isinstance(entry, (list, tuple)) and len(entry) == 2:
                out.append((str(entry[0]), float(entry[1])))
            else:
                raise ParameterError(f"models.loras[{i}]", "use a name, [name, strength] or {name, strength}")
        return out

    def edit_defaults(self) -> dict:
        """Generation defaults, checked by building EditParams with them."""
        allowed = set(EditParams.__dataclass_fields__) - {"prompt"}
        unknown = set(self.generation) - allowed
        if unknown:
            raise ParameterError(
                f"generation.{sorted(unknown)[0]}", f"unknown setting; allowed: {sorted(allowed)}"
            )
        EditParams(prompt="", **self.generation)
        return dict(self.generation)


def _read(config: str | Path | Mapping) -> tuple[Mapping, Path | None]:
    if isinstance(config, Mapping):
        return config, None
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"settings file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise ParameterError(str(path), "must be a YAML mapping")
    if (
        "model_paths" not in data
        and data
        and all(isinstance(v, Mapping) and "base_path" in v for v in data.values())
    ):
        data = {"model_paths": data}  # a bare extra_model_paths.yaml
    return data, path.parent


def _merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "model_paths":
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_settings(config: str | Path | Mapping | list) -> Settings:
    """Settings from one file or dict, or several layered in order (later keys win)."""
    layers = config if isinstance(config, list) else [config]
    if not layers:
        raise ParameterError("config", "give at least one settings file")
    config, base_dir = {}, None
    for layer in layers:
        data, folder = _read(layer)
        if "model_paths" in data:
            base_dir = folder  # relative base_paths are relative to the file that names them
        config = _merge(config, data)
    if "model_paths" not in config and all(
        isinstance(v, Mapping) and "base_path" in v for v in config.values()
    ):
        config = {"model_paths": config}  # a bare extra_model_paths.yaml
    unknown = set(config) - TOP_LEVEL_KEYS
    if unknown:
        raise ParameterError(sorted(unknown)[0], f"unknown settings key; allowed: {sorted(TOP_LEVEL_KEYS)}")
    if "model_paths" not in config:
        raise ParameterError(
            "model_paths", "missing: give the model folders (ComfyUI extra_model_paths.yaml keys)"
        )
    models = {**DEFAULT_MODELS, **(config.get("models") or {})}
    unknown = set(models) - set(DEFAULT_MODELS)
    if unknown:
        raise ParameterError(
            f"models.{sorted(unknown)[0]}", f"unknown model slot; allowed: {sorted(DEFAULT_MODELS)}"
        )
    settings = Settings(
        folders=ModelFolders.from_extra_model_paths(config["model_paths"], base_dir),
        models=models,
        device=str(config.get("device", "auto")),
        backend=str(config.get("backend", "auto")),
        compute=str(config.get("compute", "auto")),
        cpu_offload=str(config.get("cpu_offload", "auto")),
        num_blocks_on_gpu=int(config.get("num_blocks_on_gpu", 1)),
        use_pin_memory=bool(config.get("use_pin_memory", False)),
        compile=bool(config.get("compile", False)),
        generation=dict(config.get("generation") or {}),
    )
    settings.edit_defaults()
    return settings
