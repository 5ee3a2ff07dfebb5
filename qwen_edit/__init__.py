"""qwen-edit: Qwen-Image-Edit-2509 with Nunchaku SVDQuant weights, without ComfyUI.

The public entry points are imported lazily, so `import qwen_edit` stays cheap (diffusers and
transformers load on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_transformer": "qwen_edit.transformer",
    "load_text_encoder": "qwen_edit.text_encoder",
    "load_vae": "qwen_edit.vae",
    "load_tokenizer": "qwen_edit.tokenizer",
    "QwenEditPipeline": "qwen_edit.pipeline",
    "EditResult": "qwen_edit.pipeline",
    "GPUOutOfMemoryError": "qwen_edit.pipeline",
    "ParameterError": "qwen_edit.params",
    "QwenEditError": "qwen_edit.errors",
    "WorkflowError": "qwen_edit.workflow",
    "plan_workflow": "qwen_edit.workflow",
    "read_lora": "qwen_edit.lora",
    "load_settings": "qwen_edit.settings",
    "resolve_spec": "qwen_edit.settings",
    "PipelineSpec": "qwen_edit.settings",
    "apply_loras": "qwen_edit.lora",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen_edit' has no attribute {name!r}")
