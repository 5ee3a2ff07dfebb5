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
    compute: auto             # the transformer's: auto, bf16, fp8
    text_encoder_compute: upcast  # upcast (ComfyUI's numbers), fp8 (opt-in; moves the conditioning)
    cpu_offload: auto         # auto, enable, disable (ComfyUI-nunchaku's loader settings)
    num_blocks_on_gpu: 1      # with enable: transformer blocks kept on the GPU
    use_pin_memory: false     # pinned host memory for streamed blocks
    compile: false            # torch.compile the transformer blocks (portable) and the text encoder
    generation: {steps: 4, cfg: 1.0, sampler_name: euler, scheduler: simple, shift: 3.0}

A bare extra_model_paths.yaml (sections with a base_path at the top level) works too, with the
default model names. Several files can be layered (`load_settings([paths, preset])`): later ones
override earlier ones key by key, so a generation preset (configs/lightning-8step.yaml) can sit on top
of a paths file (configs/runpod-pod.yaml).

`resolve_spec(settings, **overrides)` turns settings plus what a caller overrides (a request's model
names, command-line flags) into a `PipelineSpec`: every file found, every option checked, each error
naming its slot (`field`: `transformer`, `loras[1]`, `backend`, ... for an override; `models.vae`,
`models.loras[0]`, ... for a name the settings gave). `QwenEditPipeline.from_spec` builds from it; the
CLI, the worker and `from_config` all go through here, so "settings -> model files" exists once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from .backend import BACKENDS, COMPUTES, TEXT_ENCODER_COMPUTES
from .errors import ModelNotFoundError, ParameterError, SettingsError, SettingsNotFoundError
from .hardware import describe_device, nunchaku_precision_error
from .offload import CPU_OFFLOAD_MODES
from .params import EditParams
from .paths import TEXT_ENCODER_FILE, TRANSFORMER_FILE, VAE_FILE, ModelFolders

DEFAULT_MODELS = {
    "transformer": "auto",
    "text_encoder": TEXT_ENCODER_FILE,
    "vae": VAE_FILE,
    "tokenizer": None,
    "loras": [],
}
AUTO_TRANSFORMERS = {"auto": 4, "auto-4steps": 4, "auto-8steps": 8}  # the Lightning file for this card
TOP_LEVEL_KEYS = {
    "model_paths", "models", "device", "backend", "compute", "text_encoder_compute", "generation",
    "cpu_offload", "num_blocks_on_gpu", "use_pin_memory", "compile",
}  # fmt: skip
# Model slot -> the model-folder kind its names are looked up in.
SLOT_KINDS = {
    "transformer": "diffusion_models",
    "text_encoder": "text_encoders",
    "vae": "vae",
    "tokenizer": "tokenizers",
}


@dataclass
class Settings:
    folders: ModelFolders
    models: dict = field(default_factory=lambda: dict(DEFAULT_MODELS))
    device: str = "auto"
    backend: str = "auto"
    compute: str = "auto"
    text_encoder_compute: str = "upcast"
    cpu_offload: str = "auto"
    num_blocks_on_gpu: int = 1
    use_pin_memory: bool = False
    compile: bool = False
    generation: dict = field(default_factory=dict)
    # Not settings-file keys: what `testing.demo.demo_settings` sets for the tiny demo model.
    text_encoder_config: dict | None = None
    demo: bool = False

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments for QwenEditPipeline.from_files, every name resolved to a file."""
        kwargs = resolve_spec(self).from_files_kwargs()
        kwargs["loras"] = [(lora.path, lora.strength) for lora in kwargs["loras"]]
        return kwargs

    def transformer_path(self, device: str | None) -> Path:
        """The transformer file `models.transformer` names ("auto": the Lightning file for `device`)."""
        return self.resolve_file("transformer", device=device)

    def resolve_file(
        self,
        slot: str,
        value: str | Path | None = None,
        *,
        device: str | None = None,
        allow_paths: bool = False,
    ) -> Path | None:
        """The file of one model slot (transformer, text_encoder, vae, tokenizer): `value`, else the
        settings' name for it. None only for a tokenizer left to be found beside the text encoder.

        `allow_paths`: a value naming an existing file or folder is taken as it is (the command line,
        on the user's own machine); otherwise values are names inside the model folders only, as a
        request must give them. Errors name the slot: `transformer` for a value, `models.transformer`
        for the settings' name.
        """
        if slot not in SLOT_KINDS:
            raise ValueError(f"unknown model slot {slot!r}; one of {sorted(SLOT_KINDS)}")
        field_name = slot if value is not None else f"models.{slot}"
        name = value if value is not None else self.models.get(slot)
        if name is None:
            return None
        if allow_paths:
            path = Path(str(name)).expanduser()
            if path.exists():
                return path.resolve()
        if slot == "transformer" and name in AUTO_TRANSFORMERS:
            return self._auto_transformer(str(name), device, field_name)
        return self.folders.resolve(SLOT_KINDS[slot], name, field=field_name)

    def _auto_transformer(self, name: str, device: str | None, field_name: str) -> Path:
        """The Lightning file of this card's Nunchaku precision (the other precision, rank 32: fallbacks)."""
        info = describe_device(device)
        native = "fp4" if nunchaku_precision_error(info, "fp4") is None else "int4"
        candidates = [
            TRANSFORMER_FILE.format(precision=p, rank=r, steps=AUTO_TRANSFORMERS[name])
            for p in (native, "int4" if native == "fp4" else "fp4")
            for r in (128, 32)
        ]
        for candidate in candidates:
            try:
                return self.folders.resolve("diffusion_models", candidate, field=field_name)
            except ModelNotFoundError:
                continue
        folders = [str(p) for p in self.folders.folders["diffusion_models"]]
        raise ModelNotFoundError(
            f"no Qwen-Image-Edit-2509 SVDQ transformer in {folders}; "
            f"looked for {candidates[0]} (this card's precision: {native}) and its variants. "
            "Run `qwen-edit download` or set models.transformer to a file name.",
            field=field_name,
        )

    def lora_list(self) -> list[tuple[str, float]]:
        out = []
        for i, entry in enumerate(self.models.get("loras") or []):
            try:
                if isinstance(entry, str):
                    out.append((entry, 1.0))
                    continue
                if isinstance(entry, Mapping) and "name" in entry:
                    out.append((str(entry["name"]), float(entry.get("strength", 1.0))))
                    continue
                if isinstance(entry, (list, tuple)) and len(entry) == 2:
                    out.append((str(entry[0]), float(entry[1])))
                    continue
            except (TypeError, ValueError):
                raise SettingsError(f"models.loras[{i}]", "the strength must be a number") from None
            raise SettingsError(f"models.loras[{i}]", "use a name, [name, strength] or {name, strength}")
        return out

    def edit_defaults(self) -> dict:
        """Generation defaults, checked by building EditParams with them."""
        allowed = set(EditParams.__dataclass_fields__) - {"prompt"}
        unknown = set(self.generation) - allowed
        if unknown:
            raise SettingsError(
                f"generation.{sorted(unknown)[0]}", f"unknown setting; allowed: {sorted(allowed)}"
            )
        try:
            EditParams(prompt="", **self.generation)
        except ParameterError as exc:
            raise SettingsError(f"generation.{exc.field}", exc.message) from None
        return dict(self.generation)


# -- the resolved spec ---------------------------------------------------------------------------


class ModelFiles(NamedTuple):
    """The files a pipeline is loaded from; two specs with equal files share one loaded pipeline."""

    transformer: Path
    text_encoder: Path
    vae: Path
    tokenizer: Path | None  # None: found beside the text encoder (or in the HF cache) when loading


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file, its strength, and the name results report for it.

    `name` is the LoRA as the caller named it (a request's `lora_name`, a `--lora` value), so a
    response or a PNG's parameters never carry a server's absolute paths; `path` is the file itself.
    """

    path: Path
    strength: float
    name: str


@dataclass(frozen=True)
class PipelineSpec:
    """Everything `QwenEditPipeline.from_spec` needs, resolved and checked: files, LoRAs and options."""

    files: ModelFiles
    loras: tuple[LoraSpec, ...] = ()
    device: str | None = None  # None: CUDA if present, else the CPU
    backend: str = "auto"
    compute: str = "auto"
    text_encoder_compute: str = "upcast"
    cpu_offload: str = "auto"
    num_blocks_on_gpu: int = 1
    use_pin_memory: bool = False
    compile: bool = False
    text_encoder_config: dict | None = None  # only for encoders that are not the 7B one (the demo's)
    demo: bool = False  # the demo's small image budgets (a CPU runs it in seconds)

    @property
    def offload(self) -> tuple[str, int, bool]:
        """(cpu_offload, num_blocks_on_gpu, use_pin_memory): ComfyUI-nunchaku's loader settings."""
        return self.cpu_offload, self.num_blocks_on_gpu, self.use_pin_memory

    def replace(self, **changes: Any) -> PipelineSpec:
        return dataclasses.replace(self, **changes)

    def from_files_kwargs(self) -> dict:
        """Keyword arguments for QwenEditPipeline.from_files (the LoRAs as LoraSpecs, names kept)."""
        return {
            **self.files._asdict(),
            "loras": list(self.loras),
            "device": self.device,
            "backend": self.backend,
            "compute": self.compute,
            "text_encoder_compute": self.text_encoder_compute,
            "cpu_offload": self.cpu_offload,
            "num_blocks_on_gpu": self.num_blocks_on_gpu,
            "use_pin_memory": self.use_pin_memory,
            "compile": self.compile,
            "text_encoder_config": self.text_encoder_config,
        }

    def describe(self) -> dict:
        """The files (paths as text, LoRAs as [path, strength]), for a plan shown before loading."""
        out = {slot: None if path is None else str(path) for slot, path in self.files._asdict().items()}
        out["loras"] = [[str(lora.path), lora.strength] for lora in self.loras]
        return out


def resolve_spec(
    settings: Settings,
    *,
    transformer: str | Path | None = None,
    text_encoder: str | Path | None = None,
    vae: str | Path | None = None,
    tokenizer: str | Path | None = None,
    loras: Sequence[tuple[str | Path, float]] | None = None,
    device: Any = None,
    backend: str | None = None,
    compute: str | None = None,
    text_encoder_compute: str | None = None,
    cpu_offload: str | None = None,
    num_blocks_on_gpu: int | None = None,
    use_pin_memory: bool | None = None,
    compile: bool | None = None,
    allow_paths: bool = False,
) -> PipelineSpec:
    """Settings plus overrides (None: the settings' value) -> a PipelineSpec, or the first error.

    Model values are names in the settings' folders; with `allow_paths` (the command line,
    `from_config`) an existing file path is taken as it is too. `loras` replaces the settings' list.
    Errors: ModelNotFoundError / UnsafeModelNameError for files, ParameterError for an option given
    here, each with `field` naming the slot (see the module docstring).
    """
    if device is not None and not isinstance(device, str):
        device = str(device)  # a torch.device
    device = _device("device", settings.device if device is None else device)

    def pick(name: str, value: Any) -> Any:
        return getattr(settings, name) if value is None else value

    options = {  # the cheap checks first
        "backend": _choice("backend", pick("backend", backend), BACKENDS),
        "compute": _choice("compute", pick("compute", compute), COMPUTES),
        "text_encoder_compute": _choice(
            "text_encoder_compute", pick("text_encoder_compute", text_encoder_compute), TEXT_ENCODER_COMPUTES
        ),
        "cpu_offload": _choice("cpu_offload", pick("cpu_offload", cpu_offload), CPU_OFFLOAD_MODES),
        "num_blocks_on_gpu": _blocks("num_blocks_on_gpu", pick("num_blocks_on_gpu", num_blocks_on_gpu)),
        "use_pin_memory": _flag("use_pin_memory", pick("use_pin_memory", use_pin_memory)),
        "compile": _flag("compile", pick("compile", compile)),
    }
    files = ModelFiles(
        transformer=settings.resolve_file("transformer", transformer, device=device, allow_paths=allow_paths),
        text_encoder=settings.resolve_file("text_encoder", text_encoder, allow_paths=allow_paths),
        vae=settings.resolve_file("vae", vae, allow_paths=allow_paths),
        tokenizer=settings.resolve_file("tokenizer", tokenizer, allow_paths=allow_paths),
    )
    if loras is None:
        entries = [
            (name, strength, f"models.loras[{i}]") for i, (name, strength) in enumerate(settings.lora_list())
        ]
    else:
        entries = [(name, strength, f"loras[{i}]") for i, (name, strength) in enumerate(loras)]
    return PipelineSpec(
        files=files,
        loras=tuple(resolve_lora(settings, *entry, allow_paths=allow_paths) for entry in entries),
        device=device,
        **options,
        text_encoder_config=settings.text_encoder_config,
        demo=settings.demo,
    )


def resolve_lora(
    settings: Settings | None,
    name: str | Path,
    strength: float,
    field_name: str = "loras[0]",
    allow_paths: bool = False,
) -> LoraSpec:
    """One LoRA: a name in the settings' `loras` folders, or (with `allow_paths`) a file path."""
    text = str(name)
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise ParameterError(f"{field_name}.strength", f"must be a number, got {strength!r}") from None
    if allow_paths:
        path = Path(text).expanduser()
        if path.is_file():
            return LoraSpec(path.absolute(), strength, text)
        if path.is_absolute() or text.startswith((".", "~")):  # clearly a path, and not there
            raise ModelNotFoundError(f"LoRA file not found: {text}", field=field_name)
    if settings is None:
        raise ModelNotFoundError(f"LoRA file not found: {text}", field=field_name)
    return LoraSpec(settings.folders.resolve("loras", text, field=field_name), strength, text)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ParameterError(name, f"{value!r} is not supported; choose one of: {', '.join(allowed)}")
    return value


def _device(name: str, value: Any) -> str | None:
    """The device: `auto` (None: CUDA if present, else the CPU), or one torch names: cpu, cuda, cuda:N."""
    if value == "auto":
        return None
    try:
        kind = torch.device(value).type if isinstance(value, str) else None
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ParameterError(name, f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")
    return value


def _blocks(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ParameterError(name, f"must be an integer >= 0, got {value!r}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ParameterError(name, f"must be true or false, got {value!r}")
    return value


# -- reading settings files ----------------------------------------------------------------------


def _read(config: str | Path | Mapping) -> tuple[Mapping, Path | None]:
    if isinstance(config, Mapping):
        return config, None
    path = Path(config)
    if not path.is_file():
        raise SettingsNotFoundError(f"settings file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(str(path), f"not valid YAML ({exc})") from exc
    if not isinstance(data, Mapping):
        raise SettingsError(str(path), "must be a YAML mapping")
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
    """Settings from one file or dict, or several layered in order (later keys win).

    Raises SettingsError (a ParameterError) naming the key at fault, or SettingsNotFoundError (a
    FileNotFoundError) for a file that isn't there.
    """
    layers = config if isinstance(config, list) else [config]
    if not layers:
        raise SettingsError("config", "give at least one settings file")
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
        raise SettingsError(sorted(unknown)[0], f"unknown settings key; allowed: {sorted(TOP_LEVEL_KEYS)}")
    if "model_paths" not in config:
        raise SettingsError(
            "model_paths", "missing: give the model folders (ComfyUI extra_model_paths.yaml keys)"
        )
    models = {**DEFAULT_MODELS, **(config.get("models") or {})}
    unknown = set(models) - set(DEFAULT_MODELS)
    if unknown:
        raise SettingsError(
            f"models.{sorted(unknown)[0]}", f"unknown model slot; allowed: {sorted(DEFAULT_MODELS)}"
        )
    try:  # the options, checked as resolve_spec checks them, but as settings keys
        settings = Settings(
            folders=ModelFolders.from_extra_model_paths(config["model_paths"], base_dir),
            models=models,
            device=_device("device", str(config.get("device", "auto"))) or "auto",
            backend=_choice("backend", config.get("backend", "auto"), BACKENDS),
            compute=_choice("compute", config.get("compute", "auto"), COMPUTES),
            text_encoder_compute=_choice(
                "text_encoder_compute", config.get("text_encoder_compute", "upcast"), TEXT_ENCODER_COMPUTES
            ),
            cpu_offload=_choice("cpu_offload", config.get("cpu_offload", "auto"), CPU_OFFLOAD_MODES),
            num_blocks_on_gpu=_blocks("num_blocks_on_gpu", config.get("num_blocks_on_gpu", 1)),
            use_pin_memory=_flag("use_pin_memory", config.get("use_pin_memory", False)),
            compile=_flag("compile", config.get("compile", False)),
            generation=dict(config.get("generation") or {}),
        )
    except SettingsError:
        raise
    except ParameterError as exc:
        raise SettingsError(exc.field, exc.message) from None
    settings.edit_defaults()
    settings.lora_list()
    return settings
