"""RunPod serverless worker: the seed deployment's ComfyUI handler, done with the library.

    python -u runners/handler.py                                # on RunPod (the Dockerfile's CMD)
    QWEN_EDIT_DEMO=1 python runners/handler.py --test_input '{"input": {...}}'   # the SDK's local test
    QWEN_EDIT_DEMO=1 python runners/handler.py --rp_serve_api --rp_api_host 127.0.0.1

What happens per job: the input is checked (runners.schema), images are fetched and decoded
(runners.images), the pipeline is switched only where the request's model names differ from the
loaded ones, LoRAs and offload settings are applied without reloading, and the edit runs with
per-step progress and a deadline polled between steps. Outputs go to S3-compatible storage
(qwen_edit.storage) and/or come back as base64; a failed upload still returns base64.

Errors are dicts with a stable code (runners.schema.ERROR_CODES). The SDK needs `error` to be a
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
import dataclasses
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

# Run as a script (RunPod's CMD, the SDK's test mode), `runners` must still be importable.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qwen_edit import storage  # noqa: E402
from qwen_edit.hardware import UnsupportedHardwareError  # noqa: E402
from qwen_edit.lora import LoraError  # noqa: E402
from qwen_edit.params import ParameterError  # noqa: E402
from qwen_edit.paths import ModelNotFoundError, UnsafeModelNameError  # noqa: E402
from qwen_edit.pipeline import GPUOutOfMemoryError, QwenEditPipeline  # noqa: E402
from qwen_edit.sampling import SamplingCancelled  # noqa: E402
from qwen_edit.settings import Settings, load_settings  # noqa: E402
from runners import images as inputs  # noqa: E402
from runners import outputs  # noqa: E402
from runners.schema import JobRequest, WorkerError, parse_request  # noqa: E402

log = logging.getLogger("qwen_edit.worker")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SETTINGS = REPO / "configs" / "runpod-serverless.yaml"
DEFAULT_INPUT_DIRS = "/runpod-volume/ComfyUI/input:/runpod-volume/input"
REFRESH_CODES = {"CUDA_OOM", "CUDA_ERROR", "CUDA_UNAVAILABLE"}
# Messages of CUDA errors after which the context is unusable (the process must go).
CUDA_FATAL = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert",
              "illegal memory access", "unspecified launch failure", "CUDA driver",
              "illegal instruction")  # fmt: skip
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


def demo_settings(cache_dir: str | None) -> tuple[dict, dict]:
    """Settings for the tiny demo model (its files as the model folders) and its text encoder config."""
    from qwen_edit.testing.demo import demo_files

    files = demo_files(cache_dir)
    folder = Path(files["transformer"]).parent
    (folder / "loras").mkdir(exist_ok=True)
    section = {"base_path": str(folder), "diffusion_models": ".", "clip": ".", "vae": ".", "tokenizers": ".",
               "loras": "loras"}  # fmt: skip
    settings = {
        "model_paths": {"demo": section},
        "models": {name: Path(files[name]).name for name in ("transformer", "text_encoder", "vae")},
        "device": "cpu", "backend": "portable", "compute": "bf16",
    }  # fmt: skip
    return settings, files["text_encoder_config"]


class Worker:
    """One pipeline per process, loaded once and switched only when a request names other models."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.settings: Settings | None = None
        self.pipe: QwenEditPipeline | None = None
        self.loaded: tuple | None = None  # the model files of self.pipe
        self.offload: tuple | None = None  # (cpu_offload, num_blocks_on_gpu, use_pin_memory) applied
        self.lock = threading.Lock()  # one edit at a time (the local API server may run jobs concurrently)
        self._started = False
        self._demo_encoder: dict | None = None
        self._broken: WorkerError | None = None  # set for good: bad settings, no GPU, a fatal CUDA error
        self.lora_warnings: list[str] = []  # about the LoRAs applied now (keys that match nothing)

    # -- startup ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Settings, CUDA, and the default pipeline, before the first job (load once per worker)."""
        with self.lock:
            self._start()
            if self._broken is None:
                try:
                    self._pipeline(self._model_files(JobRequest(images=(), edit={})), self._offload(None))
                except Exception as exc:  # the first job reports it (and retries the load)
                    log.error("default pipeline not loaded: %s", exc)

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            if self.config.demo:
                demo, self._demo_encoder = demo_settings(self.config.demo_cache)
                layers = [demo] + ([self.config.settings] if self.config.settings else [])
            else:
                layers = [self.config.settings or str(DEFAULT_SETTINGS)]
            self.settings = load_settings(layers)
        except Exception as exc:
            self._broken = WorkerError(
                "CONFIG_ERROR",
                f"the worker's settings can't be used: {exc}",
                fix="fix QWEN_EDIT_CONFIG or the settings file",
            )
            log.error("%s", self._broken)
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
            error = self._classify(exc)
        log.warning("job %s failed: %s", job_id, error)
        result: dict = {"error": error.to_dict()}
        if error.code in REFRESH_CODES or isinstance(error.__cause__, MemoryError):
            result["refresh_worker"] = True
        return result

    def _run(self, job: Mapping, job_id: str, started: float, stop: threading.Event) -> dict:
        if self._broken is not None:
            raise self._broken
        request = parse_request(job.get("input"), max_timeout=self.config.max_timeout)
        timeout = request.timeout or self.config.default_timeout
        deadline = started + timeout
        store = outputs.request_storage(self.config.storage, job, request.storage, self.config.url_policy)
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise _timeout(timeout, "while waiting for the previous job")
        timings: dict = {"queue": time.monotonic() - started}
        try:
            self._start()
            if self._broken is not None:
                raise self._broken
            files = self._model_files(request)
            loras = self._lora_files(request)
            tick = time.monotonic()
            pictures = [self._picture(source, store, deadline) for source in request.images]
            timings["fetch_images"] = time.monotonic() - tick
            tick = time.monotonic()
            pipe = self._pipeline(files, self._offload(request), job)
            self._apply_loras(pipe, loras)
            self._apply_offload(pipe, self._offload(request))
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
            except SamplingCancelled as exc:
                if stop.is_set():
                    raise WorkerError(
                        "CANCELLED", f"cancelled after {exc.step} of {exc.total} steps"
                    ) from None
                raise _timeout(
                    timeout,
                    f"during sampling: stopped after {exc.step} of {exc.total} steps",
                    details={
                        "steps_done": exc.step,
                        "total_steps": exc.total,
                        "elapsed": round(time.monotonic() - started, 3),
                    },
                ) from None
            except ParameterError as exc:
                raise WorkerError("INVALID_INPUT", str(exc).split(": ", 1)[-1], field=exc.field) from None
        finally:
            self.lock.release()
        tick = time.monotonic()
        images, warnings = outputs.deliver(result, store, job_id)
        warnings = self.lora_warnings + warnings
        timings.update(
            {k: v for k, v in result.timings.items() if k != "total"}, edit=result.timings["total"]
        )
        timings["save_outputs"] = time.monotonic() - tick
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

    # -- models ----------------------------------------------------------------------------------

    def _model_files(self, request: JobRequest) -> tuple:
        """(transformer, text encoder, VAE, tokenizer) paths, resolved inside the model folders only."""
        s = self.settings
        device = None if s.device == "auto" else s.device
        with _names("model_name" if request.model_name else "settings models.transformer"):
            models = {**s.models, "transformer": request.model_name} if request.model_name else s.models
            transformer = dataclasses.replace(s, models=models).transformer_path(device)  # names or "auto"
        with _names("clip_name" if request.clip_name else "settings models.text_encoder"):
            text_encoder = s.folders.resolve("text_encoders", request.clip_name or s.models["text_encoder"])
        with _names("vae_name" if request.vae_name else "settings models.vae"):
            vae = s.folders.resolve("vae", request.vae_name or s.models["vae"])
        tokenizer = s.models.get("tokenizer")
        with _names("settings models.tokenizer"):
            tokenizer = None if tokenizer is None else s.folders.resolve("tokenizers", tokenizer)
        return transformer, text_encoder, vae, tokenizer

    def _lora_files(self, request: JobRequest) -> list[tuple[str, float]]:
        if request.loras is None:
            entries = [(n, w, "settings models.loras") for n, w in self.settings.lora_list()]
        else:
            entries = list(request.loras)
        out = []
        for name, strength, field in entries:
            with _names(field):
                out.append((str(self.settings.folders.resolve("loras", name)), float(strength)))
        return out

    def _offload(self, request: JobRequest | None) -> tuple:
        s = self.settings

        def pick(name: str):
            value = getattr(request, name, None) if request is not None else None
            return getattr(s, name) if value is None else value

        return pick("cpu_offload"), pick("num_blocks_on_gpu"), pick("use_pin_memory")

    def _pipeline(self, files: tuple, offload: tuple, job: Mapping | None = None) -> QwenEditPipeline:
        if self.pipe is not None and self.loaded == files:
            return self.pipe
        if job is not None:
            self._progress(job, {"stage": "loading_models"})
        if self.pipe is not None:  # free the old models before loading others (both rarely fit)
            log.info("switching models: %s -> %s", self.loaded, files)
            self.pipe = self.loaded = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        s = self.settings
        transformer, text_encoder, vae, tokenizer = files
        kwargs = dict(
            transformer=transformer,
            text_encoder=text_encoder,
            vae=vae,
            tokenizer=tokenizer,
            device=None if s.device == "auto" else s.device,
            backend=s.backend,
            compute=s.compute,
            cpu_offload=offload[0],
            num_blocks_on_gpu=offload[1],
            use_pin_memory=offload[2],
            compile=s.compile,
        )
        if self._demo_encoder is not None:
            kwargs["text_encoder_config"] = self._demo_encoder
        start = time.monotonic()
        try:
            pipe = QwenEditPipeline.from_files(**kwargs)
        except FileNotFoundError as exc:  # e.g. no tokenizer beside the text encoder
            raise WorkerError(
                "MODEL_NOT_FOUND",
                str(exc),
                fix="put the missing files on the volume (the message names them)",
            ) from None
        except (UnsupportedHardwareError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:
            _raise_offload_error(exc)
            if _is_cuda_fatal(exc):
                raise
            log.exception("loading %s failed", files)
            raise WorkerError(
                "MODEL_LOAD_FAILED",
                f"{type(exc).__name__}: {exc}",
                fix="check that the model files are complete and match each other",
            ) from exc
        if self.config.demo:
            from qwen_edit.testing.demo import DEMO_OUTPUT_MEGAPIXELS, DEMO_REFERENCE_AREA

            pipe.reference_area, pipe.output_megapixels = DEMO_REFERENCE_AREA, DEMO_OUTPUT_MEGAPIXELS
        self.pipe, self.loaded, self.offload = pipe, files, offload
        info = pipe.transformer.qwen_edit_info
        log.info(
            "pipeline loaded in %.1f s: backend %s (%s), offload: %s",
            time.monotonic() - start,
            info.backend,
            info.reason,
            pipe.offload_plan.reason if pipe.offload_plan else "none",
        )
        if info.backend == "portable" and str(info.device).startswith("cuda"):
            log.warning(
                "this GPU runs the portable backend (no Nunchaku kernels): slower than RTX 50xx / 40xx"
            )
        return pipe

    def _apply_loras(self, pipe: QwenEditPipeline, loras: list[tuple[str, float]]) -> None:
        if [(p, float(w)) for p, w in pipe.loras] == loras:
            return
        try:
            report = pipe.set_loras(loras)
        except LoraError as exc:
            try:  # leave the pipeline clean for the next job
                pipe.set_loras([])
            except Exception:
                self.pipe = self.loaded = None
            raise WorkerError(
                "LORA_ERROR",
                str(exc),
                field="lora_name",
                fix="use a LoRA trained for Qwen-Image in a supported format",
            ) from None
        self.lora_warnings = [
            f"LoRA {Path(name).name}: {len(keys)} keys match no module of this model (e.g. {keys[0]})"
            for name, keys in report.unmatched.items()
            if keys
        ]
        for warning in self.lora_warnings:
            log.warning("%s", warning)

    def _apply_offload(self, pipe: QwenEditPipeline, offload: tuple) -> None:
        if self.offload == offload:
            return
        try:
            pipe.set_offload(*offload)
        except ValueError as exc:
            _raise_offload_error(exc)
            raise
        self.offload = offload

    def _model_info(self, pipe: QwenEditPipeline) -> dict:
        info = pipe.transformer.qwen_edit_info
        return {
            "transformer": Path(info.path).name,
            "backend": info.backend,
            "compute": info.compute,
            "device": str(info.device),
            "offload": pipe.offload_plan.reason if pipe.offload_plan else None,
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

    def _classify(self, exc: Exception) -> WorkerError:
        if isinstance(exc, GPUOutOfMemoryError):
            return WorkerError(
                "CUDA_OOM",
                str(exc),
                retryable=True,
                details={"suggestion": exc.suggestion},
                fix="retry with the suggested cpu_offload settings, a smaller size or batch",
            )
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return WorkerError(
                "CUDA_OOM",
                str(exc).split("\n", 1)[0],
                retryable=True,
                fix="retry with cpu_offload='enable', a smaller size or batch_size",
            )
        if isinstance(exc, UnsupportedHardwareError):
            return WorkerError("UNSUPPORTED_HARDWARE", str(exc), fix="select a GPU type the README lists")
        if _is_cuda_fatal(exc):
            self._broken = WorkerError(
                "CUDA_ERROR",
                f"this worker hit a fatal CUDA error and is being replaced ({exc})",
                retryable=True,
                fix="retry: the platform starts a fresh worker",
            )
            log.error("fatal CUDA error: %s", exc)
            return self._broken
        log.exception("unexpected error")
        error = WorkerError(
            "INTERNAL",
            f"{type(exc).__name__}: {exc}",
            retryable=True,
            fix="retry; if it persists, report it with the worker's log",
        )
        error.__cause__ = exc
        return error

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


class _names:
    """Maps the library's name errors to worker errors that name the request field."""

    def __init__(self, field: str):
        self.field = field

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, UnsafeModelNameError):
            raise WorkerError(
                "UNSAFE_NAME",
                str(exc).split(": ", 1)[-1],
                field=self.field,
                fix="give a file name relative to the model folder",
            ) from None
        if isinstance(exc, ModelNotFoundError):
            raise WorkerError(
                "MODEL_NOT_FOUND",
                str(exc),
                field=self.field,
                fix="use one of the available files listed in the message",
            ) from None
        return False


def _timeout(timeout: float, when: str, details: dict | None = None) -> WorkerError:
    return WorkerError(
        "TIMEOUT",
        f"the job's {timeout:g} s deadline passed {when}",
        field="timeout",
        fix="raise timeout, or use fewer steps, a smaller size or batch",
        details=details,
    )


def _raise_offload_error(exc: Exception) -> None:
    """The offload planner's ValueErrors name the setting first ("num_blocks_on_gpu must be in ...")."""
    for field in ("num_blocks_on_gpu", "cpu_offload"):
        if isinstance(exc, ValueError) and str(exc).startswith(field):
            raise WorkerError("INVALID_INPUT", str(exc), field=field) from None


def _is_cuda_fatal(exc: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in CUDA_FATAL)


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
        error = WorkerError("CONFIG_ERROR", str(exc), fix="fix the endpoint's environment variables")
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


if __name__ == "__main__":
    main()
