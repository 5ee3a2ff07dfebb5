"""Model folders laid out like ComfyUI's extra_model_paths.yaml, and safe name resolution in them.

ComfyUI's file (comfyanonymous/ComfyUI extra_model_paths.yaml.example) has named sections, each with
a `base_path` and one entry per model kind, a folder or several separated by newlines, relative to
`base_path`. Users on RunPod already have their volumes laid out this way, so qwen-edit reads the
same keys. A name given by a user (a request, a CLI flag) resolves only to a file inside one of the
configured folders: no absolute paths, no `..`, no symlink that leads outside.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelNotFoundError, SettingsError, UnsafeModelNameError

# Our kind -> the extra_model_paths.yaml keys that feed it (ComfyUI's folder_paths names).
KIND_KEYS = {
    "diffusion_models": ("diffusion_models", "unet", "checkpoints"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "loras": ("loras",),
    "tokenizers": ("tokenizers",),
}
MODEL_SUFFIXES = (".safetensors", ".sft")
# The published files' names: the Nunchaku SVDQ transformers (nunchaku-tech/nunchaku-qwen-image-edit-2509)
# and ComfyUI's text encoder and VAE (Comfy-Org/Qwen-Image_ComfyUI split_files/).
TRANSFORMER_FILE = "svdq-{precision}_r{rank}-qwen-image-edit-2509-lightningv2.0-{steps}steps.safetensors"
TEXT_ENCODER_FILE = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
VAE_FILE = "qwen_image_vae.safetensors"


@dataclass
class ModelFolders:
    """Folders to search per kind, in order."""

    folders: dict[str, list[Path]] = field(default_factory=lambda: {kind: [] for kind in KIND_KEYS})

    @classmethod
    def from_extra_model_paths(cls, sections: Mapping, base_dir: Path | None = None) -> ModelFolders:
        """Parse extra_model_paths.yaml content: {section: {base_path, kind: "dir\\ndir", ...}}."""
        result = cls()
        for section_name, section in sections.items():
            if not isinstance(section, Mapping):
                raise SettingsError(f"model_paths.{section_name}", "must be a mapping of kind: folder")
            base = Path(str(section.get("base_path", "."))).expanduser()
            if not base.is_absolute() and base_dir is not None:
                base = base_dir / base
            for kind, keys in KIND_KEYS.items():
                for key in keys:
                    value = section.get(key)
                    if value is None:
                        continue
                    entries = value if isinstance(value, list) else str(value).splitlines()
                    for entry in entries:
                        if str(entry).strip():
                            result.folders[kind].append(base / str(entry).strip())
        return result

    @classmethod
    def from_base(cls, base: str | Path) -> ModelFolders:
        """ComfyUI's default `models/` layout under one folder."""
        return cls.from_extra_model_paths({"default": comfy_layout(base)})

    def resolve(self, kind: str, name: str | Path, field: str | None = None) -> Path:
        """The file `name` of `kind`, searched in order; raises with what was searched and found.

        `field` names the setting or request field the name came from, in the error (default: `kind`).
        """
        if kind not in self.folders:
            raise ValueError(f"unknown model kind {kind!r}; one of {sorted(self.folders)}")
        name = str(name)
        field = field or kind
        check_model_name(name, field)
        searched = []
        for folder in self.folders[kind]:
            candidate = folder / name
            searched.append(str(folder))
            if candidate.exists():
                return confine(candidate, folder, field)
        available = sorted({p.name for f in self.folders[kind] if f.is_dir() for p in f.iterdir()})[:20]
        raise ModelNotFoundError(
            f"{kind} model {name!r} not found in {searched or 'no configured folder'}"
            + (f"; available: {available}" if available else "")
            + ". Check the name, or run `qwen-edit download` to fetch the models.",
            field=field,
            name=name,
        )


def comfy_layout(base: str | Path) -> dict:
    """An extra_model_paths.yaml section for ComfyUI's default `models/` layout under `base`."""
    return {
        "base_path": str(base),
        "diffusion_models": "diffusion_models\nunet",
        "text_encoders": "text_encoders\nclip",
        "vae": "vae",
        "loras": "loras",
        "tokenizers": "tokenizers",
    }


def check_model_name(name: str, field_name: str) -> None:
    """Refuse names that could leave a folder, before touching the file system."""
    if "\x00" in name:  # before Path(): what is wrong is the byte, whatever else the name holds
        raise UnsafeModelNameError("a file name can't contain a NUL character (\\x00)", field=field_name)
    path = Path(name)
    if not name or name.strip() != name:
        raise UnsafeModelNameError(f"empty or padded name {name!r}", field=field_name)
    if path.is_absolute() or name.startswith(("~", "\\")) or ":" in name:
        raise UnsafeModelNameError(f"{name!r} must be a name relative to the model folder", field=field_name)
    if ".." in path.parts:
        raise UnsafeModelNameError(f"{name!r} may not contain '..'", field=field_name)


def confine(path: Path, folder: Path, field_name: str) -> Path:
    """`path` with symlinks resolved, provided it is still inside `folder`."""
    real, root = path.resolve(), folder.resolve()
    if real != root and root not in real.parents:
        raise UnsafeModelNameError(f"{path} leads outside {folder} (a symlink?)", field=field_name)
    return real
