"""A ComfyUI workflow -> what the pipeline must do.

`plan_workflow` reads a Qwen-Image-Edit-2509 workflow in ComfyUI's API format (`{"id": {"class_type",
"inputs"}}`, what "Export (API)" saves and worker-comfyui's `input.workflow` carries) or in the editor's
format (`nodes` + `links`, widget values by position), follows the graph back from its SaveImage /
PreviewImage node and returns a `WorkflowPlan`: model names per slot, loader settings, LoRAs in stack
order, the pictures (LoadImage names and scaling), the edit parameters and the node each came from.
A graph the pipeline cannot reproduce exactly is refused before anything loads: a `WorkflowError`
names the node id, its class, the input and what is supported. No node is ignored silently: nodes
ComfyUI would not run either (not connected to anything) are listed in `plan.unused` and logged.

The graph the pipeline reproduces (README, "Migrating from ComfyUI"):

    NunchakuQwenImageDiTLoader | UNETLoader -> [LoRA loaders] -> ModelSamplingAuraFlow -> CFGNorm(1.0)
        -> KSampler | KSamplerAdvanced -> VAEDecode -> SaveImage | PreviewImage
    positive, negative: TextEncodeQwenImageEditPlus(CLIPLoader(type qwen_image), VAELoader, image1..3)
    image1..3: LoadImage [-> ImageScaleToTotalPixels | ImageScale | ImageScaleBy (lanczos)]
    latent: EmptySD3LatentImage | EmptyLatentImage | VAEEncode(image1 [-> ImageScaleToTotalPixels])

The model patches (AuraFlow, CFGNorm, LoRAs) may come in any order: their effects commute.

Node inputs, their order (the editor saves widget values by position), defaults and ranges are those
of the upstream definitions:
    CUI  comfyanonymous/ComfyUI (now Comfy-Org/ComfyUI) @ a125cd84b054a57729b5eecab930ca9408719832
    CN   nunchaku-tech/ComfyUI-nunchaku @ dbfd194294b727d9bec597a9a5df6d431c5d3a6f (v1.0.2)
    QL   ussoewwin/ComfyUI-QwenImageLoraLoader @ 6efac00e9fc37fecc7ff0c1e6f50e8a9eb040761 (v2.5.7)
    FE   Comfy-Org/ComfyUI_frontend @ 01c735d94316eb34b031e5436aaae2bb09805edf
         src/utils/executionUtil.ts (graphToPrompt) and litegraph's ExecutableNodeDTO.resolveOutput:
         how the editor's format becomes the API format (virtual nodes, muted and bypassed nodes).

LoRAs are applied the way ComfyUI's LoraLoaderModelOnly does (every layer, alpha/rank scale), whichever
loader node names them. QL composes its own way: the fused q/k/v LoRA scaled by alpha / (3 * rank)
(QL nunchaku_code/lora_qwen.py:1557-1563) and the modulation layers skipped unless
QWENIMAGE_LORA_APPLY_AWQ_MOD=1 (:62-63); ComfyUI-nunchaku's patcher never applies weight patches, so
LoraLoaderModelOnly has no effect on its models there (CN model_patcher.py, NunchakuModelPatcher.load).
The plan's `notes` say so where it applies.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from . import conditioning
from .errors import QwenEditError
from .offload import CPU_OFFLOAD_MODES
from .params import MAX_IMAGES, EditParams, ParameterError
from .paths import ModelFolders, ModelNotFoundError, check_model_name, confine
from .sampling import SAMPLER_NAMES, SCHEDULER_NAMES, needs_uncond

log = logging.getLogger(__name__)

__all__ = [
    "ImageOp",
    "ImageSlot",
    "LoaderOptions",
    "LoraSpec",
    "ModelMismatchError",
    "WorkflowError",
    "WorkflowFiles",
    "WorkflowPlan",
    "check_loaded_models",
    "load_workflow",
    "model_source",
    "parse_assignment",
    "plan_workflow",
    "resolve_loras",
    "resolve_models",
    "supported_nodes",
]

ImageLike = Image.Image | str | Path | bytes

CUI = "comfyanonymous/ComfyUI@a125cd8"
CN = "nunchaku-tech/ComfyUI-nunchaku@dbfd194"
QL = "ussoewwin/ComfyUI-QwenImageLoraLoader@6efac00"


class WorkflowError(QwenEditError, ValueError):
    """A workflow the pipeline can't run as ComfyUI would. `field` is "workflow.<node id>.<input>"
    (or "workflow" for the graph as a whole); `rule` says which rule: "malformed" (not a valid
    graph), "unsupported" (a node or value the pipeline can't honour), "image" (a picture is missing
    or unreadable), "models" (model names, or the loaded models, don't fit). Its kind (errors.KINDS)
    is "workflow": the CLI and the worker map it like a bad request field.
    """

    kind = "workflow"
    rule = "unsupported"

    def __init__(
        self,
        message: str,
        *,
        node_id: str | None = None,
        class_type: str | None = None,
        input_name: str | None = None,
        rule: str | None = None,
    ):
        self.node_id, self.class_type, self.input_name = node_id, class_type, input_name
        if rule is not None:
            self.rule = rule
        parts = ["workflow", *(p for p in (node_id, input_name) if p is not None)]
        where = ""
        if node_id is not None:
            where = f"node {node_id} ({class_type or 'unknown class'})"
            if input_name is not None:
                where += f", input '{input_name}'"
            where += ": "
        field = ".".join(parts)
        super().__init__(f"{field}: {where}{message}", field=field)


class ModelMismatchError(WorkflowError):
    """The workflow names other model files than the pipeline has loaded; `differences` maps each
    slot (transformer, text_encoder, vae) to (the workflow's file, the loaded file)."""

    rule = "models"

    def __init__(self, message: str, differences: dict[str, tuple[str, str]], **where):
        super().__init__(message, **where)
        self.differences = differences


# -- node definitions ------------------------------------------------------------------------------

_REQUIRED = object()
LINK_TYPES = frozenset({"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK"})
# The editor saves one more value after a widget with control_after_generate (the seed's "randomize").
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
MAX_RESOLUTION = 16384  # CUI nodes.py MAX_RESOLUTION
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")


@dataclass(frozen=True)
class _In:
    """One node input: a connection (type in LINK_TYPES) or a widget value."""

    name: str
    type: str  # link type, or INT, FLOAT, STRING, NAME (a file name), COMBO, BOOLEAN, EDITOR
    default: Any = _REQUIRED
    options: tuple | None = None
    low: float | None = None
    high: float | None = None
    control: bool = False  # control_after_generate: one more value in widgets_values
    editor_only: bool = False  # a widget the editor saves but the API format never carries

    @property
    def is_link(self) -> bool:
        return self.type in LINK_TYPES

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True)
class _Node:
    inputs: tuple[_In, ...]
    outputs: tuple[str, ...]
    source: str

    def input(self, name: str) -> _In | None:
        return next((i for i in self.inputs if i.name == name and not i.editor_only), None)

    @property
    def widgets(self) -> tuple[_In, ...]:
        return tuple(i for i in self.inputs if not i.is_link)


def _link(name: str, type_: str, optional: bool = False) -> _In:
    return _In(name, type_, None if optional else _REQUIRED)


_LORA_STACK_SLOTS = 10  # QL NunchakuQwenImageLoraStack: lora_name_1..10 / lora_strength_1..10
_SCALE_INPUTS = (_link("image", "IMAGE"), _In("upscale_method", "COMBO", options=UPSCALE_METHODS))
_SAMPLING_INPUTS = (
    _In("steps", "INT", low=1, high=10000),
    _In("cfg", "FLOAT", low=0.0, high=100.0),
    _In("sampler_name", "NAME"),  # upstream: comfy.samplers.KSampler.SAMPLERS; ours checked below
    _In("scheduler", "NAME"),
    _link("positive", "CONDITIONING"),
    _link("negative", "CONDITIONING"),
    _link("latent_image", "LATENT"),
)

# Inputs in the order of the upstream INPUT_TYPES / define_schema: required first, then optional,
# which is the order the editor creates (and saves) the widgets in.
NODES: dict[str, _Node] = {
    "NunchakuQwenImageDiTLoader": _Node(
        (
            _In("model_name", "NAME"),
            _In("cpu_offload", "COMBO", options=("auto", "enable", "disable")),
            _In("num_blocks_on_gpu", "INT", 1, low=1, high=60),
            _In("use_pin_memory", "COMBO", "disable", options=("enable", "disable")),
        ),
        ("MODEL",),
        f"{CN} nodes/models/qwenimage.py:104-169",
    ),
    "UNETLoader": _Node(
        (
            _In("unet_name", "NAME"),
            _In("weight_dtype", "COMBO", options=("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")),
        ),
        ("MODEL",),
        f"{CUI} nodes.py:903-925",
    ),
    "CLIPLoader": _Node(
        (
            _In("clip_name", "NAME"),
            _In("type", "NAME"),
            _In("device", "COMBO", "default", options=("default", "cpu")),
        ),
        ("CLIP",),
        f"{CUI} nodes.py:928-952",
    ),
    "VAELoader": _Node((_In("vae_name", "NAME"),), ("VAE",), f"{CUI} nodes.py:694-785"),
    "LoraLoaderModelOnly": _Node(
        (
            _link("model", "MODEL"),
            _In("lora_name", "NAME"),
            _In("strength_model", "FLOAT", low=-100.0, high=100.0),
        ),
        ("MODEL",),
        f"{CUI} nodes.py:681-692",
    ),
    # QL declares cpu_offload required; ComfyUI-nunchaku's pull-request loader of the same class name has
    # only lora_name and lora_strength, so cpu_offload falls back to QL's default when absent.
    "NunchakuQwenImageLoraLoader": _Node(
        (
            _link("model", "MODEL"),
            _In("lora_name", "NAME"),
            _In("lora_strength", "FLOAT", low=-100.0, high=100.0),
            _In("cpu_offload", "COMBO", "disable", options=("auto", "enable", "disable")),
            _In("save_precompiled_lora", "BOOLEAN", False),
        ),
        ("MODEL",),
        f"{QL} nodes/lora/qwenimage.py:28-100",
    ),
    "NunchakuQwenImageLoraStack": _Node(
        (
            _link("model", "MODEL"),
            _In("lora_count", "INT", low=1, high=_LORA_STACK_SLOTS),
            _In("cpu_offload", "COMBO", "disable", options=("auto", "enable", "disable")),
            *(
                spec
                for i in range(1, _LORA_STACK_SLOTS + 1)
                for spec in (
                    _In(f"lora_name_{i}", "NAME", "None"),  # load_lora_stack: kwargs.get, "None" skips
                    _In(f"lora_strength_{i}", "FLOAT", 1.0, low=-100.0, high=100.0),
                )
            ),
            _In("save_precompiled_lora", "BOOLEAN", False),
        ),
        ("MODEL",),
        f"{QL} nodes/lora/qwenimage.py:245-345",
    ),
    "ModelSamplingAuraFlow": _Node(
        (_link("model", "MODEL"), _In("shift", "FLOAT", low=0.0, high=100.0)),
        ("MODEL",),
        f"{CUI} comfy_extras/nodes_model_advanced.py:140-150",
    ),
    "CFGNorm": _Node(
        (_link("model", "MODEL"), _In("strength", "FLOAT", low=0.0, high=100.0)),
        ("MODEL",),
        f"{CUI} comfy_extras/nodes_cfg.py:51-78",
    ),
    "TextEncodeQwenImageEditPlus": _Node(
        (
            _link("clip", "CLIP"),
            _In("prompt", "STRING"),
            _link("vae", "VAE", optional=True),
            _link("image1", "IMAGE", optional=True),
            _link("image2", "IMAGE", optional=True),
            _link("image3", "IMAGE", optional=True),
        ),
        ("CONDITIONING",),
        f"{CUI} comfy_extras/nodes_qwen.py:51-104",
    ),
    "KSampler": _Node(
        (
            _link("model", "MODEL"),
            _In("seed", "INT", low=0, high=2**64 - 1, control=True),
            *_SAMPLING_INPUTS,
            _In("denoise", "FLOAT", low=0.0, high=1.0),
        ),
        ("LATENT",),
        f"{CUI} nodes.py:1499-1525",
    ),
    "KSamplerAdvanced": _Node(
        (
            _link("model", "MODEL"),
            _In("add_noise", "COMBO", options=("enable", "disable")),
            _In("noise_seed", "INT", low=0, high=2**64 - 1, control=True),
            *_SAMPLING_INPUTS,
            _In("start_at_step", "INT", low=0, high=10000),
            _In("end_at_step", "INT", low=0, high=10000),
            _In("return_with_leftover_noise", "COMBO", options=("disable", "enable")),
        ),
        ("LATENT",),
        f"{CUI} nodes.py:1527-1559",
    ),
    "EmptySD3LatentImage": _Node(
        (
            _In("width", "INT", low=16, high=MAX_RESOLUTION),
            _In("height", "INT", low=16, high=MAX_RESOLUTION),
            _In("batch_size", "INT", low=1, high=4096),
        ),
        ("LATENT",),
        f"{CUI} comfy_extras/nodes_sd3.py:39-58",
    ),
    # Zeros with 4 channels, repeated to the model's 16 (comfy-semantics.md 3): the same latent.
    "EmptyLatentImage": _Node(
        (
            _In("width", "INT", low=16, high=MAX_RESOLUTION),
            _In("height", "INT", low=16, high=MAX_RESOLUTION),
            _In("batch_size", "INT", low=1, high=4096),
        ),
        ("LATENT",),
        f"{CUI} nodes.py:1164-1186",
    ),
    "VAEEncode": _Node(
        (_link("pixels", "IMAGE"), _link("vae", "VAE")), ("LATENT",), f"{CUI} nodes.py:333-344"
    ),
    "VAEDecode": _Node(
        (_link("samples", "LATENT"), _link("vae", "VAE")), ("IMAGE",), f"{CUI} nodes.py:278-297"
    ),
    # widgets_values ["man.png", "image"]: the second is the editor's upload button.
    "LoadImage": _Node(
        (_In("image", "NAME"), _In("upload", "EDITOR", "image", editor_only=True)),
        ("IMAGE", "MASK"),
        f"{CUI} nodes.py:1630-1702",
    ),
    # resolution_steps: added to ComfyUI after a125cd8 (commit not recorded); absent means the older node.
    "ImageScaleToTotalPixels": _Node(
        (
            *_SCALE_INPUTS,
            _In("megapixels", "FLOAT", low=0.01, high=16.0),
            _In("resolution_steps", "INT", None, low=1, high=256),
        ),
        ("IMAGE",),
        f"{CUI} comfy_extras/nodes_post_processing.py:211-241",
    ),
    "ImageScale": _Node(
        (
            *_SCALE_INPUTS,
            _In("width", "INT", low=0, high=MAX_RESOLUTION),
            _In("height", "INT", low=0, high=MAX_RESOLUTION),
            _In("crop", "COMBO", options=("disabled", "center")),
        ),
        ("IMAGE",),
        f"{CUI} nodes.py:1778-1806",
    ),
    "ImageScaleBy": _Node(
        (*_SCALE_INPUTS, _In("scale_by", "FLOAT", low=0.01, high=8.0)),
        ("IMAGE",),
        f"{CUI} nodes.py:1808-1825",
    ),
    "SaveImage": _Node(
        (_link("images", "IMAGE"), _In("filename_prefix", "STRING")), (), f"{CUI} nodes.py:1561-1614"
    ),
    "PreviewImage": _Node((_link("images", "IMAGE"),), (), f"{CUI} nodes.py:1616-1628"),
}
OUTPUT_NODES = ("SaveImage", "PreviewImage")
TRANSFORMER_LOADERS = ("NunchakuQwenImageDiTLoader", "UNETLoader")
LORA_NODES = ("LoraLoaderModelOnly", "NunchakuQwenImageLoraLoader", "NunchakuQwenImageLoraStack")
MODEL_PATCHES = ("ModelSamplingAuraFlow", "CFGNorm", *LORA_NODES)
SAMPLERS = ("KSampler", "KSamplerAdvanced")
SCALE_NODES = ("ImageScaleToTotalPixels", "ImageScale", "ImageScaleBy")
LATENT_NODES = ("EmptySD3LatentImage", "EmptyLatentImage", "VAEEncode")
# Editor-only nodes (FE graphToPrompt skips virtual nodes): annotations, and two that only route values.
ANNOTATIONS = ("Note", "MarkdownNote")
MODES = {0: "Always", 1: "On Event", 2: "Never", 3: "On Trigger", 4: "Bypass"}
CFG_NORM_STRENGTH = 1.0  # the pipeline applies CFGNorm(strength=1.0) in every edit


def supported_nodes() -> dict[str, str]:
    """{class_type: upstream definition (repository@commit file:lines)} of every node the plan maps."""
    return {name: node.source for name, node in NODES.items()}


# -- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoaderOptions:
    """ComfyUI-nunchaku's DiT loader settings (memory only: the pixels do not depend on them)."""

    cpu_offload: str = "auto"
    num_blocks_on_gpu: int = 1
    use_pin_memory: bool = False

    def settings(self, num_blocks: int) -> tuple[str, int, bool]:
        """(cpu_offload, num_blocks_on_gpu, use_pin_memory) for a model of `num_blocks` blocks.

        The node allows up to 60 resident blocks whatever the model has; more than the model's blocks
        means all of them, which is what the pipeline's range ends at.
        """
        return self.cpu_offload, min(self.num_blocks_on_gpu, num_blocks), self.use_pin_memory


@dataclass(frozen=True)
class LoraSpec:
    name: str
    strength: float
    node_id: str | None = None  # None: given as an override
    input_name: str = "lora_name"


@dataclass(frozen=True)
class ImageOp:
    """One scaling node between LoadImage and the picture slot, applied as ComfyUI does it."""

    node_id: str
    class_type: str
    megapixels: float | None = None
    resolution_steps: int | None = None
    width: int | None = None
    height: int | None = None
    crop: str = "disabled"
    scale_by: float | None = None

    def size(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
        """(target size, crop box or None) for an input of `width` x `height`."""
        if self.class_type == "ImageScaleToTotalPixels":
            if self.resolution_steps is None:  # CUI@a125cd8: total = int(megapixels * 1024 * 1024)
                scale = math.sqrt(int(self.megapixels * 1024 * 1024) / (width * height))
                return (round(width * scale), round(height * scale)), None
            steps = self.resolution_steps  # newer ComfyUI: no int(), sides rounded to resolution_steps
            scale = math.sqrt(self.megapixels * 1024 * 1024 / (width * height))
            return (round(width * scale / steps) * steps, round(height * scale / steps) * steps), None
        if self.class_type == "ImageScaleBy":
            return (round(width * self.scale_by), round(height * self.scale_by)), None
        w, h = self.width, self.height  # ImageScale.upscale: 0 keeps the aspect ratio, both 0 no-op
        if w == 0 and h == 0:
            return (width, height), None
        if w == 0:
            w = max(1, round(width * h / height))
        elif h == 0:
            h = max(1, round(height * w / width))
        box = None
        if self.crop == "center":  # comfy/utils.py common_upscale
            old_aspect, new_aspect = width / height, w / h
            x = y = 0
            if old_aspect > new_aspect:
                x = round((width - width * (new_aspect / old_aspect)) / 2)
            elif old_aspect < new_aspect:
                y = round((height - height * (old_aspect / new_aspect)) / 2)
            box = (x, y, width - x, height - y)
        return (w, h), box

    def apply(self, image: Image.Image) -> Image.Image:
        """ComfyUI's lanczos path: PIL LANCZOS on the 8-bit pixels (comfy/utils.py lanczos), which is
        exact for pictures that came from 8-bit files; a same-size resize is a copy in both."""
        (w, h), box = self.size(*image.size)
        if w < 1 or h < 1:
            raise WorkflowError(
                f"scales a {image.width}x{image.height} picture to {w}x{h}",
                node_id=self.node_id, class_type=self.class_type, rule="image",
            )  # fmt: skip
        if box is not None:
            image = image.crop(box)
        return image.resize((w, h), Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class ImageSlot:
    """Picture `slot` (1-3) of TextEncodeQwenImageEditPlus: a LoadImage and the scaling after it."""

    slot: int
    name: str | None  # the LoadImage file name; None for an image given as an override
    node_id: str | None  # the LoadImage node
    ops: tuple[ImageOp, ...] = ()
    source: str | None = None  # the node whose output feeds the slot (VAEEncode may share it)
    data: Any = None  # an image given as an override (PIL image, path or bytes)


@dataclass(frozen=True)
class LatentSpec:
    """KSampler's latent: "empty" (EmptySD3LatentImage / EmptyLatentImage) or "image1" (VAEEncode
    of picture 1, optionally through ImageScaleToTotalPixels)."""

    kind: str
    node_id: str
    class_type: str
    scale: ImageOp | None = None

    def megapixels(self, picture: Image.Image) -> float:
        """`edit(output_megapixels=...)` that makes the pipeline's output latent this one exactly.

        The pipeline scales picture 1 with conditioning.megapixel_size, sqrt(mp * 2**20 / (w * h)):
        mp = w * h / 2**20 gives scale 1.0 exactly (the picture itself, as VAEEncode of the slot's own
        image), and ImageScaleToTotalPixels' own pixel total gives its size.
        """
        if self.scale is None:
            return picture.width * picture.height / 2**20
        if self.scale.resolution_steps is None:
            return int(self.scale.megapixels * 1024 * 1024) / 2**20
        return self.scale.megapixels


@dataclass(frozen=True)
class OutputSpec:
    node_ids: tuple[str, ...]
    class_type: str
    filename_prefix: str = "ComfyUI"

    def file_name(self, counter: int) -> str:
        """SaveImage's name for its `counter`-th file: `<prefix>_00001_.png` (ComfyUI nodes.py
        SaveImage.save_images), the prefix's folders left to the caller."""
        return f"{Path(self.filename_prefix).name}_{counter:05}_.png"


@dataclass(frozen=True)
class WorkflowPlan:
    """What a workflow asks the pipeline for, and which node each value came from.

    `models`: {"transformer", "text_encoder", "vae"} -> file name as the loader nodes give it;
    `params`: the `edit()` parameters; `sources`: parameter or slot -> "node id.input" ("override" for
    values set by `with_overrides`); `unused`: (node id, class) of nodes ComfyUI would not run either;
    `notes`: what the pipeline does differently from a literal reading, and inputs with no effect on
    the pixels. `graph` is the API-format graph the plan was made from.
    """

    models: Mapping[str, str]
    loader: LoaderOptions
    loras: tuple[LoraSpec, ...]
    images: tuple[ImageSlot, ...]
    params: EditParams
    latent: LatentSpec
    output: OutputSpec
    cfg_norm_strength: float
    sources: Mapping[str, str]
    unused: tuple[tuple[str, str], ...]
    notes: tuple[str, ...]
    graph: Mapping[str, Any] = field(repr=False)
    editor: tuple[tuple[tuple[str, str], ...], tuple[str, ...]] = field(default=((), ()), repr=False)

    # -- overrides ---------------------------------------------------------------------------------

    def with_overrides(self, values: Mapping[str, Any] | None = None, /, **named: Any) -> WorkflowPlan:
        """This plan with request values on top: a service keeps one workflow and injects each request.

        Keys with a dot set a node input ({"3.seed": 42, "111.prompt": "..."}; strings are converted
        for INT, FLOAT and BOOLEAN inputs, as `--set node.input=value` gives them) and re-plan the
        graph, so a bad one raises `WorkflowError` naming the node. Other keys set the result
        directly: the `edit()` parameters (prompt, negative_prompt, seed, steps, cfg, sampler_name,
        scheduler, denoise, shift, width, height, batch_size; a bad value raises `ParameterError`),
        `images` (pictures in slot order, replacing the workflow's; fewer drop the last slots), `loras`
        ([(name, strength)] or [{name, strength}], replacing the stack) and the loader settings
        cpu_offload, num_blocks_on_gpu, use_pin_memory.
        """
        merged = {**(values or {}), **named}
        node_values = {k: v for k, v in merged.items() if "." in k}
        plan = self
        if node_values:
            plan = _plan(apply_node_overrides(self.graph, node_values), *self.editor)
        named = {k: v for k, v in merged.items() if "." not in k}
        unknown = set(named) - set(OVERRIDES)
        if unknown:
            key = sorted(unknown)[0]
            raise ParameterError(key, f"unknown override; use one of {', '.join(OVERRIDES)} or 'node.input'")
        sources = dict(plan.sources)
        params = {k: v for k, v in named.items() if k in EditParams.__dataclass_fields__}
        if params:
            plan = replace(plan, params=replace(plan.params, **params))
        loader = {k: v for k, v in named.items() if k in LoaderOptions.__dataclass_fields__}
        if loader:
            plan = replace(plan, loader=replace(plan.loader, **_check_loader(loader)))
        if "loras" in named:
            plan = replace(plan, loras=_override_loras(named["loras"]))
        if "images" in named:
            plan = replace(plan, images=_override_images(plan.images, named["images"]))
        sources.update({k: "override" for k in named})
        return replace(plan, sources=sources)

    # -- what run_workflow passes on -------------------------------------------------------------------

    def pictures(
        self,
        images: Mapping[str, ImageLike] | Sequence[ImageLike] | None = None,
        input_dir: str | Path | None = None,
    ) -> list[Image.Image]:
        """The pictures for `edit()`, slot by slot, opened as LoadImage does and scaled as the graph does.

        `images`: {LoadImage name: image} or a list in slot order (as `with_overrides(images=...)`);
        a name not given is read from `input_dir` (ComfyUI's input folder), inside it only.
        """
        if images is not None and not isinstance(images, Mapping):
            return self.with_overrides(images=images).pictures(None, input_dir)
        given = dict(images or {})
        out = []
        for slot in self.images:
            picture = _open_slot(slot, given, input_dir)
            for op in slot.ops:
                picture = op.apply(picture)
            out.append(picture)
        return out

    def edit_arguments(self, pictures: Sequence[Image.Image]) -> dict:
        """Keyword arguments for `edit()` with these pictures (from `pictures()`)."""
        args = self.params.to_dict()
        if self.latent.kind == "image1" and self.params.width is None:
            megapixels = self.latent.megapixels(pictures[0])
            if megapixels > 16:
                node = self.latent.scale.node_id if self.latent.scale else self.latent.node_id
                raise WorkflowError(
                    f"the output latent would be {megapixels:.1f} megapixels (picture 1 is "
                    f"{pictures[0].width}x{pictures[0].height}); the pipeline makes at most 16: scale "
                    "picture 1 down (ImageScaleToTotalPixels) or use an EmptySD3LatentImage",
                    node_id=node, class_type=self.graph[node]["class_type"], rule="image",
                )  # fmt: skip
            args["output_megapixels"] = megapixels
        return args

    def to_dict(self) -> dict:
        """The plan as JSON-ready data (what a CLI prints with --dry-run)."""
        return {
            "models": dict(self.models),
            "loader": {
                "cpu_offload": self.loader.cpu_offload,
                "num_blocks_on_gpu": self.loader.num_blocks_on_gpu,
                "use_pin_memory": self.loader.use_pin_memory,
            },
            "loras": [{"name": lo.name, "strength": lo.strength, "node": lo.node_id} for lo in self.loras],
            "images": [
                {
                    "slot": s.slot,
                    "name": s.name,
                    "node": s.node_id,
                    "scaling": [f"{op.class_type} (node {op.node_id})" for op in s.ops],
                }
                for s in self.images
            ],
            "params": self.params.to_dict(),
            "latent": {"kind": self.latent.kind, "node": self.latent.node_id},
            "cfg_norm_strength": self.cfg_norm_strength,
            "output": {"nodes": list(self.output.node_ids), "filename_prefix": self.output.filename_prefix},
            "sources": dict(self.sources),
            "unused": [{"node": n, "class_type": c} for n, c in self.unused],
            "notes": list(self.notes),
        }


OVERRIDES = (
    *EditParams.__dataclass_fields__,
    "images",
    "loras",
    *LoaderOptions.__dataclass_fields__,
)


def _check_loader(values: dict) -> dict:
    out = dict(values)
    if "cpu_offload" in out:
        value = out["cpu_offload"]
        if isinstance(value, bool):  # the worker's request schema allows true/false too
            value = "enable" if value else "disable"
        if value not in CPU_OFFLOAD_MODES:
            raise ParameterError("cpu_offload", f"use one of {', '.join(CPU_OFFLOAD_MODES)}, got {value!r}")
        out["cpu_offload"] = value
    if "num_blocks_on_gpu" in out:
        value = out["num_blocks_on_gpu"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ParameterError("num_blocks_on_gpu", f"must be an integer >= 0, got {value!r}")
    if "use_pin_memory" in out and not isinstance(out["use_pin_memory"], bool):
        raise ParameterError("use_pin_memory", f"must be true or false, got {out['use_pin_memory']!r}")
    return out


def _override_loras(value) -> tuple[LoraSpec, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ParameterError("loras", "give a list of [name, strength] or {name, strength}")
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, Mapping) and "name" in entry:
            name, strength = entry["name"], entry.get("strength", 1.0)
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            name, strength = entry
        else:
            raise ParameterError(f"loras[{i}]", "give [name, strength] or {name, strength}")
        if not isinstance(name, str) or isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise ParameterError(f"loras[{i}]", "name must be a string and strength a number")
        out.append(LoraSpec(name, float(strength)))
    return tuple(out)


def _override_images(slots: tuple[ImageSlot, ...], value) -> tuple[ImageSlot, ...]:
    if isinstance(value, (str, bytes, Path, Image.Image)) or not isinstance(value, Sequence):
        value = [value]
    if not 1 <= len(value) <= MAX_IMAGES:
        raise ParameterError("images", f"give 1 to {MAX_IMAGES} images, got {len(value)}")
    out = []
    for i, data in enumerate(value):
        if i < len(slots):  # the slot's scaling still applies: the workflow decides it, not the request
            out.append(replace(slots[i], data=data))
        else:
            out.append(ImageSlot(i + 1, None, None, data=data))
    return tuple(out)


def _open_slot(slot: ImageSlot, given: Mapping[str, ImageLike], input_dir: str | Path | None) -> Image.Image:
    node = {"node_id": slot.node_id, "class_type": "LoadImage" if slot.node_id else None}
    if slot.data is not None:
        source, what = slot.data, f"images[{slot.slot - 1}]"
    elif slot.name in given:
        source, what = given[slot.name], f"image {slot.name!r}"
    elif input_dir is not None:
        field_name = f"workflow.{slot.node_id}.image"
        check_model_name(slot.name, field_name)  # the same rules as model names: no .., no absolute path
        folder = Path(input_dir)
        path = folder / slot.name
        if not path.is_file():
            raise WorkflowError(
                f"image {slot.name!r} is not in the input folder {folder}",
                input_name="image",
                rule="image",
                **node,
            )
        source, what = confine(path, folder, field_name), f"image {slot.name!r}"
    else:
        raise WorkflowError(
            f"no picture given for {slot.name!r}: pass images={{{slot.name!r}: ...}} or an input folder",
            input_name="image", rule="image", **node,
        )  # fmt: skip
    try:
        return conditioning.open_image(source)
    except (OSError, TypeError, ValueError) as exc:
        if slot.data is not None:
            raise ParameterError(what, f"cannot be read as an image ({exc})") from exc
        raise WorkflowError(
            f"{what} cannot be read as an image ({exc})", input_name="image", rule="image", **node
        ) from exc


# -- reading the two formats -----------------------------------------------------------------------


def load_workflow(source: str | Path | Mapping) -> tuple[dict, tuple[tuple[str, str], ...], tuple[str, ...]]:
    """(API-format graph, editor-only nodes, notes) from a dict, JSON text or a .json file, either format.

    The editor's format is converted as the editor's "Export (API)" does (FE graphToPrompt): widget
    values by the upstream input order, Reroute and PrimitiveNode resolved, muted nodes left out,
    bypassed nodes passing their same-typed input through.
    """
    if isinstance(source, (str, Path)):
        text = str(source)
        if isinstance(source, str) and text.lstrip().startswith("{"):
            data = _parse_json(text, "the workflow text")
        else:
            path = Path(source)
            if not path.is_file():
                raise WorkflowError(f"workflow file not found: {path}", rule="malformed")
            data = _parse_json(path.read_text(encoding="utf-8"), str(path))
    elif isinstance(source, Mapping):
        data = source
    else:
        raise WorkflowError(
            f"a workflow is a dict, JSON text or a file, got {type(source).__name__}", rule="malformed"
        )
    if "nodes" in data and "links" in data:
        return _editor_to_api(data)
    if "prompt" in data and isinstance(data["prompt"], Mapping):  # the body of ComfyUI's POST /prompt
        data = data["prompt"]
    if not data or not all(isinstance(v, Mapping) and "class_type" in v for v in data.values()):
        raise WorkflowError(
            "not a ComfyUI workflow: expected the API format {node id: {class_type, inputs}} or the "
            "editor's format with nodes and links",
            rule="malformed",
        )
    graph = {}
    for node_id, node in data.items():
        inputs = node.get("inputs", {})
        if not isinstance(inputs, Mapping) or not isinstance(node["class_type"], str):
            raise WorkflowError(
                "needs a class_type string and an inputs object", node_id=str(node_id), rule="malformed"
            )
        graph[str(node_id)] = {"class_type": node["class_type"], "inputs": dict(inputs)}
    return graph, (), ()


def _parse_json(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"{what} is not valid JSON ({exc})", rule="malformed") from None


@dataclass
class _EditorLink:
    origin: str
    origin_slot: int
    target: str
    target_slot: int


def _editor_to_api(data: Mapping) -> tuple[dict, tuple[tuple[str, str], ...], tuple[str, ...]]:
    nodes, links = data.get("nodes"), data.get("links")
    if not isinstance(nodes, list) or not isinstance(links, list):
        raise WorkflowError("the editor's format needs lists 'nodes' and 'links'", rule="malformed")
    subgraphs = {
        str(s.get("id"))
        for s in ((data.get("definitions") or {}).get("subgraphs") or [])
        if isinstance(s, Mapping)
    }
    by_id: dict[str, Mapping] = {}
    for node in nodes:
        if not isinstance(node, Mapping) or "id" not in node or not isinstance(node.get("type"), str):
            raise WorkflowError("every node needs an id and a type", rule="malformed")
        by_id[str(node["id"])] = node
    table: dict[int, _EditorLink] = {}
    for link in links:
        if isinstance(link, Mapping):  # schema 1.0: link objects
            parts = [link.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot")]
        elif isinstance(link, list) and len(link) >= 5:  # schema 0.4: [id, origin, slot, target, slot, type]
            parts = link[:5]
        else:
            raise WorkflowError(
                f"link {link!r} is neither [id, origin, slot, target, slot, type] nor an object",
                rule="malformed",
            )
        table[parts[0]] = _EditorLink(str(parts[1]), int(parts[2]), str(parts[3]), int(parts[4]))

    editor_only: list[tuple[str, str]] = []
    notes: list[str] = []
    graph: dict[str, dict] = {}
    for node_id, node in by_id.items():
        class_type, mode = node["type"], node.get("mode", 0)
        if class_type in ANNOTATIONS:
            editor_only.append((node_id, class_type))
            continue
        if class_type in ("Reroute", "PrimitiveNode"):
            continue  # resolved where they are used
        where = {"node_id": node_id, "class_type": class_type}
        if class_type in subgraphs:
            raise WorkflowError(
                "is a subgraph; unpack it in the editor (right-click, Unpack Subgraph) or export the "
                "API format",
                **where,
            )
        if mode == 2:  # "Never": FE graphToPrompt leaves it out
            editor_only.append((node_id, f"{class_type} (muted)"))
            continue
        if mode == 4:
            notes.append(f"node {node_id} ({class_type}) is bypassed: its inputs pass through, as in ComfyUI")
            continue
        if mode != 0:
            raise WorkflowError(f"mode {MODES.get(mode, mode)!r} is not supported; set it to Always", **where)
        spec = _spec(node_id, class_type)
        inputs = _widget_values(node_id, class_type, spec, node.get("widgets_values"))
        for entry in node.get("inputs") or []:
            if not isinstance(entry, Mapping) or entry.get("link") is None:
                continue
            name = entry.get("name")
            resolved = _resolve_link(entry["link"], entry.get("type"), table, by_id, node_id)
            if resolved is None:  # a bypassed node without a matching input: FE drops the connection
                continue
            if resolved[0] == "muted":
                muted = resolved[1]
                raise WorkflowError(
                    f"comes from node {muted} ({by_id[muted]['type']}), which is muted (mode Never): ComfyUI "
                    "drops that connection; unmute it, or bypass it to pass its input through",
                    input_name=name, **where,
                )  # fmt: skip
            inputs[name] = resolved[1] if resolved[0] == "value" else [resolved[1], resolved[2]]
        graph[node_id] = {"class_type": class_type, "inputs": inputs}
    return graph, tuple(editor_only), tuple(notes)


def _widget_values(node_id: str, class_type: str, spec: _Node, values) -> dict:
    """Widget values by name: the editor saves them by position, in the upstream input order."""
    if values is None:
        values = []
    if isinstance(values, Mapping):  # some editor versions save named values
        unknown = sorted(k for k in values if spec.input(k) is None or spec.input(k).is_link)
        if unknown:
            raise WorkflowError(
                f"widgets_values names {', '.join(unknown)}, not widgets of the node ({spec.source})",
                node_id=node_id, class_type=class_type, rule="malformed",
            )  # fmt: skip
        return dict(values)
    if not isinstance(values, list):
        raise WorkflowError(
            "widgets_values must be a list", node_id=node_id, class_type=class_type, rule="malformed"
        )
    out, i = {}, 0
    for widget in spec.widgets:
        if i >= len(values):
            break  # missing ones are reported (required) or defaulted (optional) by the plan
        if not widget.editor_only:
            out[widget.name] = values[i]
        i += 1
        if widget.control and i < len(values) and values[i] in CONTROL_VALUES:
            i += 1
    if i < len(values):
        names = ", ".join(w.name for w in spec.widgets if not w.editor_only)
        raise WorkflowError(
            f"widgets_values has {len(values)} values, more than the node's widgets ({names}) in "
            f"{spec.source}; a newer version of the node? Export the workflow in the API format",
            node_id=node_id, class_type=class_type, rule="malformed",
        )  # fmt: skip
    return out


def _resolve_link(link_id, want_type, table: dict, by_id: dict, consumer: str):
    """("node", id, slot), ("value", v) from a PrimitiveNode, ("muted", id), or None (dropped)."""
    seen = set()
    while True:
        if link_id in seen or link_id not in table:
            raise WorkflowError(f"link {link_id} is missing or loops", node_id=consumer, rule="malformed")
        seen.add(link_id)
        link = table[link_id]
        origin = by_id.get(link.origin)
        if origin is None:
            raise WorkflowError(
                f"link {link_id} comes from node {link.origin}, which is not in the workflow",
                node_id=consumer,
                rule="malformed",
            )
        if origin["type"] == "PrimitiveNode":
            return "value", (origin.get("widgets_values") or [None])[0]
        if origin["type"] == "Reroute":
            link_id = _input_link(origin, 0)
        elif origin.get("mode", 0) == 4:  # FE: the same slot index first, then any input of the same type
            inputs = origin.get("inputs") or []
            order = [link.origin_slot, *range(len(inputs))]
            match = next((i for i in order if i < len(inputs) and inputs[i].get("type") == want_type), None)
            if match is None:
                return None
            link_id = _input_link(origin, match)
        elif origin.get("mode", 0) == 2:
            return "muted", link.origin
        else:
            return "node", link.origin, link.origin_slot
        if link_id is None:
            return None


def _input_link(node: Mapping, index: int):
    inputs = node.get("inputs") or []
    return inputs[index].get("link") if index < len(inputs) else None


def _spec(node_id: str, class_type: str) -> _Node:
    spec = NODES.get(class_type)
    if spec is None:
        raise WorkflowError(
            f"is not a node the pipeline can run; supported: {', '.join(NODES)}",
            node_id=node_id, class_type=class_type,
        )  # fmt: skip
    return spec


# -- node-level overrides --------------------------------------------------------------------------


def parse_assignment(text: str) -> tuple[str, str]:
    """ "3.seed=42" (the CLI's --set) -> ("3.seed", "42"); the value is converted by the input's type."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key or not key.rsplit(".", 1)[1]:
        raise ParameterError("set", f"{text!r}: use node.input=value, e.g. 3.seed=42")
    return key.strip(), value


def apply_node_overrides(graph: Mapping, values: Mapping[str, Any]) -> dict:
    """A copy of `graph` with {"<node id>.<input>": value} set; only widget values, not connections."""
    out = copy.deepcopy(dict(graph))
    for key, value in values.items():
        node_id, _, name = key.rpartition(".")
        if node_id not in out:
            raise WorkflowError(
                f"no node {node_id} in the workflow (nodes: {', '.join(sorted(out, key=_id_order))})",
                node_id=node_id, input_name=name, rule="malformed",
            )  # fmt: skip
        class_type = out[node_id]["class_type"]
        where = {"node_id": node_id, "class_type": class_type, "input_name": name}
        spec = _spec(node_id, class_type)
        inp = spec.input(name)
        if inp is None:
            names = ", ".join(i.name for i in spec.inputs if not i.is_link and not i.editor_only)
            raise WorkflowError(
                f"is not an input of {class_type}; its values: {names}", rule="malformed", **where
            )
        if inp.is_link:
            raise WorkflowError("is a connection; only widget values can be set", rule="malformed", **where)
        out[node_id]["inputs"][name] = _coerce(value, inp, where)
    return out


def _coerce(value, inp: _In, where: dict):
    if not isinstance(value, str) or inp.type in ("STRING", "NAME", "COMBO"):
        return value
    try:
        if inp.type == "INT":
            return int(value)
        if inp.type == "FLOAT":
            return float(value)
        if inp.type == "BOOLEAN" and value.lower() in ("true", "false"):
            return value.lower() == "true"
    except ValueError:
        pass
    raise WorkflowError(f"{value!r} is not a {inp.type.lower()}", rule="malformed", **where)


def _id_order(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


# -- graph -> plan ---------------------------------------------------------------------------------


def plan_workflow(workflow, overrides: Mapping[str, Any] | None = None) -> WorkflowPlan:
    """The `WorkflowPlan` of a workflow (API or editor format: dict, JSON text or file; or a plan),
    with `overrides` on top (see `WorkflowPlan.with_overrides`). Raises `WorkflowError` for a graph
    the pipeline can't run; nothing is loaded."""
    if isinstance(workflow, WorkflowPlan):
        plan = workflow
    else:
        graph, editor_only, notes = load_workflow(workflow)
        plan = _plan(graph, editor_only, notes)
        for node_id, class_type in plan.unused:
            if class_type in ANNOTATIONS:
                continue
            log.warning(
                "workflow node %s (%s) is not connected to the output; ComfyUI does not run it either",
                node_id,
                class_type,
            )
        for note in plan.notes:
            log.info("workflow: %s", note)
    return plan.with_overrides(overrides) if overrides else plan


class _Graph:
    """The API-format graph with its checks: every node known, every input valid for its definition."""

    def __init__(self, graph: Mapping):
        self.nodes = graph
        for node_id, node in graph.items():
            _spec(node_id, node["class_type"])
        for node_id in graph:
            self._check_node(node_id)
        self._check_acyclic()

    def cls(self, node_id: str) -> str:
        return self.nodes[node_id]["class_type"]

    def where(self, node_id: str, name: str | None = None) -> dict:
        return {"node_id": node_id, "class_type": self.cls(node_id), "input_name": name}

    def error(self, node_id: str, name: str | None, message: str, rule: str = "unsupported") -> WorkflowError:
        return WorkflowError(message, rule=rule, **self.where(node_id, name))

    def _check_node(self, node_id: str) -> None:
        spec = NODES[self.cls(node_id)]
        inputs = self.nodes[node_id]["inputs"]
        for name, value in inputs.items():
            inp = spec.input(name)
            if inp is None:
                known = ", ".join(i.name for i in spec.inputs if not i.editor_only)
                raise self.error(
                    node_id, name, f"is not an input of {self.cls(node_id)} ({spec.source}: {known})"
                )
            if _is_link(value):
                self._check_link(node_id, inp, value)
            elif inp.is_link:
                raise self.error(
                    node_id,
                    name,
                    f"must be a connection from a {inp.type} output, got {value!r}",
                    "malformed",
                )
            else:
                _check_value(value, inp, self.where(node_id, name))
        for inp in spec.inputs:
            if inp.required and not inp.editor_only and inp.name not in inputs:
                raise self.error(node_id, inp.name, "is required but missing", "malformed")

    def _check_link(self, node_id: str, inp: _In, value) -> None:
        origin, slot = str(value[0]), value[1]
        if origin not in self.nodes:
            raise self.error(
                node_id, inp.name, f"comes from node {origin}, which is not in the workflow", "malformed"
            )
        outputs = NODES[self.cls(origin)].outputs
        if not inp.is_link:
            raise self.error(
                node_id, inp.name,
                f"is connected to node {origin} ({self.cls(origin)}); the pipeline takes a value here, "
                "not a connection",
            )  # fmt: skip
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < len(outputs):
            raise self.error(
                node_id, inp.name, f"comes from output {slot!r} of node {origin}, which has none", "malformed"
            )
        if outputs[slot] != inp.type:
            raise self.error(
                node_id, inp.name,
                f"takes {inp.type} but node {origin} ({self.cls(origin)}) output {slot} is {outputs[slot]}",
                "malformed",
            )  # fmt: skip

    def _check_acyclic(self) -> None:
        """ComfyUI refuses a loop ("dependency cycle"); so does the plan, naming the input that closes it."""
        done: set[str] = set()
        for root in sorted(self.nodes, key=_id_order):
            if root in done:
                continue
            path, stack = {root}, [(root, iter(self._links(root)))]
            while stack:
                node_id, pending = stack[-1]
                step = next(pending, None)
                if step is None:
                    stack.pop()
                    path.discard(node_id)
                    done.add(node_id)
                    continue
                name, origin = step
                if origin in path:
                    raise self.error(node_id, name, f"closes a loop through node {origin}", "malformed")
                if origin not in done:
                    path.add(origin)
                    stack.append((origin, iter(self._links(origin))))

    def _links(self, node_id: str) -> list[tuple[str, str]]:
        return [(k, str(v[0])) for k, v in self.nodes[node_id]["inputs"].items() if _is_link(v)]

    def value(self, node_id: str, name: str):
        inp = NODES[self.cls(node_id)].input(name)
        value = self.nodes[node_id]["inputs"].get(name, inp.default)
        if isinstance(value, Mapping) and "__value__" in value:
            value = value["__value__"]
        # JSON writes 1.0 as 1: FLOAT inputs become floats, so parameters read the same either way.
        return float(value) if inp.type == "FLOAT" and value is not None else value

    def origin(self, node_id: str, name: str) -> tuple[str, int] | None:
        value = self.nodes[node_id]["inputs"].get(name)
        return (str(value[0]), value[1]) if _is_link(value) else None

    def source(self, node_id: str, name: str, allowed: Sequence[str]) -> str:
        """The node feeding input `name`, which must be one of `allowed`."""
        origin = self.origin(node_id, name)
        if origin is None:
            raise self.error(node_id, name, "is not connected", "malformed")
        if self.cls(origin[0]) not in allowed:
            raise self.error(
                node_id, name,
                f"comes from node {origin[0]} ({self.cls(origin[0])}); supported there: {', '.join(allowed)}",
            )  # fmt: skip
        return origin[0]

    def ancestors(self, roots: Sequence[str]) -> set[str]:
        seen, todo = set(), list(roots)
        while todo:
            node_id = todo.pop()
            if node_id in seen:
                continue
            seen.add(node_id)
            todo.extend(str(v[0]) for v in self.nodes[node_id]["inputs"].values() if _is_link(v))
        return seen

    def linked(self) -> set[str]:
        """Nodes with a connection in or out."""
        out = set()
        for node_id, node in self.nodes.items():
            for value in node["inputs"].values():
                if _is_link(value):
                    out.update((node_id, str(value[0])))
        return out


def _is_link(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and not isinstance(value[0], bool)
    )


def _check_value(value, inp: _In, where: dict) -> None:
    if isinstance(value, Mapping) and "__value__" in value:
        value = value["__value__"]
    kind = inp.type
    if kind == "INT":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "FLOAT":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind == "BOOLEAN":
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise WorkflowError(f"{value!r} is not a {kind.lower()}", rule="malformed", **where)
    if inp.options is not None and value not in inp.options:
        raise WorkflowError(
            f"{value!r} is not one of {', '.join(map(str, inp.options))}", rule="malformed", **where
        )
    if inp.low is not None and not inp.low <= value <= inp.high:
        raise WorkflowError(
            f"{value} is outside the node's range [{inp.low}, {inp.high}]", rule="malformed", **where
        )


def _plan(graph: Mapping, editor_only: tuple = (), editor_notes: tuple = ()) -> WorkflowPlan:
    g = _Graph(graph)
    notes: list[str] = list(editor_notes)
    sources: dict[str, str] = {}

    # The output: one image result, saved or previewed by any number of nodes.
    outputs = sorted((n for n in g.nodes if g.cls(n) in OUTPUT_NODES), key=_id_order)
    if not outputs:
        raise WorkflowError(f"the workflow has no output node ({', '.join(OUTPUT_NODES)})")
    feeds = {n: g.origin(n, "images") for n in outputs}
    first = outputs[0]
    for other in outputs[1:]:
        if feeds[other] != feeds[first]:
            raise g.error(
                other, "images",
                f"saves another image than node {first} ({g.cls(first)}); the pipeline makes one result: "
                "keep one output branch",
            )  # fmt: skip
    decode = g.source(first, "images", ("VAEDecode",))

    # Everything else must be a leftover ComfyUI would not run either: a node on its own.
    used = g.ancestors(outputs)
    linked = g.linked()
    branch = sorted((n for n in g.nodes if n not in used and n in linked), key=_id_order)
    if branch:
        names = ", ".join(f"{n} ({g.cls(n)})" for n in branch)
        raise g.error(
            branch[0], None,
            f"nodes {names} are connected to each other but not to the output {first} ({g.cls(first)}); "
            "the pipeline runs one edit: delete them or connect them",
        )  # fmt: skip
    unused = tuple((n, g.cls(n)) for n in sorted(g.nodes, key=_id_order) if n not in used) + tuple(
        editor_only
    )

    sampler = g.source(decode, "samples", SAMPLERS)
    vae_node = g.source(decode, "vae", ("VAELoader",))
    vae = g.value(vae_node, "vae_name")
    params = _sampler_params(g, sampler, sources, notes)

    # The model: loader, then patches in any order (their effects commute).
    loras_reversed, patches = [], {}
    node = g.source(sampler, "model", (*TRANSFORMER_LOADERS, *MODEL_PATCHES))
    seen = set()
    while g.cls(node) in MODEL_PATCHES:
        if node in seen:
            raise g.error(node, "model", "the model connections form a loop", "malformed")
        seen.add(node)
        cls = g.cls(node)
        if cls in LORA_NODES:
            loras_reversed.append(node)
        elif cls in patches:
            raise g.error(node, None, f"a second {cls} (node {patches[cls]} is the first); keep one")
        else:
            patches[cls] = node
        node = g.source(node, "model", (*TRANSFORMER_LOADERS, *MODEL_PATCHES))
    loader_node = node
    for cls, why in (
        ("ModelSamplingAuraFlow", "without it ComfyUI samples with the model's default Flux-style shift, "
         "which the pipeline does not reproduce"),
        ("CFGNorm", f"the pipeline applies CFGNorm(strength={CFG_NORM_STRENGTH}) in every edit"),
    ):  # fmt: skip
        if cls not in patches:
            raise g.error(
                sampler, "model", f"the model reaches the sampler without {cls}: {why}; add a {cls} node"
            )
    aura, norm = patches["ModelSamplingAuraFlow"], patches["CFGNorm"]
    params["shift"] = g.value(aura, "shift")
    sources["shift"] = f"{aura}.shift"
    cfg_norm_strength = g.value(norm, "strength")
    if cfg_norm_strength != CFG_NORM_STRENGTH:
        raise g.error(
            norm, "strength", f"{cfg_norm_strength} is not supported; supported: {CFG_NORM_STRENGTH}"
        )
    sources["cfg_norm_strength"] = f"{norm}.strength"

    models, loader = {}, LoaderOptions()
    if g.cls(loader_node) == "NunchakuQwenImageDiTLoader":
        models["transformer"] = g.value(loader_node, "model_name")
        sources["transformer"] = f"{loader_node}.model_name"
        loader = LoaderOptions(
            g.value(loader_node, "cpu_offload"),
            g.value(loader_node, "num_blocks_on_gpu"),
            g.value(loader_node, "use_pin_memory") == "enable",
        )
        sources.update(
            {k: f"{loader_node}.{k}" for k in ("cpu_offload", "num_blocks_on_gpu", "use_pin_memory")}
        )
    else:
        dtype = g.value(loader_node, "weight_dtype")
        if dtype != "default":
            raise g.error(
                loader_node,
                "weight_dtype",
                f"{dtype!r} is not supported; supported: default (the file's own weights)",
            )
        models["transformer"] = g.value(loader_node, "unet_name")
        sources["transformer"] = f"{loader_node}.unet_name"
    loras = _loras(g, list(reversed(loras_reversed)), g.cls(loader_node), notes)

    # Conditioning: positive and negative TextEncodeQwenImageEditPlus on the same encoder, VAE and pictures.
    positive = g.source(sampler, "positive", ("TextEncodeQwenImageEditPlus",))
    negative = g.source(sampler, "negative", ("TextEncodeQwenImageEditPlus",))
    clip_node = g.source(positive, "clip", ("CLIPLoader",))
    clip = _text_encoder(g, clip_node, notes)
    models["text_encoder"], models["vae"] = clip, vae
    sources.update(text_encoder=f"{clip_node}.clip_name", vae=f"{vae_node}.vae_name")
    _same_vae(g, positive, vae, vae_node)
    images = _image_slots(g, positive, sources)
    params["prompt"], params["negative_prompt"] = g.value(positive, "prompt"), g.value(negative, "prompt")
    sources.update(prompt=f"{positive}.prompt", negative_prompt=f"{negative}.prompt")
    if needs_uncond(params["cfg"]):
        _same_conditioning(g, positive, negative, clip, vae, vae_node)
    elif negative != positive:
        notes.append(f"cfg is 1: the negative conditioning (node {negative}) is not evaluated, as in ComfyUI")

    latent = _latent(g, sampler, images[0], vae, vae_node, params, sources)
    try:
        edit_params = EditParams(**params)
    except ParameterError as exc:
        origin = sources.get(exc.field)
        if origin is None:
            raise WorkflowError(str(exc)) from None
        node_id, _, name = origin.rpartition(".")
        raise g.error(node_id, name, str(exc).split(": ", 1)[-1]) from None

    output = OutputSpec(
        tuple(outputs),
        g.cls(first),
        next((g.value(n, "filename_prefix") for n in outputs if g.cls(n) == "SaveImage"), "ComfyUI"),
    )
    return WorkflowPlan(
        models=models, loader=loader, loras=loras, images=images, params=edit_params, latent=latent,
        output=output, cfg_norm_strength=cfg_norm_strength, sources=sources, unused=unused,
        notes=tuple(notes), graph=graph, editor=(editor_only, editor_notes),
    )  # fmt: skip


def _sampler_params(g: _Graph, sampler: str, sources: dict, notes: list) -> dict:
    params = {}
    seed_input = "seed" if g.cls(sampler) == "KSampler" else "noise_seed"
    for name, given in (("seed", seed_input), ("steps", "steps"), ("cfg", "cfg")):
        params[name] = g.value(sampler, given)
        sources[name] = f"{sampler}.{given}"
    for name, allowed in (("sampler_name", SAMPLER_NAMES), ("scheduler", SCHEDULER_NAMES)):
        value = g.value(sampler, name)
        if value not in allowed:
            raise g.error(sampler, name, f"{value!r} is not supported; supported: {', '.join(allowed)}")
        params[name] = value
        sources[name] = f"{sampler}.{name}"
    if g.cls(sampler) == "KSampler":
        params["denoise"] = g.value(sampler, "denoise")
        sources["denoise"] = f"{sampler}.denoise"
        return params
    # KSamplerAdvanced: the whole schedule from the first step with fresh noise is KSampler's denoise 1
    # (comfy/samplers.py KSampler.sample: last_step >= steps keeps every sigma, and the last one is 0).
    if g.value(sampler, "add_noise") != "enable":
        raise g.error(sampler, "add_noise", "'disable' is not supported; supported: enable")
    if g.value(sampler, "start_at_step") != 0:
        raise g.error(
            sampler, "start_at_step", f"{g.value(sampler, 'start_at_step')} is not supported; supported: 0"
        )
    if g.value(sampler, "end_at_step") < params["steps"]:
        raise g.error(
            sampler, "end_at_step",
            f"{g.value(sampler, 'end_at_step')} stops before the last of {params['steps']} steps; "
            "supported: >= steps",
        )  # fmt: skip
    if g.value(sampler, "return_with_leftover_noise") == "enable":
        notes.append(
            f"node {sampler}: return_with_leftover_noise has no effect when sampling runs to the end"
        )
    params["denoise"] = 1.0
    return params


def _loras(g: _Graph, nodes: list[str], loader_class: str, notes: list) -> tuple[LoraSpec, ...]:
    out = []
    for node in nodes:
        cls = g.cls(node)
        if cls == "LoraLoaderModelOnly":
            entries = [("lora_name", "strength_model")]
            if loader_class == "NunchakuQwenImageDiTLoader":
                notes.append(
                    f"node {node} (LoraLoaderModelOnly): applied; in ComfyUI it has no effect on a Nunchaku "
                    "model (ComfyUI-nunchaku's patcher ignores weight patches)"
                )
        elif cls == "NunchakuQwenImageLoraLoader":
            entries = [("lora_name", "lora_strength")]
        else:  # the stack reads only its first lora_count slots (QL load_lora_stack)
            entries = [
                (f"lora_name_{i}", f"lora_strength_{i}") for i in range(1, g.value(node, "lora_count") + 1)
            ]
        if cls != "LoraLoaderModelOnly":
            notes.append(
                f"node {node} ({cls}): LoRAs apply on every layer with ComfyUI's alpha/rank scale; "
                "cpu_offload and save_precompiled_lora only concern the node's memory and cache"
            )
        for name_input, strength_input in entries:
            name, strength = g.value(node, name_input), g.value(node, strength_input)
            # Upstream skips: LoraLoader at strength 0, QL at |strength| <= 1e-5 and the name "None".
            if name in (None, "", "None") or abs(strength) <= (0.0 if cls == "LoraLoaderModelOnly" else 1e-5):
                continue
            out.append(LoraSpec(name, float(strength), node, name_input))
    return tuple(out)


def _text_encoder(g: _Graph, clip_node: str, notes: list) -> str:
    kind = g.value(clip_node, "type")
    if kind != "qwen_image":
        raise g.error(clip_node, "type", f"{kind!r} is not supported; supported: qwen_image")
    if g.value(clip_node, "device") == "cpu":
        notes.append(
            f"node {clip_node} (CLIPLoader): device 'cpu' is a memory setting; the pipeline places the "
            "encoder itself"
        )
    return g.value(clip_node, "clip_name")


def _same_vae(g: _Graph, node: str, vae: str, vae_node: str) -> None:
    if g.origin(node, "vae") is None:
        raise g.error(
            node, "vae",
            "is not connected: ComfyUI then attaches no reference latents, while the pipeline always does; "
            f"connect the VAE (node {vae_node})",
        )  # fmt: skip
    other = g.source(node, "vae", ("VAELoader",))
    if g.value(other, "vae_name") != vae:
        raise g.error(
            node,
            "vae",
            f"uses {g.value(other, 'vae_name')!r} but VAEDecode uses {vae!r}; the pipeline has one VAE",
        )


def _image_slots(g: _Graph, encoder: str, sources: dict) -> tuple[ImageSlot, ...]:
    slots = []
    for k in range(1, MAX_IMAGES + 1):
        origin = g.origin(encoder, f"image{k}")
        if origin is None:
            continue
        if len(slots) != k - 1:
            raise g.error(
                encoder, f"image{k}",
                "follows an empty slot: ComfyUI numbers pictures by slot, the pipeline 1..n; "
                "connect the pictures to image1, image2, image3 in order",
            )  # fmt: skip
        slots.append(_image_chain(g, encoder, f"image{k}", k))
        sources[f"images[{k - 1}]"] = f"{slots[-1].node_id}.image"
    if not slots:
        raise g.error(encoder, "image1", "no picture is connected; the edit takes 1 to 3")
    return tuple(slots)


def _image_chain(g: _Graph, node: str, name: str, slot: int) -> ImageSlot:
    source = g.source(node, name, ("LoadImage", *SCALE_NODES))
    ops, current = [], source
    while g.cls(current) in SCALE_NODES:
        method = g.value(current, "upscale_method")
        if method != "lanczos":
            raise g.error(
                current, "upscale_method",
                f"{method!r} is not supported; supported: lanczos (the pipeline takes 8-bit pictures, "
                "which only the lanczos path keeps exact)",
            )  # fmt: skip
        cls = g.cls(current)
        if cls == "ImageScaleToTotalPixels":
            op = ImageOp(
                current,
                cls,
                megapixels=g.value(current, "megapixels"),
                resolution_steps=g.value(current, "resolution_steps"),
            )
        elif cls == "ImageScale":
            op = ImageOp(
                current,
                cls,
                width=g.value(current, "width"),
                height=g.value(current, "height"),
                crop=g.value(current, "crop"),
            )
        else:
            op = ImageOp(current, cls, scale_by=g.value(current, "scale_by"))
        ops.append(op)
        current = g.source(current, "image", ("LoadImage", *SCALE_NODES))
    return ImageSlot(slot, g.value(current, "image"), current, tuple(reversed(ops)), source)


def _same_conditioning(g: _Graph, positive: str, negative: str, clip: str, vae: str, vae_node: str) -> None:
    """At cfg != 1 the negative is evaluated: the pipeline encodes it with the positive's pictures."""
    if negative == positive:
        return
    clip_node = g.source(negative, "clip", ("CLIPLoader",))
    if g.value(clip_node, "clip_name") != clip or g.value(clip_node, "type") != "qwen_image":
        raise g.error(
            negative,
            "clip",
            f"uses another text encoder than the positive (node {positive}); the pipeline has one",
        )
    _same_vae(g, negative, vae, vae_node)
    for k in range(1, MAX_IMAGES + 1):
        if g.origin(negative, f"image{k}") != g.origin(positive, f"image{k}"):
            raise g.error(
                negative, f"image{k}",
                f"differs from image{k} of the positive (node {positive}); the pipeline encodes the negative "
                "prompt with the same pictures",
            )  # fmt: skip


def _latent(
    g: _Graph, sampler: str, first: ImageSlot, vae: str, vae_node: str, params: dict, sources: dict
) -> LatentSpec:
    node = g.source(sampler, "latent_image", LATENT_NODES)
    cls = g.cls(node)
    if cls != "VAEEncode":
        if params["denoise"] < 1.0:
            raise g.error(
                sampler, "denoise",
                f"{params['denoise']} with an empty latent (node {node}) is not supported: ComfyUI then "
                "starts from noise around a zero latent, the pipeline's denoise < 1 from picture 1; use "
                "denoise 1, or VAEEncode of image1 as the latent",
            )  # fmt: skip
        for name in ("width", "height", "batch_size"):
            params[name] = g.value(node, name)
            sources[name] = f"{node}.{name}"
        return LatentSpec("empty", node, cls)
    encoder_vae = g.source(node, "vae", ("VAELoader",))
    if g.value(encoder_vae, "vae_name") != vae:
        raise g.error(
            node,
            "vae",
            f"uses {g.value(encoder_vae, 'vae_name')!r} but VAEDecode uses {vae!r}; the pipeline has one VAE",
        )
    params.update(width=None, height=None, batch_size=1)
    pixels = g.origin(node, "pixels")
    if pixels[0] == first.source:
        return LatentSpec("image1", node, cls)
    if g.cls(pixels[0]) == "ImageScaleToTotalPixels" and g.origin(pixels[0], "image") == (first.source, 0):
        scale = pixels[0]
        if g.value(scale, "upscale_method") != "lanczos":
            raise g.error(
                scale,
                "upscale_method",
                f"{g.value(scale, 'upscale_method')!r} is not supported; supported: lanczos",
            )
        steps = g.value(scale, "resolution_steps")
        if steps not in (None, 1):
            raise g.error(
                scale, "resolution_steps", f"{steps} is not supported for the output latent; supported: 1"
            )
        op = ImageOp(
            scale, "ImageScaleToTotalPixels", megapixels=g.value(scale, "megapixels"), resolution_steps=steps
        )
        return LatentSpec("image1", node, cls, op)
    raise g.error(
        node, "pixels",
        f"comes from node {pixels[0]} ({g.cls(pixels[0])}); the pipeline makes the output latent from "
        f"picture 1 (node {first.source}, image1 of the text encoder), optionally through "
        "ImageScaleToTotalPixels",
    )  # fmt: skip


# -- model files -----------------------------------------------------------------------------------


KINDS = {"transformer": "diffusion_models", "text_encoder": "text_encoders", "vae": "vae"}


@dataclass(frozen=True)
class WorkflowFiles:
    transformer: Path
    text_encoder: Path
    vae: Path
    loras: list[tuple[str, float]]


def model_source(models) -> tuple[ModelFolders, dict]:
    """(folders, from_files defaults) from a ComfyUI models/ folder, a settings file or dict, a
    `Settings` or a `ModelFolders`. Settings also give device, backend, compute, compile, tokenizer."""
    from .settings import Settings, load_settings

    if isinstance(models, ModelFolders):
        return models, {}
    if isinstance(models, (str, Path)) and Path(models).is_dir():
        return ModelFolders.from_base(models), {}
    settings = models if isinstance(models, Settings) else load_settings(models)
    # Not settings.pipeline_kwargs(): it resolves the settings' own model names; the workflow's replace them.
    defaults = {
        "device": None if settings.device == "auto" else settings.device,
        "backend": settings.backend,
        "compute": settings.compute,
        "text_encoder_compute": settings.text_encoder_compute,
        "compile": settings.compile,
    }
    tokenizer = settings.models.get("tokenizer")
    if tokenizer is not None:
        defaults["tokenizer"] = settings.folders.resolve("tokenizers", tokenizer)
    if getattr(settings, "text_encoder_config", None) is not None:  # the demo's tiny encoder
        defaults["text_encoder_config"] = settings.text_encoder_config
    return settings.folders, defaults


def _resolve(folders: ModelFolders, kind: str, name: str, field_name: str, class_type: str) -> Path:
    check_model_name(name, field_name)
    try:
        return folders.resolve(kind, name)
    except ModelNotFoundError as exc:
        error = ModelNotFoundError(f"{field_name} ({class_type}): {exc}", field=field_name, name=name)
        raise error from None


def resolve_models(plan: WorkflowPlan, folders: ModelFolders) -> WorkflowFiles:
    """Every model and LoRA name of the plan as a file inside `folders`; raises ModelNotFoundError or
    UnsafeModelNameError naming the node before anything loads."""
    paths = {}
    for slot, kind in KINDS.items():
        origin = plan.sources[slot]
        node_id = origin.rpartition(".")[0]
        paths[slot] = _resolve(
            folders, kind, plan.models[slot], f"workflow.{origin}", plan.graph[node_id]["class_type"]
        )
    return WorkflowFiles(**paths, loras=resolve_loras(plan, folders))


def resolve_loras(plan: WorkflowPlan, folders: ModelFolders | None) -> list[tuple[str, float]]:
    """[(path, strength)] of the plan's LoRAs, in stack order, for `set_loras`."""
    out = []
    for lora in plan.loras:
        where = f"workflow.{lora.node_id}.{lora.input_name}" if lora.node_id else "loras"
        class_type = plan.graph[lora.node_id]["class_type"] if lora.node_id else "override"
        if folders is None:
            raise WorkflowError(
                f"no model folders to find LoRA {lora.name!r} in: pass models=... (a ComfyUI models folder "
                "or settings), or load the pipeline with from_workflow / from_config",
                node_id=lora.node_id, class_type=class_type if lora.node_id else None,
                input_name=lora.input_name if lora.node_id else None, rule="models",
            )  # fmt: skip
        out.append((str(_resolve(folders, "loras", lora.name, where, class_type)), lora.strength))
    return out


def check_loaded_models(plan: WorkflowPlan, loaded: Mapping[str, Path], folders: ModelFolders | None) -> None:
    """Raise ModelMismatchError unless the plan's model files are the `loaded` ones.

    With `folders`, names resolve to files and the files are compared; without, the names are compared
    with the loaded files' names (a name may carry sub-folders, as ComfyUI's do).
    """
    differences, first = {}, None
    for slot in KINDS:
        path = loaded.get(slot)
        if path is None:
            continue  # a pipeline built from modules: nothing to compare with
        name = plan.models[slot]
        origin = plan.sources[slot]
        node_id = origin.rpartition(".")[0]
        if folders is not None:
            wanted = _resolve(
                folders, KINDS[slot], name, f"workflow.{origin}", plan.graph[node_id]["class_type"]
            )
            same = Path(wanted).resolve() == Path(path).resolve()
        else:
            parts = Path(name).parts
            same = Path(path).parts[-len(parts) :] == parts
        if not same:
            differences[slot] = (name, str(path))
            first = first or origin
    if differences:
        node_id, _, name = first.rpartition(".")
        listed = "; ".join(f"{slot}: workflow {w!r}, loaded {p}" for slot, (w, p) in differences.items())
        raise ModelMismatchError(
            f"the workflow names other model files than this pipeline has loaded ({listed}); load them with "
            "QwenEditPipeline.from_workflow",
            differences, node_id=node_id, class_type=plan.graph[node_id]["class_type"], input_name=name,
        )  # fmt: skip
