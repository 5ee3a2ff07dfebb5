"""RunPod serverless worker: the seed deployment's ComfyUI handler, done with the library.

    python -u -m runners.worker                                # on RunPod (the Dockerfile's CMD)
    QWEN_EDIT_DEMO=1 python -m runners.worker --test_input '{"input": {...}}'   # the SDK's local test
    QWEN_EDIT_DEMO=1 python -m runners.worker --rp_serve_api --rp_api_host 127.0.0.1

What happens per job: the input's shape (sizes, nesting, text) and then its fields are checked before
any work (runners.worker.schema), images are fetched and decoded (runners.worker.images), the pipeline
is switched only where the request's model names differ from the loaded ones, LoRAs and offload
settings are applied without reloading, and the edit runs with per-step progress. The job's deadline
covers every stage: image downloads, the checks the pipeline makes before each stage and between
steps, and the uploads. Outputs go to S3-compatible storage (runners.worker.storage), all at once and
given up at the deadline (runners.worker.deadline), and/or come back as base64; an image not uploaded
always comes back as base64 (runners.worker.outputs).

Errors are bounded in size and name files as the client named them, never by the server's paths or
folder listings (runners.worker.public).

Errors are dicts with a stable code (runners.worker.schema.ERROR_CODES); what the library raises is
mapped by its kind, with one table (KIND_ERRORS). The SDK needs `error` to be a
string (a dict marks the job COMPLETED without output on the platform, runpod-python #299, and makes
the SDK's local API server answer 500), so the handler sends the structured error as JSON text:
`json.loads(response["error"])` gives `{"code", "message", "field", "fix", "retryable", ...}`.
Fatal CUDA errors and OOM also set `refresh_worker`, so the platform replaces the worker.

The handler is async and runs the pipeline in a thread: the event loop stays free, and when the
platform cancels a job the thread is told to stop at the next step (a sync handler would block the SDK's
event loop and could not be cancelled: runpod/runpod-python@07fc6e2 rp_job.py:257, rp_scale.py:321-339).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_edit.errors import EditCancelled, QwenEditError, kind_of
from qwen_edit.pipeline import QwenEditPipeline
from qwen_edit.settings import PipelineSpec, Settings, load_settings, resolve_spec

from . import images as inputs
from . import outputs, storage
from .public import without_paths
from .schema import JobRequest, WorkerError, parse_input, parse_request, parse_workflow_request

log = logging.getLogger("qwen_edit.worker")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SETTINGS = REPO / "configs" / "runpod-serverless.yaml"
DEFAULT_INPUT_DIRS = "/runpod-volume/ComfyUI/input:/runpod-volume/input"
REFRESH_CODES = {"CUDA_OOM", "CUDA_ERROR", "CUDA_UNAVAILABLE"}
# The library's error kinds (qwen_edit.errors.KINDS) -> (code, fix, retryable). An INVALID_INPUT's fix
# comes from the field (schema.FIXES) when there is none here.
KIND_ERRORS = {
    "parameter": ("INVALID_INPUT", None, False),
    "config": ("CONFIG_ERROR", "fix QWEN_EDIT_CONFIG or the settings file", False),
    "config_not_found": ("CONFIG_ERROR", "fix QWEN_EDIT_CONFIG or the settings file", False),
    "unsafe_name": ("UNSAFE_NAME", "give a file name relative to the model folder", False),
    "model_not_found": ("MODEL_NOT_FOUND", "check the name (relative to its model folder)", False),
    "model_format": ("MODEL_LOAD_FAILED", "check that the model files are complete and match", False),
    "lora": ("LORA_ERROR", "use a LoRA trained for Qwen-Image in a supported format", False),
    "hardware": ("UNSUPPORTED_HARDWARE", "select a GPU type the README lists", False),
    "nunchaku_unavailable": ("MODEL_LOAD_FAILED", "install the Nunchaku wheel or use backend auto", False),
    "out_of_memory": ("CUDA_OOM", "retry with cpu_offload='enable', a smaller size or batch_size", True),
    "cuda_error": ("CUDA_ERROR", "retry: the platform starts a fresh worker", True),
    "cancelled": ("CANCELLED", None, False),
    "storage": ("INVALID_INPUT", None, False),
    "workflow": ("INVALID_WORKFLOW", "change the node the message names (input.workflow)", False),
    "dependency": ("INTERNAL", "retry; if it persists, report it with the worker's log", True),
    "runtime": ("INTERNAL", "retry; if it persists, report it with the worker's log", True),
    "internal": ("INTERNAL", "retry; if it persists, report it with the worker's log", True),
}
# While models load, what the table calls internal is a model that would not load.
LOAD_FAILED = KIND_ERRORS["model_format"]
# The library's model slots -> the request fields that name them.
SLOT_FIELDS = {"transformer": "model_name", "text_encoder": "clip_name", "vae": "vae_name"}
# A field (or slot, or loader input) that names a model file -> the kind of folder it is looked for in.
FIELD_KINDS = {"model_name": "diffusion_models", "transformer": "diffusion_models",
               "unet_name": "diffusion_models", "clip_name": "text_encoders", "text_encoder": "text_encoders",
               "vae_name": "vae", "vae": "vae", "lora_name": "loras", "loras": "loras",
               "tokenizer": "tokenizers"}  # fmt: skip
# The model folders' kinds, as messages name them.
FOLDER_LABELS = {"diffusion_models": "model folder", "text_encoders": "text encoder folder",
                 "vae": "VAE folder", "loras": "LoRA folder", "tokenizers": "tokenizer folder"}  # fmt: skip
CUDA_PROBE = (
    "import sys, torch; "
    "sys.exit(0 if torch.cuda.is_available() and torch.ones(1, device='cuda').item() else 1)"
)


@dataclass(frozen=True)
class WorkerConfig:
    """The endpoint's environment variables (README, "RunPod serverless worker")."""

    settings: str | None = None  # QWEN_EDIT_CONFIG
    demo: bool = False  # QWEN_EDIT_DEMO: the tiny random model on the CPU (tests, local trials)
    demo_cache: str | None = None  # the demo's folder; None: the library's (under QWEN_EDIT_CACHE)
    input_dirs: tuple[Path, ...] = tuple(Path(p) for p in DEFAULT_INPUT_DIRS.split(":"))
    default_timeout: float = 600.0  # RunPod's default execution timeout
    max_timeout: float = 3600.0
    cuda_wait: float = 120.0
    limits: inputs.ImageLimits = inputs.ImageLimits()
    url_policy: inputs.UrlPolicy = inputs.UrlPolicy()
    storage: storage.StorageConfig = storage.StorageConfig()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerConfig:
        env = os.environ if env is None else env

        def number(name: str, default: float) -> float:
            value = env.get(name, "").strip()
            try:
                result = float(value) if value else default
            except ValueError:
                raise ValueError(f"{name} must be a number, got {value!r}") from None
            if result <= 0:
                raise ValueError(f"{name} must be above 0, got {value!r}")
            return result

        dirs = env.get("QWEN_EDIT_INPUT_DIRS", DEFAULT_INPUT_DIRS)
        return cls(
            settings=env.get("QWEN_EDIT_CONFIG") or None,
            demo=env.get("QWEN_EDIT_DEMO", "").strip().lower() in storage.TRUE,
            input_dirs=tuple(Path(p) for p in dirs.split(":") if p.strip()),
            default_timeout=number("QWEN_EDIT_JOB_TIMEOUT", 600.0),
            max_timeout=number("QWEN_EDIT_MAX_TIMEOUT", 3600.0),
            cuda_wait=number("QWEN_EDIT_CUDA_WAIT", 120.0),
            limits=inputs.ImageLimits(
                max_bytes=int(number("QWEN_EDIT_MAX_IMAGE_BYTES", inputs.ImageLimits.max_bytes)),
                max_pixels=int(number("QWEN_EDIT_MAX_IMAGE_PIXELS", inputs.ImageLimits.max_pixels)),
                max_side=int(number("QWEN_EDIT_MAX_IMAGE_SIDE", inputs.ImageLimits.max_side)),
                url_timeout=number("QWEN_EDIT_URL_TIMEOUT", inputs.ImageLimits.url_timeout),
            ),
            url_policy=inputs.UrlPolicy.parse(env.get("QWEN_EDIT_ALLOW_PRIVATE_URLS")),
            storage=storage.StorageConfig.from_env(env),
        )


def wait_for_cuda(timeout: float, interval: float = 2.0) -> bool:
    """Wait until a CUDA GPU answers (the seed's wait_for_cuda): workers can start before the driver.

    Probed in a child process: a failed CUDA initialisation sticks to the process that tried, so
    probing in the worker itself could never see the GPU arrive.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            probe = subprocess.run(
                [sys.executable, "-c", CUDA_PROBE], capture_output=True, timeout=max(remaining, 10.0)
            )
            if probe.returncode == 0:
                return True
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() + interval > deadline:
            return False
        log.info("waiting for CUDA (%.0f s left)", deadline - time.monotonic())
        time.sleep(interval)


class Worker:
    """One pipeline per process, loaded once and switched only when a request names other models."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.settings: Settings | None = None
        self.pipe: QwenEditPipeline | None = None
        self.loaded: tuple | None = None  # the model files of self.pipe (settings.ModelFiles)
        self.offload: tuple | None = None  # (cpu_offload, num_blocks_on_gpu, use_pin_memory) applied
        self.lock = threading.Lock()  # one edit at a time (the local API server may run jobs concurrently)
        self._started = False
        self._start_lock = threading.Lock()
        self._broken: WorkerError | None = None  # set for good: bad settings, no GPU, a fatal CUDA error

    # -- startup ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Settings, CUDA, and the default pipeline, before the first job (load once per worker)."""
        with self.lock:
            self._start()
            if self._broken is None:
                try:
                    self._pipeline(self._spec(JobRequest(images=(), edit={})))
                except Exception as exc:  # the first job reports it (and retries the load)
                    log.error("default pipeline not loaded: %s", exc)

    def _start(self) -> None:
        with self._start_lock:  # jobs may arrive together, before start() ran (the handler used alone)
            self._start_once()

    def _start_once(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            if self.config.demo:
                from qwen_edit.testing.demo import demo_settings  # the demo's files: written on first use

                layers = [self.config.settings] if self.config.settings else []
                self.settings = demo_settings(self.config.demo_cache, layers)
            else:
                self.settings = load_settings(self.config.settings or str(DEFAULT_SETTINGS))
        except Exception as exc:
            log.error("the worker's settings can't be used: %s", exc)  # the paths, for the operator
            self._broken = WorkerError(
                "CONFIG_ERROR",
                f"the worker's settings can't be used: {without_paths(str(exc))}",
                fix="fix QWEN_EDIT_CONFIG or the settings file",
            )
            return
        device = self.settings.device
        wants_cuda = device.startswith("cuda") or (device == "auto" and torch.version.cuda is not None)
        if wants_cuda and not wait_for_cuda(self.config.cuda_wait):
            self._broken = WorkerError(
                "CUDA_UNAVAILABLE",
                f"no CUDA GPU answered within {self.config.cuda_wait:g} s",
                retryable=True,
                fix="retry: the platform replaces this worker",
            )
            log.error("%s", self._broken)

    # -- one job ---------------------------------------------------------------------------------

    def run(self, job: Mapping, stop: threading.Event | None = None) -> dict:
        """The job's output dict, or {"error": {...}} (+ "refresh_worker"). Never raises."""
        started = time.monotonic()
        job_id = str(job.get("id") or "job")
        try:
            output = self._run(job, job_id, started, stop or threading.Event())
            log.info("job %s done in %.2f s", job_id, time.monotonic() - started)
            return output
        except WorkerError as exc:
            error = exc
        except Exception as exc:  # anything unforeseen still becomes a structured error
            error = self._error(exc)
        log.warning("job %s failed: %s", job_id, error)
        result: dict = {"error": error.to_dict()}
        if error.code in REFRESH_CODES or isinstance(error.__cause__, MemoryError):
            result["refresh_worker"] = True
        return result

    def _run(self, job: Mapping, job_id: str, started: float, stop: threading.Event) -> dict:
        if self._broken is not None:
            raise self._broken
        max_image_bytes = self.config.limits.max_bytes
        payload = job.get("input")
        if isinstance(payload, str):  # JSON text: parsed (and its shape checked) to see which request it is
            payload = parse_input(payload, max_image_bytes=max_image_bytes)
        if isinstance(payload, Mapping) and "workflow" in payload:  # worker-comfyui's request
            return self._run_workflow(payload, job, job_id, started, stop)
        request = parse_request(payload, max_timeout=self.config.max_timeout, max_image_bytes=max_image_bytes)
        timeout = request.timeout or self.config.default_timeout
        deadline = started + timeout
        policy = self.config.url_policy
        store = outputs.request_storage(self.config.storage, job, request.storage, policy, deadline)
        self._wait_turn(deadline, timeout)
        timings: dict = {"queue": time.monotonic() - started}
        try:
            self._ready()
            spec = self._spec(request)
            tick = time.monotonic()
            pictures = [self._picture(source, store, deadline) for source in request.images]
            timings["fetch_images"] = time.monotonic() - tick
            tick = time.monotonic()
            pipe = self._pipeline(spec, job, _slot_fields(request))
            self._apply_loras(pipe, spec, {i: field for i, (_, _, field) in enumerate(request.loras or ())})
            self._apply_offload(pipe, spec)
            timings["load_models"] = time.monotonic() - tick
            if time.monotonic() >= deadline:
                raise _timeout(timeout, "before sampling (fetching images and loading models took the time)")
            edit = {**self.settings.edit_defaults(), **request.edit}
            if edit.get("seed") is None:
                edit["seed"] = secrets.randbelow(2**53)  # exact in JSON numbers, so clients can reuse it

            def on_step(step: int, total: int, _x0) -> None:
                self._progress(
                    job,
                    {"stage": "sampling", "step": step, "total": total, "percent": round(100 * step / total)},
                )

            try:
                result = pipe.edit(
                    pictures,
                    callback=on_step,
                    cancel=lambda: stop.is_set() or time.monotonic() >= deadline,
                    **edit,
                )
            except EditCancelled as exc:
                raise _stopped(exc, stop, timeout, started) from None
            # What the LoRAs of *this* pipeline could not reach: a pipeline loaded for this job has none.
            lora_warnings = [
                f"LoRA {name}: {len(keys)} keys match no module of this model (e.g. {keys[0]})"
                for name, keys in pipe.lora_report.unmatched.items()
                if keys
            ]
        finally:
            self.lock.release()
        tick = time.monotonic()
        images, warnings = outputs.deliver(result, store, job_id, deadline)
        timings["save_outputs"] = time.monotonic() - tick
        return self._response(pipe, result, images, lora_warnings + warnings, timings, started)

    def _run_workflow(
        self, payload: Mapping, job: Mapping, job_id: str, started: float, stop: threading.Event
    ) -> dict:
        """A ComfyUI workflow with named images (worker-comfyui's request), answered in its shape:
        `images` [{filename, type: "base64" | "s3_url", data}], plus seed, parameters and timings."""
        from qwen_edit.svdq.checkpoint import read_checkpoint
        from qwen_edit.workflow import plan_workflow, resolve_models

        request = parse_workflow_request(
            payload, max_timeout=self.config.max_timeout, max_image_bytes=self.config.limits.max_bytes
        )
        self._start()  # the settings name the folders the workflow's names resolve in
        if self._broken is not None:
            raise self._broken
        timeout = request.timeout or self.config.default_timeout
        deadline = started + timeout
        policy = self.config.url_policy
        store = outputs.request_storage(self.config.storage, job, request.storage, policy, deadline)
        try:  # the graph and every name it uses are checked before any work
            plan = plan_workflow(request.workflow, request.overrides)
            files = resolve_models(plan, self.settings.folders)
            offload = plan.loader.settings(read_checkpoint(files.transformer).num_layers)
            spec = resolve_spec(
                self.settings,
                transformer=plan.models["transformer"],
                text_encoder=plan.models["text_encoder"],
                vae=plan.models["vae"],
                loras=[(lora.name, lora.strength) for lora in plan.loras],
                cpu_offload=offload[0],
                num_blocks_on_gpu=offload[1],
                use_pin_memory=offload[2],
            )
        except QwenEditError as exc:
            raise self._error(exc) from None
        self._wait_turn(deadline, timeout)
        timings: dict = {"queue": time.monotonic() - started}
        try:
            self._ready()
            pictures = {name: self._picture(source, store, deadline) for name, source in request.images}
            slots = {slot: f"workflow.{plan.sources[slot]}" for slot in SLOT_FIELDS}
            pipe = self._pipeline(spec, job, slots)
            stack = enumerate(plan.loras)
            loras = {i: f"workflow.{lo.node_id}.{lo.input_name}" for i, lo in stack if lo.node_id}
            self._apply_loras(pipe, spec, loras)
            self._apply_offload(pipe, spec)

            def on_step(step: int, total: int, _x0) -> None:
                self._progress(job, {"stage": "sampling", "step": step, "total": total})

            try:
                result = pipe.run_workflow(
                    plan, pictures or None, models=self.settings.folders, input_dir=self._input_dir(),
                    callback=on_step, cancel=lambda: stop.is_set() or time.monotonic() >= deadline,
                )  # fmt: skip
            except EditCancelled as exc:
                raise _stopped(exc, stop, timeout, started) from None
            except QwenEditError as exc:
                raise self._error(exc) from None
        finally:
            self.lock.release()
        tick = time.monotonic()
        images, warnings = outputs.deliver(result, store, job_id, deadline)
        timings["save_outputs"] = time.monotonic() - tick
        images = [_comfy_image(plan.output.file_name(i + 1), entry) for i, entry in enumerate(images)]
        return self._response(pipe, result, images, warnings, timings, started)

    def _response(
        self, pipe: QwenEditPipeline, result, images: list, warnings: list, timings: dict, started: float
    ) -> dict:
        """A job's output: its images, seed, parameters, seconds per stage and the model that ran."""
        timings.update(
            {k: v for k, v in result.timings.items() if k != "total"}, edit=result.timings["total"]
        )
        timings["total"] = time.monotonic() - started
        output = {
            "images": images,
            "seed": result.seed,
            "parameters": result.parameters,
            "timings": {k: _round(v) for k, v in timings.items()},
            "model": self._model_info(pipe),
        }
        if warnings:
            output["warnings"] = warnings
        return output

    def _wait_turn(self, deadline: float, timeout: float) -> None:
        """The worker's lock (one job at a time), or TIMEOUT if the deadline passes waiting for it."""
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise _timeout(timeout, "while waiting for the previous job")

    def _ready(self) -> None:
        """The GPU and models started; a broken worker takes no more jobs."""
        self._start()
        if self._broken is not None:
            raise self._broken

    def _input_dir(self) -> Path | None:
        """LoadImage names the request does not carry are read from the first input folder."""
        return next((d for d in self.config.input_dirs if d.is_dir()), None)

    # -- models ----------------------------------------------------------------------------------

    def _spec(self, request: JobRequest) -> PipelineSpec:
        """The settings with the request's model names, LoRAs and offload settings on top (names inside
        the model folders only), resolved by the library; its errors name the request's fields."""
        loras = None if request.loras is None else [(name, strength) for name, strength, _ in request.loras]
        fields = {f"loras[{i}]": field for i, (_, _, field) in enumerate(request.loras or ())}
        try:
            return resolve_spec(
                self.settings,
                transformer=request.model_name,
                text_encoder=request.clip_name,
                vae=request.vae_name,
                loras=loras,
                cpu_offload=request.cpu_offload,
                num_blocks_on_gpu=request.num_blocks_on_gpu,
                use_pin_memory=request.use_pin_memory,
            )
        except QwenEditError as exc:
            raise self._error(exc, fields=fields) from None

    def _pipeline(
        self, spec: PipelineSpec, job: Mapping | None = None, fields: Mapping[str, str] | None = None
    ) -> QwenEditPipeline:
        """The pipeline for `spec`, loaded if the loaded one differs; an error names the request field
        (`fields`: slot -> field) of the file that failed."""
        if self.pipe is not None and self.loaded == spec.files:
            return self.pipe
        if job is not None:
            self._progress(job, {"stage": "loading_models"})
        if self.pipe is not None:  # free the old models before loading others (both rarely fit)
            log.info("switching models: %s -> %s", self.loaded, spec.files)
            self.pipe = self.loaded = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        start = time.monotonic()
        try:  # without LoRAs: a LoRA that fails must not cost the loaded models (_apply_loras)
            pipe = QwenEditPipeline.from_spec(spec.replace(loras=()))
        except Exception as exc:
            if not isinstance(exc, QwenEditError):
                log.exception("loading %s failed", spec.files)
            raise self._error(exc, loading=True, fields=fields) from exc
        self.pipe, self.loaded, self.offload = pipe, spec.files, spec.offload
        info = pipe.info()
        log.info(
            "pipeline loaded in %.1f s: backend %s (%s), offload: %s",
            time.monotonic() - start,
            info.get("backend"),
            info.get("reason"),
            info["offload"] or "none",
        )
        if info.get("backend") == "portable" and info["device"].startswith("cuda"):
            log.warning(
                "this GPU runs the portable backend (no Nunchaku kernels): slower than RTX 50xx / 40xx"
            )
        return pipe

    def _apply_loras(
        self, pipe: QwenEditPipeline, spec: PipelineSpec, fields: Mapping[int, str] | None = None
    ) -> None:
        """`spec`'s LoRAs on `pipe`; an error names the request's field of the LoRA at fault (`fields`:
        index -> field), or lora_name."""
        if pipe.lora_specs == spec.loras:
            return
        try:
            pipe.set_loras(spec.loras)
        except Exception as exc:
            try:  # leave the pipeline clean for the next job
                pipe.set_loras([])
            except Exception:
                self.pipe = self.loaded = None
            named = {f"loras[{i}]": field for i, field in (fields or {}).items()}
            raise self._error(exc, field="lora_name", fields=named) from None
        for name, keys in pipe.lora_report.unmatched.items():
            if keys:
                log.warning("LoRA %s: %d keys match no module of this model", name, len(keys))

    def _apply_offload(self, pipe: QwenEditPipeline, spec: PipelineSpec) -> None:
        if self.offload == spec.offload:
            return
        try:
            pipe.set_offload(*spec.offload)
        except QwenEditError as exc:
            raise self._error(exc) from None
        self.offload = spec.offload

    def _model_info(self, pipe: QwenEditPipeline) -> dict:
        info = pipe.info()
        return {
            "transformer": Path(info["files"]["transformer"]).name,
            "backend": info.get("backend"),
            "compute": info.get("compute"),
            "device": info["device"],
            "offload": info["offload"],
        }

    def _picture(self, source, store: storage.StorageConfig, deadline: float):
        c = self.config
        return inputs.load_source(
            source,
            store=store,
            input_dirs=c.input_dirs,
            policy=c.url_policy,
            limits=c.limits,
            deadline=deadline,
        )

    # -- errors and progress ---------------------------------------------------------------------

    def _error(
        self,
        exc: BaseException,
        *,
        fields: Mapping[str, str] | None = None,
        field: str | None = None,
        loading: bool = False,
    ) -> WorkerError:
        """The WorkerError for what the library raised, by its kind (KIND_ERRORS). The field it names is
        the request's: a model slot becomes model_name/clip_name/vae_name, a slot the settings filled
        `settings models.<slot>`, a LoRA its lora_name entry (`fields`); `field` when it names none."""
        kind = kind_of(exc)
        code, fix, retryable = KIND_ERRORS[kind]
        if loading and code == "INTERNAL":
            code, fix, retryable = LOAD_FAILED
        where = getattr(exc, "field", None)
        if where is not None:
            where = (fields or {}).get(where) or SLOT_FIELDS.get(where) or where
            if where.startswith("models."):
                where = f"settings {where}"
        if kind == "model_not_found":  # said without the folders searched or what they hold
            name = getattr(exc, "name", None)
            message = f"no file {name!r} in the worker's {_folder_label(where)}" if name else str(exc)
        elif code == "INTERNAL" or (code == "MODEL_LOAD_FAILED" and not isinstance(exc, QwenEditError)):
            message = f"{type(exc).__name__}: {exc}"
        elif isinstance(exc, QwenEditError):
            message = exc.message
        else:  # torch's out-of-memory text runs to several lines of allocator advice
            message = str(exc).split("\n", 1)[0]
        message = without_paths(message, self._folders())  # files as the client named them
        details = {"suggestion": exc.suggestion} if hasattr(exc, "suggestion") else None
        error = WorkerError(
            code, message, field=where or field, fix=fix, retryable=retryable, details=details
        )
        if code == "CUDA_ERROR":
            self._broken = WorkerError(
                "CUDA_ERROR",
                f"this worker hit a fatal CUDA error and is being replaced ({exc})",
                retryable=True,
                fix=fix,
            )
            log.error("fatal CUDA error: %s", exc)
            return self._broken
        if code == "INTERNAL":
            log.exception("unexpected error", exc_info=exc)
            error.__cause__ = exc
        return error

    def _folders(self) -> dict:
        """{label: folders} of the worker's own folders, which messages name by label only."""
        folders: dict = {"input folder": self.config.input_dirs}
        if self.settings is not None:
            for kind, paths in self.settings.folders.folders.items():
                folders.setdefault(FOLDER_LABELS.get(kind, "model folder"), []).extend(paths)
        return folders

    def _progress(self, job: Mapping, payload: dict) -> None:
        """Per-step status through the SDK; only where there is a platform to send it to (locally the
        SDK would log an error per call: runpod/runpod-python@07fc6e2 rp_http.py:16-19). Progress never
        fails a job."""
        log.debug("job %s progress %s", job.get("id"), payload)
        if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT") or "id" not in job:
            return
        try:
            import runpod

            runpod.serverless.progress_update(dict(job), payload)
        except Exception as exc:
            log.warning("progress update failed: %s", exc)


def _stopped(exc: EditCancelled, stop: threading.Event, timeout: float, started: float) -> WorkerError:
    """The error for an edit stopped at a check (between stages, their pieces, or sampling steps): the
    platform's cancel, or the job's deadline."""
    where = f"during {exc.stage.replace('_', ' ')}: stopped after {exc.step} of {exc.total} steps"
    if stop.is_set():
        return WorkerError("CANCELLED", f"cancelled {where}")
    return _timeout(
        timeout,
        where,
        details={
            "stage": exc.stage,
            "steps_done": exc.step,
            "total_steps": exc.total,
            "elapsed": round(time.monotonic() - started, 3),
        },
    )


def _timeout(timeout: float, when: str, details: dict | None = None) -> WorkerError:
    return WorkerError(
        "TIMEOUT",
        f"the job's {timeout:g} s deadline passed {when}",
        field="timeout",
        fix="raise timeout, or use fewer steps, a smaller size or batch",
        details=details,
    )


def _slot_fields(request: JobRequest) -> dict[str, str]:
    """Model slot -> the field that named its file: the request's, or the settings' default."""
    return {
        slot: field if getattr(request, field) is not None else f"models.{slot}"
        for slot, field in SLOT_FIELDS.items()
    }


def _folder_label(field: str | None) -> str:
    """The folder a field's file is looked for in, as messages say it."""
    root = (field or "").removeprefix("settings ").removeprefix("models.").split("[", 1)[0]
    if root.startswith("workflow."):  # workflow.<node>.<input>: the loader's input names the kind
        root = root.rsplit(".", 1)[-1]
    kind = FIELD_KINDS.get(root)
    return f"{FOLDER_LABELS[kind]}s" if kind else "model folders"


def _comfy_image(name: str, entry: dict) -> dict:
    """One output in worker-comfyui's shape; an upload without a URL is named by its object key."""
    if "url" in entry:
        return {"filename": name, "type": "s3_url", "data": entry["url"]}
    if "base64" in entry:
        return {"filename": name, "type": "base64", "data": entry["base64"]}
    return {"filename": name, "type": "object_key", "data": entry.get("object_key")}


def _round(value):
    return [round(v, 4) for v in value] if isinstance(value, list) else round(value, 4)


# -- the RunPod entry point ----------------------------------------------------------------------

_worker: Worker | None = None
_worker_lock = threading.Lock()


def get_worker() -> Worker:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = Worker(WorkerConfig.from_env())
        return _worker


def to_runpod(result: dict) -> dict:
    """The SDK's return shape: `error` as JSON text (see the module docstring)."""
    if "error" not in result:
        return result
    out = {"error": json.dumps(result["error"])}
    if result.get("refresh_worker"):
        out["refresh_worker"] = True
    return out


def _run_job(worker: Worker | None, job: dict, stop: threading.Event) -> dict:
    try:
        worker = worker or get_worker()
    except Exception as exc:  # bad QWEN_EDIT_* / RUNPOD_STORAGE_* values
        log.error("the worker's environment can't be used: %s", exc)
        message = without_paths(str(exc))
        error = WorkerError("CONFIG_ERROR", message, fix="fix the endpoint's environment variables")
        return {"error": error.to_dict()}
    return worker.run(job, stop)


def make_handler(worker: Worker | None = None):
    """The RunPod handler for `worker` (default: the process's, configured from the environment)."""

    async def handler(job: dict) -> dict:
        # The edit runs in a thread; when the platform cancels the job, it stops at the next step.
        stop = threading.Event()
        try:
            result = await asyncio.to_thread(_run_job, worker, job, stop)
        except asyncio.CancelledError:
            stop.set()
            raise  # the SDK's contract for cancelled async handlers
        return to_runpod(result)

    return handler


handler = make_handler()


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("QWEN_EDIT_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        get_worker().start()
    except Exception as exc:  # reported per job by _run_job; the worker still starts
        log.error("worker configuration: %s", exc)
    # here only: importing runpod reconfigures logging (runpod/runpod-python@07fc6e2 rp_upload.py:22-24)
    import runpod

    runpod.serverless.start({"handler": handler})
