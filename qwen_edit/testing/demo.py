"""The demo model: tiny random weights in the four real file formats, written once into a cache folder.

`QwenEditPipeline.demo()` and `qwen-edit demo` run the whole edit path on a CPU in seconds with it: an
SVDQ int4 transformer in Nunchaku's layout, a ComfyUI scaled-fp8 Qwen2.5-VL encoder, a ComfyUI-named
VAE, and a byte-level tokenizer with the Qwen2.5 special tokens at their real ids. The pictures it
makes are noise; everything else is what runs on the real files.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ..settings import Settings, load_settings

DEMO_VERSION = "1"  # bump when a writer's output changes, so stale caches are not reused
# Qwen2.5's special tokens and ids (ComfyUI's bundled tokenizer_config.json, added_tokens_decoder).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
FIRST_SPECIAL_ID = 151643
# Image budgets of the demo pipeline: references at ~128x128 and outputs at ~256x256 by default, so a
# CPU runs an edit in seconds (the real workflow uses 1024x1024 and 1 megapixel).
DEMO_REFERENCE_AREA = 128 * 128
DEMO_OUTPUT_MEGAPIXELS = 0.0625


def default_cache_dir() -> Path:
    """Where the demo files live: $QWEN_EDIT_CACHE, else the user cache; one folder per DEMO_VERSION."""
    root = os.environ.get("QWEN_EDIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "qwen-edit" / f"demo-v{DEMO_VERSION}"


def demo_files(cache_dir: str | Path | None = None) -> dict:
    """Paths (and the text encoder config) for QwenEditPipeline.from_files, writing what is missing."""
    from .text_encoder import tiny_text_encoder_config, write_comfy_text_encoder
    from .transformer import TINY_TRANSFORMER_CONFIG, write_tiny_transformer
    from .vae import write_comfy_vae

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # The encoder's width is the transformer's text width; its heads of 32 take an M-RoPE split of 16.
    te_config = tiny_text_encoder_config(
        hidden_size=TINY_TRANSFORMER_CONFIG["joint_attention_dim"],
        num_attention_heads=2,
        mrope_section=[4, 6, 6],
    )
    files = {
        "transformer": folder / "svdq-int4_r16-demo.safetensors",
        "text_encoder": folder / "qwen_2.5_vl_demo_fp8_scaled.safetensors",
        "vae": folder / "qwen_image_vae_demo.safetensors",
        "tokenizer": folder / "qwen25_tokenizer",
    }
    _once(files["transformer"], lambda p: write_tiny_transformer(p, precision="int4", rank=16))
    _once(files["text_encoder"], lambda p: write_comfy_text_encoder(p, config=te_config))
    _once(files["vae"], lambda p: write_comfy_vae(p, base_dim=8))
    _once(files["tokenizer"], write_demo_tokenizer)
    return {**files, "text_encoder_config": te_config}


def demo_settings(cache_dir: str | Path | None = None, layers: Sequence = ()) -> Settings:
    """Settings for the demo model: its files (written once into `cache_dir`) as the model folders, the
    CPU, the portable backend in bf16; `layers` (settings files or dicts) go on top. With `resolve_spec`
    and `QwenEditPipeline.from_spec`, what `QwenEditPipeline.demo()`, the CLI and the worker load."""
    files = demo_files(cache_dir)
    folder = Path(files["transformer"]).parent
    (folder / "loras").mkdir(exist_ok=True)
    section = {"base_path": str(folder), "diffusion_models": ".", "clip": ".", "vae": ".", "tokenizers": ".",
               "loras": "loras"}  # fmt: skip
    demo = {
        "model_paths": {"demo": section},
        "models": {name: Path(files[name]).name for name in ("transformer", "text_encoder", "vae")},
        "device": "cpu", "backend": "portable", "compute": "bf16",
    }  # fmt: skip
    settings = load_settings([demo, *layers])
    settings.text_encoder_config = files["text_encoder_config"]
    settings.demo = True
    return settings


def _once(path: Path, write: Callable[[Path], object]) -> None:
    """Write `path` through a temporary name, so an interrupted run never leaves a half file behind."""
    if path.exists():
        return
    tmp = Path(tempfile.mkdtemp(dir=path.parent)) / path.name
    write(tmp)
    os.replace(tmp, path)
    tmp.parent.rmdir()


def _byte_alphabet() -> list[str]:
    """GPT-2 / Qwen2's byte-to-unicode table, in token-id order (so '\\n' is 198 and ' ' is 220)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def write_demo_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer (no merges) laid out like ComfyUI's qwen25_tokenizer/ folder.

    Ids 0-255 are the bytes, unused ids up to 151642 are placeholders, and the special tokens sit at
    their real ids, so the edit template, image slots and the dropped prefix work as with the real one.
    """
    folder.mkdir(parents=True)
    vocab = {token: i for i, token in enumerate(_byte_alphabet())}
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), FIRST_SPECIAL_ID)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    added = {
        str(FIRST_SPECIAL_ID + i): {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }  # fmt: skip
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 131072,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
