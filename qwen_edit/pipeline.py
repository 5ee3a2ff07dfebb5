"""QwenEditPipeline: the whole edit, as the ComfyUI Qwen-Image-Edit-2509 workflow computes it.

The pipeline only orchestrates. Each stage lives in its own module:
    text conditioning   tokenizer.encode_edit_prompt   (TextEncodeQwenImageEditPlus)
    images in and out   conditioning                   (LoadImage, reference resize, SaveImage)
    latents             vae.encode_images / decode_latents
    the DiT call        model.comfy_forward            (ComfyUI's RoPE positions and timestep)
    sampling            sampling.sample                (ModelSamplingAuraFlow -> CFGNorm -> KSampler)
    LoRAs               lora.apply_loras
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import conditioning, offload, prefetch
from .errors import (
    EditCancelled,
    GPUOutOfMemoryError,
    ModelFileError,
    ModelNotFoundError,
    QwenEditError,
    kind_of,
)
from .hardware import default_device
from .lora import LoraReport, apply_loras, read_lora
from .model import comfy_forward
from .offload import OffloadPlan
from .params import MAX_IMAGES, EditParams, ParameterError
from .paths import ModelFolders
from .sampling import SamplingCancelled, needs_uncond, sample, x0_from_flow
from .settings import LoraSpec, ModelFiles, PipelineSpec, load_settings, resolve_spec
from .svdq.checkpoint import read_checkpoint

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, "torch.Tensor | None"], None]
MAX_MEGAPIXELS = 16.0

__all__ = ["EditCancelled", "EditResult", "GPUOutOfMemoryError", "QwenEditPipeline", "SamplingCancelled"]


@dataclass
class EditResult:
    """The images of one `edit` call, with what produced them and how long each stage took."""

    images: list[Image.Image]
    seed: int
    parameters: dict
    timings: dict = field(
        default_factory=dict
    )  # seconds: text_encode, vae_encode, steps [..], vae_decode, total

    def png_bytes(self, index: int = 0) -> bytes:
        """Image `index` as PNG, the generation parameters embedded as JSON (text chunk `parameters`)."""
        return self.encode(index)

    def metadata(self, index: int = 0, extra: Mapping | None = None) -> dict:
        """What image `index`'s PNG embeds: the parameters, its batch index, and `extra` (provenance)."""
        return {**self.parameters, "batch_index": index, **(extra or {})}

    def encode(self, index: int = 0, format: str = "PNG", extra: Mapping | None = None) -> bytes:
        """Image `index` as PNG with `metadata(index, extra)` embedded, or as JPEG / WebP (no metadata)."""
        return conditioning.encode_image(self.images[index], format, self.metadata(index, extra))

    def save(self, path: str | Path, extra: Mapping | None = None) -> list[Path]:
        """Write `path` itself for one image, `stem_0.png`, `stem_1.png`, ... for several; the suffix
        picks the format (.png, the default, with the parameters; .jpg/.jpeg/.webp without)."""
        path = Path(path)
        suffix = path.suffix.lower() or ".png"
        if suffix not in conditioning.IMAGE_FORMATS:
            raise ParameterError("path", f"unknown image suffix {suffix!r}; use one of .png, .jpg, .webp")
        path.parent.mkdir(parents=True, exist_ok=True)
        if len(self.images) == 1:
            targets = [path]
        else:
            targets = [
                path.with_name(f"{path.stem}_{i}{path.suffix or '.png'}") for i in range(len(self.images))
            ]
        for i, target in enumerate(targets):
            target.write_bytes(self.encode(i, conditioning.IMAGE_FORMATS[suffix], extra))
        return targets


class QwenEditPipeline:
    """Transformer + text encoder + tokenizer + VAE, and `edit()`.

    Build it with `from_files`, `from_spec` (a `settings.PipelineSpec`), `from_config` or `demo`;
    `info()` says what was loaded and how. Memory: `set_offload` (or the same three
    arguments of `from_files`) streams transformer blocks from CPU memory and keeps the text encoder and
    VAE off the GPU between their stages when the card needs it; `offload_plan` says what was chosen.
    """

    def __init__(
        self, transformer, text_encoder, tokenizer, vae, *, device=None, encoders_on_cpu: bool = False
    ):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.device = torch.device(device) if device is not None else default_device()
        self.encoders_on_cpu = encoders_on_cpu
        self.offload_plan: OffloadPlan | None = None
        self.loras: list[tuple[str, float]] = []  # (path, strength) as applied
        self.lora_specs: tuple[LoraSpec, ...] = ()  # the same, with the names results give them
        self.lora_report = LoraReport()  # what the LoRAs applied now reached, and what they could not
        self.files: ModelFiles | None = None  # set by from_files
        self.spec: PipelineSpec | None = None  # set by from_spec
        # What from_files was given and set_offload last asked for, so run_workflow changes only what differs.
        self.offload_settings: tuple[str, int, bool] | None = None
        # The folders model names resolve in (from_config, from_workflow): run_workflow finds LoRAs there.
        self.model_folders: ModelFolders | None = None
        self.load_seconds: dict[str, float] = {}  # per phase, set by from_files
        # The workflow's image budgets: references at ~1024x1024, the default output at 1 megapixel.
        # Only the demo changes them (a CPU can't run a tiny model at 1 MP "in seconds").
        self.reference_area = conditioning.REFERENCE_AREA
        self.output_megapixels = conditioning.OUTPUT_MEGAPIXELS
        resident = torch.device("cpu") if encoders_on_cpu else self.device
        for module in (text_encoder, vae):
            module.to(resident)

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_files(
        cls,
        *,
        transformer: str | Path,
        text_encoder: str | Path,
        vae: str | Path,
        tokenizer: str | Path | None = None,
        loras: Sequence[tuple[str | Path, float] | LoraSpec] = (),
        device: torch.device | str | None = None,
        backend: str = "auto",
        compute: str = "auto",
        text_encoder_compute: str = "upcast",
        cpu_offload: str = "auto",
        num_blocks_on_gpu: int = 1,
        use_pin_memory: bool = False,
        compile: bool = False,
        text_encoder_config: dict | str | Path | None = None,
    ) -> QwenEditPipeline:
        """Load the four files the ComfyUI workflow uses (plus the tokenizer folder) and any LoRAs.

        `tokenizer`: a folder with vocab.json, merges.txt and tokenizer_config.json (ComfyUI's bundled
        qwen25_tokenizer/) or the Hugging Face repo's tokenizer/ folder; None looks beside the text
        encoder file (`qwen25_tokenizer/`, `tokenizer/`) and in the Hugging Face cache.
        `cpu_offload` ("auto", "enable", "disable"), `num_blocks_on_gpu`, `use_pin_memory`: the
        ComfyUI-nunchaku loader's settings, see `set_offload`; decided before loading, so a model larger
        than the card never lands on it whole.
        `compile`: torch.compile the transformer blocks (portable backend), the text encoder's layers and
        (per image size, from a size's second use) the VAE: 1.7x faster fp8 steps, 2x faster text encoding
        on an H100, a 1.6x faster VAE on an H200, for compilation during the first edits
        (benchmarks/RESULTS.md). inductor caches its kernels on disk (TORCHINDUCTOR_CACHE_DIR), and the
        blocks' and encoder layers' compiled graphs are saved beside them, so a later process runs them
        without compiling (precompile.py).
        `compute`: the transformer's ("auto": fp8 on cards with fp8 tensor cores on the portable backend).
        `text_encoder_compute`: "upcast" (ComfyUI's numbers: fp8 weights, bf16 activations) or "fp8" (opt-in:
        activations rounded to fp8 as well; the conditioning moves a few %, and it was not faster on an
        H200; see `load_text_encoder`).
        `text_encoder_config`: only for encoders that are not the 7B one (the demo's tiny model).
        """
        clock = _PhaseClock()
        # Free RAM is read once, before the prefetch below fills the page cache, for both decisions.
        host_available = offload.host_available_bytes()
        # The disk starts on the model files while the imports below run (seconds each on a cold start).
        prefetch.start_prefetch([transformer, text_encoder, vae], host_available)
        from .text_encoder import load_text_encoder
        from .tokenizer import load_tokenizer
        from .transformer import load_transformer
        from .vae import load_vae

        clock.done("imports")
        device = torch.device(device) if device is not None else default_device()
        tokenizer_path = tokenizer if tokenizer is not None else find_tokenizer(Path(text_encoder))
        with _slot("transformer"):
            ckpt = read_checkpoint(transformer)  # the header, read once: planning and loading share it
        sizes = offload.file_sizes(ckpt, text_encoder, vae, device=device, backend=backend, compute=compute)
        plan = offload.plan_offload(
            cpu_offload=cpu_offload, num_blocks_on_gpu=num_blocks_on_gpu, use_pin_memory=use_pin_memory,
            budget=offload.vram_budget(device) if device.type == "cuda" else None,
            host_available=host_available, **sizes,
        )  # fmt: skip
        log.info("offload: %s", plan.reason)
        clock.done("plan")
        staging = torch.device("cpu") if plan.encoders_on_cpu else device
        with _slot("transformer"):
            model = load_transformer(
                ckpt, backend=backend, compute=compute, device=device, use_pin_memory=plan.use_pin_memory,
                num_blocks_on_gpu=plan.blocks_on_gpu if plan.streams_blocks else None, compile=compile,
            )  # fmt: skip
        clock.done("transformer")
        with _slot("text_encoder"):
            encoder = load_text_encoder(
                text_encoder, device=staging, compute=text_encoder_compute, config=text_encoder_config
            )
        clock.done("text_encoder")
        with _slot("tokenizer"):
            tokens = load_tokenizer(tokenizer_path)
        clock.done("tokenizer")
        with _slot("vae"):
            autoencoder = load_vae(vae, device=staging)
        clock.done("vae")
        pipe = cls(model, encoder, tokens, autoencoder, device=device, encoders_on_cpu=plan.encoders_on_cpu)
        pipe.files = ModelFiles(Path(transformer), Path(text_encoder), Path(vae), Path(tokenizer_path))
        pipe.load_seconds = clock.seconds
        if compile:
            from .text_encoder import compile_text_encoder
            from .vae import compile_vae

            compile_text_encoder(pipe.text_encoder)
            compile_vae(pipe.vae)  # static shapes, from a shape's second use (vae.CompileRepeatedShapes)
        pipe.offload_plan = plan
        pipe.offload_settings = (cpu_offload, num_blocks_on_gpu, use_pin_memory)
        if loras:
            pipe.set_loras(loras)
            clock.done("loras")
        return pipe

    @classmethod
    def from_spec(cls, spec: PipelineSpec) -> QwenEditPipeline:
        """Build from a resolved `settings.PipelineSpec` (`settings.resolve_spec`; the demo's:
        `testing.demo.demo_settings`): what the CLI, the worker and `from_config` load through."""
        pipe = cls.from_files(**spec.from_files_kwargs())
        if spec.demo:
            pipe._use_demo_sizes()
        pipe.spec = spec
        return pipe

    @classmethod
    def from_config(cls, config: str | Path | Mapping | list, **overrides: Any) -> QwenEditPipeline:
        """Build from a YAML file or dict: model folders (ComfyUI's extra_model_paths.yaml keys) and names.

        See `configs/` for examples; `settings.load_settings` documents the keys. `overrides` replace
        keyword arguments of `from_files` (device, backend, compute, cpu_offload, loras, ...); a model
        override is a file path or a name in the model folders.
        """
        text_encoder_config = overrides.pop("text_encoder_config", None)
        settings = load_settings(config)
        spec = resolve_spec(settings, allow_paths=True, **overrides)
        if text_encoder_config is not None:
            spec = spec.replace(text_encoder_config=text_encoder_config)
        pipe = cls.from_spec(spec)
        pipe.model_folders = settings.folders
        return pipe

    @classmethod
    def from_workflow(
        cls,
        workflow: str | Path | Mapping,
        models: str | Path | Mapping | ModelFolders | object,
        *,
        overrides: Mapping | None = None,
        **kwargs,
    ) -> QwenEditPipeline:
        """Load what a ComfyUI workflow's loader nodes name: its model files, LoRAs and offload settings.

        `workflow`: API or editor format (dict, JSON text or a .json file), or a `WorkflowPlan`.
        `models`: where the names resolve, as ComfyUI does: a ComfyUI `models/` folder, a settings file
        or dict (`extra_model_paths.yaml` sections; its device, backend, compute, compile and tokenizer
        are used too), a `Settings` or a `ModelFolders`. `overrides` as in `run_workflow`; `kwargs` go
        to `from_files` (device, backend, compute, compile, tokenizer, ...). The graph is checked and
        every name resolved before anything loads. Run it with `pipe.run_workflow(workflow, images)`.
        """
        from .workflow import model_source, plan_workflow, resolve_models

        plan = plan_workflow(workflow, overrides)
        folders, defaults = model_source(models)
        files = resolve_models(plan, folders)
        blocks = read_checkpoint(files.transformer).num_layers  # a header read: no tensor is loaded
        cpu_offload, num_blocks_on_gpu, use_pin_memory = plan.loader.settings(blocks)
        pipe = cls.from_files(
            transformer=files.transformer, text_encoder=files.text_encoder, vae=files.vae, loras=files.loras,
            cpu_offload=cpu_offload, num_blocks_on_gpu=num_blocks_on_gpu, use_pin_memory=use_pin_memory,
            **{**defaults, **kwargs},
        )  # fmt: skip
        pipe.model_folders = folders
        if getattr(models, "demo", False):  # the demo's settings (testing.demo.demo_settings)
            pipe._use_demo_sizes()
        return pipe

    def _use_demo_sizes(self) -> None:
        """The demo's image budgets: a CPU can't run even the tiny model at 1 megapixel "in seconds"."""
        from .testing.demo import DEMO_OUTPUT_MEGAPIXELS, DEMO_REFERENCE_AREA

        self.reference_area, self.output_megapixels = DEMO_REFERENCE_AREA, DEMO_OUTPUT_MEGAPIXELS

    @classmethod
    def demo(
        cls,
        cache_dir: str | Path | None = None,
        device: torch.device | str | None = "cpu",
        compute: str = "bf16",
        compile: bool = False,
    ) -> QwenEditPipeline:
        """A tiny random-weight pipeline in the real file formats (written once into a cache folder).

        Runs the whole path on a CPU in seconds; the images are noise, the code path is the real one.
        """
        from .testing.demo import demo_settings

        spec = resolve_spec(demo_settings(cache_dir), device=device, compute=compute, compile=compile)
        return cls.from_spec(spec)

    # -- LoRAs -----------------------------------------------------------------------------------

    def set_loras(self, loras: Sequence[tuple[str | Path, float] | LoraSpec]) -> LoraReport:
        """Use exactly these LoRAs [(path, strength), ...] from now on; [] removes all. No reload.

        A `settings.LoraSpec` also carries the name results report for it (its `name`, as the caller
        named it); a plain path is reported as given.
        """
        specs = tuple(
            item if isinstance(item, LoraSpec) else LoraSpec(Path(item[0]), float(item[1]), str(item[0]))
            for item in loras
        )
        applied = [(str(spec.path), float(spec.strength)) for spec in specs]
        files = []
        for i, spec in enumerate(specs):  # read one by one, so that an error names the LoRA at fault
            try:
                files.append(read_lora(spec.path))
            except QwenEditError as exc:
                if exc.field is None:
                    exc.field = f"loras[{i}]"
                raise
        # a refused set leaves the model as it was
        report = apply_loras(self.transformer, [(f, s) for f, (_, s) in zip(files, applied, strict=True)])
        self.loras, self.lora_specs, self.lora_report = applied, specs, report
        log.info("LoRAs set in %.3fs: %s", report.seconds, report.applied)
        return report

    # -- memory ----------------------------------------------------------------------------------

    def set_offload(
        self, cpu_offload: str = "auto", num_blocks_on_gpu: int = 1, use_pin_memory: bool = False
    ) -> OffloadPlan:
        """Reconfigure memory use without reloading: ComfyUI-nunchaku's three loader settings.

        "disable" keeps everything on the GPU; "enable" keeps `num_blocks_on_gpu` transformer blocks
        resident and streams the others from CPU memory (pinned with `use_pin_memory`: faster copies,
        more locked host RAM), with the text encoder and VAE on the GPU only for their stage; "auto"
        decides from free VRAM and the model sizes, and `offload_plan.reason` says what and why.
        """
        plan = offload.plan_offload(
            cpu_offload=cpu_offload, num_blocks_on_gpu=num_blocks_on_gpu, use_pin_memory=use_pin_memory,
            budget=self._budget(), host_available=offload.host_available_bytes(), **self._sizes(),
        )  # fmt: skip
        if plan.encoders_on_cpu:  # free memory first, then take it
            self._place_encoders(True)
        offload.set_block_offload(self.transformer, plan.blocks_on_gpu, plan.use_pin_memory)
        if getattr(self.transformer, "qwen_edit_compiled", False):  # new shells and stream buffers
            from .transformer import compile_blocks

            compile_blocks(self.transformer)
        if not plan.encoders_on_cpu:
            self._place_encoders(False)
        self.offload_plan = plan
        self.offload_settings = (cpu_offload, num_blocks_on_gpu, use_pin_memory)
        log.info("offload: %s", plan.reason)
        return plan

    # -- what runners show ------------------------------------------------------------------------

    def info(self) -> dict:
        """What is loaded and how, as JSON-ready values: device; backend, compute, precision, rank and why
        (the transformer's choice); the files; the offload plan and why; the LoRAs (as results name them,
        with the layers each reached and the modules it could not); seconds per loading phase and total."""
        out: dict[str, Any] = {"device": str(self.device)}
        chosen = getattr(self.transformer, "qwen_edit_info", None)  # absent on a hand-built transformer
        if chosen is not None:
            out.update(
                backend=chosen.backend,
                compute=chosen.compute,
                precision=chosen.precision,
                rank=chosen.rank,
                reason=chosen.reason,
            )
        encoder = getattr(self.text_encoder, "qwen_edit_info", None)
        if encoder is not None:
            out["text_encoder_compute"] = encoder.compute
        files = self.files._asdict() if self.files is not None else {}
        out["files"] = {slot: None if path is None else str(path) for slot, path in files.items()}
        plan = self.offload_plan
        out["offload"] = plan.reason if plan is not None else None
        out["offload_plan"] = (
            None
            if plan is None
            else {
                "blocks_on_gpu": plan.blocks_on_gpu,
                "num_blocks": plan.num_blocks,
                "encoders_on_cpu": plan.encoders_on_cpu,
                "use_pin_memory": plan.use_pin_memory,
            }
        )
        report = self.lora_report
        out["loras"] = [
            {
                "name": spec.name,
                "strength": spec.strength,
                "layers": report.applied.get(spec.path.resolve().stem, 0),  # the report names files by stem
                "unmatched": list(report.unmatched.get(spec.path.resolve().stem, [])),
            }
            for spec in self.lora_specs
        ]
        out["load_seconds"] = {**self.load_seconds, "total": round(sum(self.load_seconds.values()), 3)}
        return out

    def _budget(self) -> int | None:
        """GPU bytes for models and activations: what is free plus what this pipeline holds now."""
        if self.device.type != "cuda":
            return None
        return offload.vram_budget(self.device) + torch.cuda.memory_allocated(self.device)

    def _sizes(self) -> dict:
        info = self.transformer.qwen_edit_info
        ckpt = getattr(self.transformer, "qwen_edit_checkpoint", None) or info.path  # no header re-read
        sizes = offload.file_sizes(ckpt, None, None, device=self.device, backend=info.backend,
                                   compute=info.compute)  # fmt: skip
        sizes["text_encoder_bytes"] = offload.module_bytes(self.text_encoder)
        sizes["vae_bytes"] = offload.module_bytes(self.vae)
        return sizes

    def _place_encoders(self, on_cpu: bool) -> None:
        self.encoders_on_cpu = on_cpu
        for module in (self.text_encoder, self.vae):
            module.to("cpu" if on_cpu else self.device)
        if on_cpu and self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the edit --------------------------------------------------------------------------------

    @torch.no_grad()
    def edit(
        self,
        images: Sequence[Image.Image | str | Path | bytes] | Image.Image,
        prompt: str,
        *,
        negative_prompt: str = "",
        seed: int = 0,
        steps: int = 4,
        cfg: float = 1.0,
        sampler_name: str = "euler",
        scheduler: str = "simple",
        denoise: float = 1.0,
        shift: float = 3.0,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        output_megapixels: float | None = None,
        callback: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> EditResult:
        """Edit 1-3 images following `prompt`; returns `batch_size` images.

        Output size: `width` x `height` (multiples of 16) if given, else image 1 scaled to
        `output_megapixels` (default: the pipeline's, one megapixel as the workflow's
        ImageScaleToTotalPixels) and centre-cropped to multiples of 8 as VAEEncode does; the
        image-to-image latent of `denoise` < 1 is that image. The encoders see image 1 at that
        megapixel budget and images 2 and 3 as given.
        `callback(step, total, x0_latent)` runs after each step; `cancel()` is polled between steps
        (stopping the edit with `SamplingCancelled`) and before each other stage, between the prompts,
        the reference images and the text encoder's layers (`EditCancelled`, its base, naming the stage).
        """
        params = EditParams(
            prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps, cfg=cfg,
            sampler_name=sampler_name, scheduler=scheduler, denoise=denoise, shift=shift,
            width=width, height=height, batch_size=batch_size,
        )  # fmt: skip
        megapixels = self.output_megapixels if output_megapixels is None else output_megapixels
        _check_megapixels(megapixels)
        pictures = _open_images(images)
        try:
            return self._edit(params, pictures, callback, cancel, megapixels)
        except torch.cuda.OutOfMemoryError as exc:
            raise self._out_of_memory(params, exc) from None

    def run_workflow(
        self,
        workflow,
        images: Mapping[str, Image.Image | str | Path | bytes]
        | Sequence[Image.Image | str | Path | bytes]
        | None = None,
        overrides: Mapping | None = None,
        *,
        models: str | Path | Mapping | ModelFolders | object | None = None,
        input_dir: str | Path | None = None,
        callback: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> EditResult:
        """Run a ComfyUI Qwen-Image-Edit-2509 workflow on this pipeline; returns `edit()`'s result.

        `workflow`: API or editor format (dict, JSON text or a .json file), or a `WorkflowPlan`; a graph
        the pipeline can't reproduce raises `WorkflowError` (node id, class, input, what is supported)
        before anything runs. `images`: {LoadImage name: image} (worker-comfyui's `images[].name`), or a
        list in slot order replacing the workflow's; names not given are read from `input_dir`.
        `overrides`: request values on top of the workflow, {"prompt": ..., "seed": ..., "images": [...]}
        and node inputs {"3.seed": 42} (`WorkflowPlan.with_overrides`). `models`: where the workflow's
        names resolve (see `from_workflow`); default: the folders this pipeline was loaded from.

        The workflow's model files must be the loaded ones (`ModelMismatchError` names those that
        differ); its LoRAs and offload settings are applied here (`set_loras`, `set_offload`) when
        they differ from the current ones.
        """
        from .workflow import check_loaded_models, model_source, plan_workflow, resolve_loras

        plan = plan_workflow(workflow, overrides)
        folders = model_source(models)[0] if models is not None else self.model_folders
        loaded = {k: v for k, v in self.files._asdict().items() if v is not None} if self.files else {}
        info = getattr(self.transformer, "qwen_edit_info", None)
        if info is not None:
            loaded.setdefault("transformer", Path(info.path))
        check_loaded_models(plan, loaded, folders)
        loras = resolve_loras(plan, folders)
        if [(p, float(s)) for p, s in self.loras] != loras:
            self.set_loras(loras)
        offload = plan.loader.settings(len(self.transformer.transformer_blocks))
        if offload != self.offload_settings:
            self.set_offload(*offload)
        pictures = plan.pictures(images, input_dir)
        return self.edit(pictures, **plan.edit_arguments(pictures), callback=callback, cancel=cancel)

    def _edit(
        self, params: EditParams, pictures: list[Image.Image], callback, cancel, megapixels: float
    ) -> EditResult:
        timings: dict = {}
        start = time.perf_counter()
        # The workflow gives TextEncodeQwenImageEditPlus image 1 after ImageScaleToTotalPixels (the same
        # node output VAEEncode turns into the latent), images 2 and 3 as loaded: both text encode nodes
        # take image1 from that node (nunchaku-tech/ComfyUI-nunchaku@dbfd194,
        # example_workflows/nunchaku-qwen-image-edit-2509.json and its -lightning twin).
        node_images = [conditioning.scale_to_megapixels(pictures[0], megapixels), *pictures[1:]]

        def check(stage: str) -> None:
            """`cancel` between stages and their pieces, as between steps: a deadline covers them all."""
            if cancel is not None and cancel():
                raise EditCancelled(stage, 0 if stage != "vae_decode" else params.steps, params.steps)

        check("text_encode")
        with self._stage("text_encode", timings, self.text_encoder):
            cond = self._encode(params.prompt, node_images, check)
            uncond = None
            if needs_uncond(params.cfg):
                check("text_encode")
                uncond = self._encode(params.negative_prompt, node_images, check)

        check("vae_encode")
        with self._stage("vae_encode", timings, self.vae):
            from .vae import encode_images

            vae_device = next(self.vae.parameters()).device
            refs = []
            for i, p in enumerate(node_images):
                if i:
                    check("vae_encode")
                pixels = conditioning.reference_pixels(p, self.reference_area, vae_device)
                refs.append(encode_images(self.vae, pixels).unsqueeze(2).to(self.device))
            b = params.batch_size
            if params.denoise < 1.0:  # img2img from image 1, as the workflow's VAEEncode latent
                check("vae_encode")
                out_pixels = conditioning.output_pixels(pictures[0], params.width, params.height, megapixels)
                latent = encode_images(self.vae, out_pixels).unsqueeze(2).cpu().expand(b, -1, -1, -1, -1)
            else:  # only the shape matters: sampling starts from pure noise
                w, h = conditioning.output_size(pictures[0], params.width, params.height, megapixels)
                latent = torch.zeros(b, 16, 1, h // 8, w // 8)

        # Step times from CUDA events, read once after sampling: no host sync between steps unless a
        # callback wants each step as it finishes.
        clock = StepClock(self.device, synchronize=callback is not None)

        def model_fn(x: torch.Tensor, sigma: torch.Tensor, use_uncond: bool) -> torch.Tensor:
            context = (uncond if use_uncond else cond).expand(x.shape[0], -1, -1)
            velocity = comfy_forward(self.transformer, x, sigma, context, refs)
            return x0_from_flow(x, sigma, velocity)

        def on_step(i: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
            clock.tick()
            if callback is not None:
                callback(i + 1, total, denoised)

        self._stage_name = "sampling"
        samples = sample(
            model_fn, latent, seed=params.seed, steps=params.steps, cfg=params.cfg,
            sampler_name=params.sampler_name, scheduler=params.scheduler, denoise=params.denoise,
            shift=params.shift, device=self.device, callback=on_step, cancel=cancel,
        )  # fmt: skip
        timings["steps"] = clock.seconds()

        check("vae_decode")
        with self._stage("vae_decode", timings, self.vae):
            from .vae import decode_latents

            pixels = decode_latents(self.vae, samples)
        images_out = [Image.fromarray(a) for a in conditioning.to_uint8(pixels)]
        timings["total"] = time.perf_counter() - start
        loras = [(spec.name, spec.strength) for spec in self.lora_specs]
        parameters = {**params.to_dict(), "loras": loras, "size": list(images_out[0].size)}
        return EditResult(images_out, params.seed, parameters, timings)

    def _encode(self, prompt: str, pictures: list[Image.Image], check: Callable[[str], None]) -> torch.Tensor:
        from .text_encoder import checks_between_layers
        from .tokenizer import encode_edit_prompt

        with checks_between_layers(self.text_encoder, lambda: check("text_encode")):
            return encode_edit_prompt(self.text_encoder, self.tokenizer, prompt, pictures).to(self.device)

    @contextmanager
    def _stage(self, name: str, timings: dict, module: torch.nn.Module):
        """Time a stage; with the encoders kept on the CPU, bring its module to the GPU for it and back."""
        self._stage_name = name
        if self.encoders_on_cpu:
            module.to(self.device)
        _sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            timings[name] = time.perf_counter() - start
            if self.encoders_on_cpu:
                module.to("cpu")

    def _out_of_memory(self, params: EditParams, exc: Exception) -> GPUOutOfMemoryError:
        """The OOM error for users: where it happened and settings that should fit, memory released."""
        stage = getattr(self, "_stage_name", "edit")
        torch.cuda.empty_cache()
        n = len(self.transformer.transformer_blocks)
        current = self.offload_plan.blocks_on_gpu if self.offload_plan is not None else n
        width, height = params.width or 1024, params.height or 1024
        scale = max(1.0, width * height / 2**20 * params.batch_size)
        auto = offload.plan_offload(
            cpu_offload="auto", num_blocks_on_gpu=1, use_pin_memory=True, budget=self._budget(),
            activation_scale=scale, **self._sizes(),
        )  # fmt: skip
        blocks = max(0, min(auto.blocks_on_gpu, current - max(1, n // 4)))
        suggestion = {"cpu_offload": "enable", "num_blocks_on_gpu": blocks, "use_pin_memory": True}
        message = (
            f"CUDA ran out of GPU memory during {stage} (output {width}x{height}, batch {params.batch_size}; "
            f"{current} of {n} transformer blocks resident). The pipeline is still usable. Settings that "
            f"should fit: cpu_offload='enable', num_blocks_on_gpu={blocks}, use_pin_memory=True "
            "(pipe.set_offload(...), or the same request fields), or a smaller size or batch_size."
        )
        log.error("%s (%s)", message, exc)
        return GPUOutOfMemoryError(message, suggestion)


@contextmanager
def _slot(name: str):
    """Loading the file of model slot `name`: an error that names no slot names this one, and what torch
    or a reader raised on a file that is not what the slot needs becomes a ModelFileError for it.
    Memory and CUDA failures pass through as they are (they say nothing about the file)."""
    try:
        yield
    except QwenEditError as exc:
        if exc.field is None:
            exc.field = name
        raise
    except Exception as exc:
        if kind_of(exc) not in ("runtime", "internal"):
            raise
        message = f"the {name} file could not be loaded ({type(exc).__name__}: {exc})"
        raise ModelFileError(message, field=name) from exc


class _PhaseClock:
    """Seconds per loading phase, CUDA-synchronized (loads end in asynchronous copies)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def done(self, phase: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase] = round(now - self.last, 3)
        self.last = now


class StepClock:
    """Seconds per sampling step. On a GPU without `synchronize`, each tick records a CUDA event and
    `seconds()` reads them all at the end, so timing adds no host sync to the step loop."""

    def __init__(self, device: torch.device, synchronize: bool):
        self.events = device.type == "cuda" and not synchronize
        self.device = device
        self.marks: list = [self._mark()]

    def _mark(self):
        if self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        _sync(self.device)
        return time.perf_counter()

    def tick(self) -> None:
        self.marks.append(self._mark())

    def seconds(self) -> list[float]:
        pairs = list(zip(self.marks[:-1], self.marks[1:], strict=True))
        if self.events:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in pairs]
        return [b - a for a, b in pairs]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_megapixels(value) -> None:
    # 16 MP is 4096 x 4096, the largest explicit size EditParams allows (and ImageScaleToTotalPixels' max).
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParameterError("output_megapixels", f"must be a number in (0, {MAX_MEGAPIXELS}], got {value!r}")
    if not 0 < value <= MAX_MEGAPIXELS:
        raise ParameterError("output_megapixels", f"must be in (0, {MAX_MEGAPIXELS}], got {value}")


def _open_images(images) -> list[Image.Image]:
    if isinstance(images, (Image.Image, str, Path, bytes)):
        images = [images]
    images = list(images)
    if not 1 <= len(images) <= MAX_IMAGES:
        raise ParameterError("images", f"give 1 to {MAX_IMAGES} images, got {len(images)}")
    opened = []
    for i, image in enumerate(images):
        try:
            opened.append(conditioning.open_image(image))
        except (OSError, TypeError, ValueError, Image.DecompressionBombError) as exc:
            raise ParameterError(f"images[{i}]", f"cannot be read as an image ({exc})") from exc
    return opened


def find_tokenizer(text_encoder: Path) -> Path:
    """The tokenizer folder for a text encoder file: beside it, or in the Hugging Face cache."""
    base = text_encoder if text_encoder.is_dir() else text_encoder.parent
    for candidate in (base / "qwen25_tokenizer", base / "tokenizer", base.parent / "tokenizer", base):
        if (candidate / "vocab.json").is_file() and (candidate / "merges.txt").is_file():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(
            snapshot_download(
                "Qwen/Qwen-Image-Edit-2509", allow_patterns=["tokenizer/*"], local_files_only=True
            )
        )
        if (snapshot / "tokenizer" / "vocab.json").is_file():
            return snapshot / "tokenizer"
    except Exception:  # not cached (or no hub access): fall through to the error below
        pass
    raise ModelNotFoundError(  # a FileNotFoundError, as it has always been
        f"no Qwen2.5 tokenizer found beside {text_encoder} (looked for qwen25_tokenizer/ and tokenizer/ "
        "holding vocab.json and merges.txt) nor in the Hugging Face cache. Pass tokenizer=<folder>, or run "
        "`qwen-edit download`, which fetches Qwen/Qwen-Image-Edit-2509's tokenizer/ folder.",
        field="tokenizer",
    )
