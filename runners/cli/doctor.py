"""`qwen-edit doctor`: what one checks by hand before blaming the model, with a verdict and the fixes.

The same questions a person asks on a fresh pod: does torch see the GPU, and was it built for this
card; which driver; is Nunchaku installed, the real one, built for this torch, and useful on this card;
which backend and precision would run and why; where are the model files (the RunPod locations too),
are they complete; will the model fit (the offload plan); is there disk space for what is missing.
Nothing heavy is loaded: safetensors headers and file sizes only.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .locations import RUNPOD_ROOTS, settings_layers
from .output import EXIT_MODEL, EXIT_OK, EXIT_RUNTIME, CliError, Reporter, human_bytes

if TYPE_CHECKING:  # the library loads when a check needs it
    from qwen_edit.hardware import DeviceInfo
    from qwen_edit.nunchaku_backend import NunchakuStatus

NUNCHAKU_RELEASES = "https://github.com/nunchaku-tech/nunchaku/releases"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
GIB = 2**30
LOW_HOST_RAM = 8 * GIB  # loading streams the files through host memory; below this it swaps


@dataclass
class Check:
    name: str
    status: str  # ok, info, warn, error
    summary: str
    fix: str | None = None
    details: dict = field(default_factory=dict)
    exit_code: int = EXIT_RUNTIME  # what an error here means for the verdict: 4 environment, 3 models

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.status != "error":
            out.pop("exit_code")
        return out


@dataclass
class Facts:
    """What the checks share: torch's view of the GPU, nvidia-smi's, the settings and resolved files."""

    torch: TorchFacts | None = None
    device: object = None  # qwen_edit.hardware.DeviceInfo, or None when torch sees no GPU
    smi: dict = field(default_factory=dict)
    nunchaku: object = None  # qwen_edit.nunchaku_backend.NunchakuStatus, once checked
    files: dict = field(default_factory=dict)  # slot -> Path of the files found
    settings: object = None
    checkpoint: object = None  # the transformer file as qwen_edit.svdq.checkpoint read it, once
    checkpoint_error: str | None = None


def run_doctor(
    configs: list[str] | None = None,
    models_dir: str | None = None,
    device: str | None = None,
    backend: str = "auto",
    compute: str = "auto",
) -> tuple[list[Check], str, int]:
    """All checks, the verdict line, and the exit code (0 ready, 4 environment problem, 3 models missing)."""
    facts = Facts()
    checks = [check_python(), check_torch(facts)]
    checks.append(check_gpu(facts, device))
    checks.append(check_nunchaku(facts))
    checks.extend(check_models(facts, configs, models_dir))
    checks.append(check_backend(facts, backend, compute))
    checks.append(check_offload(facts, backend, compute))
    checks.append(check_memory())
    checks.append(check_locations(facts, models_dir))
    return checks, *verdict(checks, facts)


def verdict(checks: list[Check], facts: Facts) -> tuple[str, int]:
    errors = [c for c in checks if c.status == "error"]
    warns = [c for c in checks if c.status == "warn"]
    if errors:
        code = EXIT_RUNTIME if any(c.exit_code == EXIT_RUNTIME for c in errors) else EXIT_MODEL
        names = ", ".join(c.name for c in errors)
        return f"NOT READY: {len(errors)} problem(s) to fix ({names}); see each 'fix' above", code
    backend = next((c for c in checks if c.name == "backend"), None)
    how = backend.summary if backend is not None else ""
    if warns:
        return f"READY, with {len(warns)} warning(s) ({', '.join(c.name for c in warns)}): {how}", EXIT_OK
    return f"READY: {how}", EXIT_OK


# -- environment ---------------------------------------------------------------------------------
#
# Each check gathers facts (torch, nvidia-smi, the environment, the library's device and Nunchaku
# status), then a pure `diagnose_*` function judges them, so every branch is tested with made-up facts.


@dataclass(frozen=True)
class TorchFacts:
    """torch's view: its version and CUDA build, whether it sees a GPU, the SMs it has kernels for."""

    version: str  # torch.__version__, e.g. "2.9.0+cu128"
    cuda_build: str | None  # torch.version.cuda: None for a CPU-only build
    cuda_available: bool = False
    arch_list: tuple[str, ...] = ()  # torch.cuda.get_arch_list()
    device_count: int = 0
    cudnn: int | None = None


def torch_facts() -> TorchFacts:
    import torch

    available = torch.cuda.is_available()
    return TorchFacts(
        version=torch.__version__,
        cuda_build=torch.version.cuda,
        cuda_available=available,
        arch_list=tuple(torch.cuda.get_arch_list()) if available else (),
        device_count=torch.cuda.device_count() if available else 0,
        cudnn=_cudnn_version(),
    )


def check_python() -> Check:
    from qwen_edit import __version__

    system = f"{platform.system()} {platform.machine()}"
    summary = f"Python {platform.python_version()} on {system}, qwen-edit {__version__}"
    return Check("python", "ok", summary, details={"executable": sys.executable})


def check_torch(facts: Facts) -> Check:
    facts.torch = torch_facts()
    facts.smi = nvidia_smi()
    return diagnose_torch(facts.torch, facts.smi)


def diagnose_torch(t: TorchFacts, smi: dict) -> Check:
    details = {"torch": t.version, "cuda_build": t.cuda_build, "cudnn": t.cudnn}
    if t.cuda_build is None:
        if smi.get("gpus"):
            gpu = smi["gpus"][0]["name"]
            return Check(
                "torch",
                "error",
                f"torch {t.version} is a CPU-only build, but nvidia-smi sees {gpu}",
                fix=f"pip install --force-reinstall torch --index-url {TORCH_CUDA_INDEX} (pick the cuXYZ "
                f"index at or below the driver's CUDA {smi.get('cuda_version', '?')})",
                details=details,
            )
        return Check("torch", "info", f"torch {t.version} (CPU-only build)", details=details)
    return Check("torch", "ok", f"torch {t.version}, built for CUDA {t.cuda_build}", details=details)


def _cudnn_version() -> int | None:
    import torch

    try:
        return torch.backends.cudnn.version()
    except Exception:  # no cuDNN in CPU builds
        return None


SMI_QUERY = "--query-gpu=name,driver_version,memory.total,memory.used,memory.free"


def nvidia_smi() -> dict:
    """The driver's view: GPUs, driver and CUDA version; {} without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        query = subprocess.run(
            [exe, SMI_QUERY, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20
        )
        header = subprocess.run([exe], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return {"path": exe, "gpus": [], "error": str(exc)}
    return {"path": exe, **parse_nvidia_smi(query.stdout, header, query.returncode, query.stderr)}


def parse_nvidia_smi(query: str, header: str, returncode: int = 0, stderr: str = "") -> dict:
    """nvidia-smi's CSV query (name, driver, memory total/used/free in MiB) and its banner's CUDA version."""
    out: dict = {"gpus": []}
    for line in query.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 5:
            name, driver, total, used, free = parts
            out["gpus"].append(
                {
                    "name": name,
                    "driver": driver,
                    "memory_total_mib": _int(total),
                    "memory_used_mib": _int(used),
                    "memory_free_mib": _int(free),
                }
            )
    match = re.search(r"CUDA Version:\s*([\d.]+)", header)
    if match:
        out["cuda_version"] = match.group(1)
    if returncode != 0:
        out["error"] = (stderr or query).strip()[:500]
    return out


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None


def check_gpu(facts: Facts, device: str | None) -> Check:
    if device is not None and not device.startswith("cuda"):
        return Check("gpu", "info", f"device {device!r} requested: no GPU checks")
    if not facts.torch.cuda_available:
        return diagnose_no_gpu(facts.torch, facts.smi, os.environ.get("CUDA_VISIBLE_DEVICES"))
    import torch

    from qwen_edit.errors import UnsupportedHardwareError
    from qwen_edit.hardware import describe_device

    try:
        info = describe_device(device or "cuda")
    except (UnsupportedHardwareError, RuntimeError, AssertionError) as exc:
        return Check("gpu", "error", f"cannot use {device}: {exc}", fix="pick an existing --device (cuda:0)")
    facts.device = info
    free, total = torch.cuda.mem_get_info(info.device)
    return diagnose_gpu(info, facts.torch, facts.smi, free, total)


def diagnose_gpu(info: DeviceInfo, t: TorchFacts, smi: dict, free: int, total: int) -> Check:
    """A GPU torch sees (`info`: qwen_edit.hardware.DeviceInfo): kernels for its SM, memory in use."""
    driver = smi["gpus"][0]["driver"] if smi.get("gpus") else "?"
    details = {
        "name": info.name,
        "capability": list(info.capability),
        "count": t.device_count,
        "memory_total_bytes": total,
        "memory_free_bytes": free,
        "driver": driver,
        "driver_cuda": smi.get("cuda_version"),
        "torch_arch_list": list(t.arch_list),
    }
    summary = (
        f"{info.name} ({info.sm}), {total / GIB:.1f} GiB, {free / GIB:.1f} GiB free; driver {driver} "
        f"(CUDA {smi.get('cuda_version', '?')})"
    )
    if not arch_supported(info.capability, list(t.arch_list)):
        return Check(
            "gpu",
            "error",
            f"{summary}; but torch {t.version} has no kernels for {info.sm} "
            f"(built for {', '.join(t.arch_list)})",
            fix=f"install a torch build that supports {info.sm}: pip install --force-reinstall torch "
            f"--index-url {TORCH_CUDA_INDEX} (RTX 50xx / SM 120 needs CUDA 12.8 or newer)",
            details=details,
        )
    if free < 0.5 * total:
        return Check(
            "gpu",
            "warn",
            f"{summary}; other processes hold {(total - free) / GIB:.1f} GiB",
            fix="stop them (nvidia-smi lists them; a ComfyUI server?) or let offload stream blocks",
            details=details,
        )
    return Check("gpu", "ok", summary, details=details)


def diagnose_no_gpu(t: TorchFacts, smi: dict, visible: str | None) -> Check:
    """No GPU visible to torch: which of the usual reasons it is (`visible`: CUDA_VISIBLE_DEVICES)."""
    details = {"torch_cuda_build": t.cuda_build, "nvidia_smi": smi or None, "CUDA_VISIBLE_DEVICES": visible}
    demo = "(`qwen-edit demo` runs here on the CPU; real edits need a CUDA GPU)"
    if t.cuda_build is None and not smi:
        return Check(
            "gpu",
            "error",
            "no CUDA GPU: torch is a CPU-only build and there is no NVIDIA driver (no nvidia-smi)",
            fix=f"run on a GPU machine or pod, with a CUDA build of torch {demo}",
            details=details,
        )
    if t.cuda_build is None:
        return Check(
            "gpu",
            "error",
            "the GPU is invisible to torch: it is a CPU-only build",
            fix=f"pip install --force-reinstall torch --index-url {TORCH_CUDA_INDEX}",
            details=details,
        )
    if visible is not None and visible.strip() in ("", "-1"):
        return Check(
            "gpu",
            "error",
            f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU",
            fix="unset CUDA_VISIBLE_DEVICES (or set it to 0)",
            details=details,
        )
    if not smi:
        return Check(
            "gpu",
            "error",
            f"no GPU: torch is built for CUDA {t.cuda_build} but there is no NVIDIA driver (no nvidia-smi)",
            details=details,
            fix=f"start a GPU pod, or run the container with GPUs (docker run --gpus all) {demo}",
        )
    driver_cuda = smi.get("cuda_version")
    if driver_cuda and cuda_version_tuple(driver_cuda) < cuda_version_tuple(t.cuda_build):
        return Check(
            "gpu",
            "error",
            f"the driver supports CUDA {driver_cuda}, torch needs {t.cuda_build}",
            fix=f"install a torch build for CUDA <= {driver_cuda} "
            "(https://pytorch.org/get-started/locally/), or update the NVIDIA driver",
            details=details,
        )
    return Check(
        "gpu",
        "error",
        f"nvidia-smi works but torch sees no GPU ({smi.get('error', 'reason unknown')})",
        fix="check `nvidia-smi`, the container's GPU access and torch.cuda.is_available() in Python",
        details=details,
    )


def cuda_version_tuple(text: str) -> tuple[int, ...]:
    """'12.8' -> (12, 8); major and minor only (a driver's '12.8.1' compares as 12.8)."""
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether torch's kernels run on this SM: a cubin of the same major at or below the minor (CUDA
    binary compatibility), or PTX of an older or equal target (JIT-compiled). An empty list (some
    custom builds) is given the benefit of the doubt."""
    if not arch_list:
        return True
    major, minor = capability
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if not match:
            continue
        kind, a_major, a_minor = match.group(1), int(match.group(2)), int(match.group(3))
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def check_nunchaku(facts: Facts) -> Check:
    from qwen_edit.nunchaku_backend import status

    facts.nunchaku = status()
    return diagnose_nunchaku(facts.nunchaku, facts.device, facts.torch.version, platform.python_version())


def diagnose_nunchaku(
    installed: NunchakuStatus, info: DeviceInfo | None, torch_version: str, python_version: str
) -> Check:
    """What the installed Nunchaku (`installed`: nunchaku_backend.NunchakuStatus, from the library's own
    import check) means on this card (`info`: a DeviceInfo, None without a GPU) and this torch."""
    from qwen_edit.nunchaku_backend import version_problem

    native = info.nunchaku_precision if info is not None else None
    where = f"{info.name} ({info.sm})" if info is not None else "this machine (no CUDA GPU)"
    torch_release = torch_version.split("+")[0]
    if installed.state == "missing":
        if native is None:
            return Check(
                "nunchaku",
                "info",
                f"not installed; not needed: {where} has no Nunchaku kernels "
                "(the portable backend runs the same files)",
            )
        return Check(
            "nunchaku",
            "warn",
            f"not installed, but {where} has Nunchaku {native} kernels; the portable backend "
            "will run instead (dequantized weights: more memory)",
            fix=f"install the wheel matching torch {torch_release} and Python "
            f"{python_version} from {NUNCHAKU_RELEASES} (README, 'Install on a pod')",
        )
    if not installed.ok:  # broken, or the unrelated PyPI package: the library's words and fix
        message = installed.problem()
        return Check("nunchaku", "error", message.split(": ", 1)[0], fix=message)
    dist = installed.version
    match = re.search(r"torch(\d+\.\d+)", dist or "")
    torch_mm = ".".join(torch_release.split(".")[:2])
    details = {"version": dist, "built_for_torch": match.group(1) if match else None, "torch": torch_mm}
    if match and match.group(1) != torch_mm:
        return Check(
            "nunchaku",
            "error",
            f"nunchaku {dist} is built for torch {match.group(1)}, not {torch_mm}",
            fix=f"install the nunchaku wheel for torch {torch_mm} from {NUNCHAKU_RELEASES}",
            details=details,
        )
    too_old = version_problem(info, installed) if info is not None else None
    if too_old:
        return Check("nunchaku", "error", too_old.split(";")[0], fix=too_old, details=details)
    use = f"used for {native} files" if native else f"installed but unused: {where} has no Nunchaku kernels"
    return Check("nunchaku", "ok", f"nunchaku {dist}: {use}", details=details)


# -- models --------------------------------------------------------------------------------------


def check_models(facts: Facts, configs: list[str] | None, models_dir: str | None) -> list[Check]:
    from qwen_edit.errors import QwenEditError
    from qwen_edit.header import safetensors_complete
    from qwen_edit.pipeline import find_tokenizer
    from qwen_edit.settings import load_settings

    try:
        settings = load_settings(settings_layers(configs, models_dir))
    except QwenEditError as exc:
        return [
            Check("models", "error", f"settings: {exc}", fix="check the --config file", exit_code=EXIT_MODEL)
        ]
    facts.settings = settings
    device = str(facts.device.device) if facts.device is not None else "cpu"
    folders = settings.folders.folders
    searched = {kind: [str(p) for p in paths] for kind, paths in folders.items()}
    found: dict = {}
    missing: list[str] = []
    problems: list[str] = []
    for slot in ("transformer", "text_encoder", "vae"):  # each on its own: every problem is reported
        try:
            path = settings.resolve_file(slot, device=device)
        except QwenEditError as exc:
            missing.append(slot)
            found[slot] = {"found": False, "error": str(exc)}
            continue
        entry = {"found": True, "path": str(path), "bytes": path.stat().st_size}
        complete, why = safetensors_complete(path)
        if not complete:
            problems.append(f"{slot} {path.name}: {why}")
            entry["incomplete"] = why
        else:
            facts.files[slot] = path
        found[slot] = entry
    if "text_encoder" in facts.files or settings.models.get("tokenizer"):
        try:
            tok = settings.resolve_file("tokenizer") or find_tokenizer(facts.files["text_encoder"])
            found["tokenizer"] = {"found": True, "path": str(tok)}
        except (FileNotFoundError, ValueError, KeyError) as exc:
            missing.append("tokenizer")
            found["tokenizer"] = {"found": False, "error": str(exc)}
    elif "text_encoder" in missing:
        missing.append("tokenizer")
        found["tokenizer"] = {"found": False, "error": "looked for beside the text encoder, which is missing"}
    if "transformer" in facts.files:  # the library's checkpoint reader, once for every check
        found["transformer"].update(_transformer_facts(facts, facts.files["transformer"]))
    partials = sorted(
        str(p)
        for kind in ("diffusion_models", "text_encoders", "vae")
        for folder in folders[kind]
        if folder.is_dir()
        for p in folder.rglob("*.part")
    )
    details = {
        "files": found,
        "searched": searched,
        "partial_downloads": partials,
        "transformer_name": settings.models["transformer"],
    }
    base = models_dir or _download_dir_hint(settings)
    bases = list(dict.fromkeys(str(p.parent) for p in folders["diffusion_models"]))
    checks = []
    if missing or problems:
        what = ", ".join(missing) + ("; " if missing and problems else "") + "; ".join(problems)
        fix = f"qwen-edit download --models-dir {base}"
        if partials:
            fix += " (resumes the partial downloads)"
        if "transformer" in missing:
            name = settings.models["transformer"]
            fix += f"; or set models.transformer in a --config file (looked for {name!r})"
        checks.append(
            Check(
                "models",
                "error",
                f"missing or incomplete: {what} (searched {', '.join(bases)})",
                fix=fix,
                details=details,
                exit_code=EXIT_MODEL,
            )
        )
    else:
        names = ", ".join(f"{k} {Path(v['path']).name}" for k, v in found.items())
        checks.append(Check("models", "ok", f"found {names}", details=details))
    checks.append(check_disk(settings, missing, base))
    return checks


def _download_dir_hint(settings) -> str:
    """The models folder `download` should fill, one the settings search: the first that exists, else
    download's own default if the settings search it, else the first they name."""
    from .locations import default_download_dir

    bases = list(dict.fromkeys(folder.parent for folder in settings.folders.folders["diffusion_models"]))
    for base in bases:
        if base.is_dir():
            return str(base)
    default = default_download_dir()
    return str(default if default in bases or not bases else bases[0])


def _transformer_facts(facts: Facts, path: Path) -> dict:
    from qwen_edit.svdq.checkpoint import read_checkpoint

    try:
        facts.checkpoint = read_checkpoint(path)
    except Exception as exc:  # reported by the backend check
        facts.checkpoint_error = str(exc)
        return {"read_error": str(exc)}
    ckpt = facts.checkpoint
    steps = re.search(r"(\d+)steps", path.name)
    return {
        "precision": ckpt.precision,
        "rank": ckpt.rank,
        "num_layers": ckpt.num_layers,
        "lightning_steps": int(steps.group(1)) if steps else None,
    }


def check_disk(settings, missing: list[str], base: str) -> Check:
    from .download import APPROX_BYTES, approx_transformer_bytes, free_bytes

    folder = Path(base)
    free = free_bytes(folder)
    need = sum(APPROX_BYTES.get(slot, 0) for slot in missing if slot != "transformer")
    if "transformer" in missing:  # `qwen-edit download` fetches the 4- and the 8-step file by default
        need += 2 * approx_transformer_bytes("int4", 128)
    details = {"folder": str(folder), "free_bytes": free, "needed_bytes": need}
    if need > free:
        return Check(
            "disk",
            "error",
            f"{human_bytes(free)} free at {folder}, the missing files need about {human_bytes(need)}",
            fix="free space, or download to a bigger volume with --models-dir",
            details=details,
        )
    extra = f"; the missing files need about {human_bytes(need)}" if need else ""
    return Check("disk", "ok", f"{human_bytes(free)} free at {folder}{extra}", details=details)


# -- what would run ------------------------------------------------------------------------------


def check_backend(facts: Facts, backend: str, compute: str) -> Check:
    import torch

    from qwen_edit.backend import choose_backend, choose_compute
    from qwen_edit.hardware import DeviceInfo, UnsupportedHardwareError
    from qwen_edit.nunchaku_backend import status

    info = facts.device or DeviceInfo(torch.device("cpu"), "cpu", None, None)
    transformer = facts.files.get("transformer")
    if facts.checkpoint_error is not None:
        return Check(
            "backend",
            "error",
            f"{transformer.name}: {facts.checkpoint_error}",
            fix="download it again: qwen-edit download",
            exit_code=EXIT_MODEL,
        )
    if facts.checkpoint is not None:
        precision = facts.checkpoint.precision
        source = f"the file {transformer.name} is {precision}"
    else:
        precision = info.nunchaku_precision or "int4"
        source = f"no transformer file yet; `qwen-edit download` would fetch {precision} files"
    try:
        chosen, reason = choose_backend(backend, info, precision, facts.nunchaku or status())
    except (UnsupportedHardwareError, ImportError, ValueError) as exc:
        return Check(
            "backend",
            "error",
            f"backend {backend!r} cannot run here: {exc}",
            fix=str(exc).split(". ", 1)[-1],
            details={"precision": precision},
        )
    chosen_compute = choose_compute(compute, info) if chosen == "portable" else "nunchaku 4-bit kernels"
    if info.capability is None and chosen == "portable":  # the library's reason names the device "cpu (cpu)"
        reason = "no CUDA GPU, so no Nunchaku kernels: dequantized weights (fine for the demo, far too slow "
        reason += "for the real 20B model)"
    where = f"on {info.name}" if info.capability is not None else "on the CPU"
    summary = f"{chosen} backend, {chosen_compute} compute, {precision} weights {where}: {reason}; {source}"
    details = {"backend": chosen, "compute": chosen_compute, "precision": precision, "reason": reason}
    if info.capability is None:
        return Check("backend", "info", summary, details=details)
    return Check("backend", "ok", summary, details=details)


def check_offload(facts: Facts, backend: str, compute: str) -> Check:
    if facts.device is None:
        return Check("offload", "info", "no GPU: nothing to plan")
    needed = ("transformer", "text_encoder", "vae")
    if not all(k in facts.files for k in needed):
        return Check("offload", "info", "decided when the model files are there (cpu_offload=auto)")
    from qwen_edit import offload

    try:
        sizes = offload.file_sizes(
            facts.checkpoint or facts.files["transformer"],  # the header read once, in check_models
            facts.files["text_encoder"],
            facts.files["vae"],
            device=facts.device.device,
            backend=backend,
            compute=compute,
        )
        plan = offload.plan_offload(
            cpu_offload="auto",
            num_blocks_on_gpu=1,
            use_pin_memory=False,
            budget=offload.vram_budget(facts.device.device),
            host_available=offload.host_available_bytes(),
            **sizes,
        )
    except Exception as exc:  # planning is advice; the backend check reports real problems
        return Check("offload", "info", f"not planned: {type(exc).__name__}: {exc}")
    return Check(
        "offload",
        "ok",
        f"cpu_offload=auto: {plan.reason}",
        details={
            "blocks_on_gpu": plan.blocks_on_gpu,
            "num_blocks": plan.num_blocks,
            "encoders_on_cpu": plan.encoders_on_cpu,
            "use_pin_memory": plan.use_pin_memory,
        },
    )


def check_memory() -> Check:
    meminfo = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            meminfo[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return Check("memory", "info", "host memory unknown (no /proc/meminfo)")
    total, available = meminfo.get("MemTotal", 0), meminfo.get("MemAvailable", 0)
    summary = f"{total / GIB:.1f} GiB host RAM, {available / GIB:.1f} GiB available"
    details = {"total_bytes": total, "available_bytes": available}
    if available < LOW_HOST_RAM:
        return Check(
            "memory",
            "warn",
            summary,
            details=details,
            fix="close other processes; loading a 9 GB text encoder needs free host RAM",
        )
    return Check("memory", "ok", summary, details=details)


def check_locations(facts: Facts, models_dir: str | None) -> Check:
    """The RunPod mount points: present, writable, free space, and whether they hold a models folder."""
    found = []
    details = {}
    for root in RUNPOD_ROOTS:
        if not root.is_dir():
            details[str(root)] = {"exists": False}
            continue
        models = [
            str(p)
            for p in (root / "ComfyUI" / "models", root / "data" / "models", root / "models")
            if p.is_dir()
        ]
        entry = {
            "exists": True,
            "writable": os.access(root, os.W_OK),
            "free_bytes": shutil.disk_usage(root).free,
            "models_folders": models,
        }
        details[str(root)] = entry
        found.append(
            f"{root} ({human_bytes(entry['free_bytes'])} free"
            + (f", models in {', '.join(models)}" if models else ", no models folder")
            + ")"
        )
    if not found:
        return Check(
            "locations", "info", "no /workspace or /runpod-volume (not a RunPod machine)", details=details
        )
    return Check("locations", "info", "; ".join(found), details=details)


def render(checks: list[Check], verdict_line: str) -> str:
    """The human report."""
    width = max(len(c.name) for c in checks)
    tags = {"ok": "ok", "info": "info", "warn": "WARN", "error": "ERROR"}
    lines = ["qwen-edit doctor"]
    for c in checks:
        lines.append(f"  [{tags[c.status]:<5}] {c.name:<{width}}  {c.summary}")
        if c.fix:
            lines.append(f"  {'':<7} {'':<{width}}  fix: {c.fix}")
    lines.append(f"verdict: {verdict_line}")
    return "\n".join(lines)


# -- the command ---------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace, reporter: Reporter) -> int:
    checks, verdict_line, code = run_doctor(
        args.config, args.models_dir, args.device, args.backend, args.compute
    )
    for check in checks:
        reporter.event("check", **check.to_dict())
    data = {
        "ready": code == 0,
        "verdict": verdict_line,
        "exit_code": code,
        "checks": [c.to_dict() for c in checks],
    }
    if not reporter.json_mode:
        print(render(checks, verdict_line), file=reporter.out, flush=True)
    if code == 0:
        return reporter.succeed(data)
    error = CliError(
        "not_ready",
        verdict_line,
        code,
        fix="; ".join(f"{c.name}: {c.fix}" for c in checks if c.status == "error" and c.fix),
    )
    if reporter.json_mode:
        return reporter.fail(error, data)
    return code  # the report above already says what to fix
