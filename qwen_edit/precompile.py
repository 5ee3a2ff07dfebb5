"""Compiled graphs saved on disk, so that a fresh process runs them without compiling them again.

`torch.compile` traces every compiled function again in each new process (Dynamo, then AOTAutograd),
even when inductor's on-disk cache holds all its kernels: ~15 s of a compiled cold start on an H200
for the transformer block and the text encoder's two layer kinds (benchmarks/RESULTS.md, issue 14).
torch's AOT compile (`torch.compile(fullgraph=True).aot_compile`, torch/_dynamo/aot_compile.py,
experimental since torch 2.9) captures one graph with its guards and inductor's compiled code as a
single file that a later process loads without tracing.

One `SavedGraphs` per kind of module ("site": the transformer block, the encoder's language-model
layer, its vision block) serves every module of that kind: the module is an input of the saved
graph, so the 60 blocks share one file. A call runs the first saved variant whose guards accept it
(shapes, dtypes, which LoRA branches exist...); none accepting, a new variant is compiled and saved
(at most `MAX_VARIANTS` per site, then plain `torch.compile`, which is also the fallback wherever AOT
compilation fails, e.g. on a graph break). Files are keyed by everything that changes the compiled
code but is not guarded: versions of Python, torch, CUDA, Triton, the GPU, diffusers, transformers,
this package's sources, and the fp8 GEMMs' accumulation mode.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import fp8

log = logging.getLogger(__name__)

DISABLE_ENV = "QWEN_EDIT_SAVED_GRAPHS"  # "0": compile in every process as before (nothing saved or read)
FOLDER_NAME = "qwen-edit-graphs"  # inside inductor's cache folder (TORCHINDUCTOR_CACHE_DIR)
MAX_VARIANTS = 8  # per site and key: inputs that are views or not, batch 1 or 2, with LoRA branches or not
# Guards that can't be saved: ids and closures of this process's functions and modules, and values of
# module globals. The file's key stands in for them: the source hash (the same code, by content, across
# processes) and fp8's accumulation flag (the one global the graphs read that changes at run time).
_UNSAVED_GUARDS = ("DICT_VERSION", "NN_MODULE", "ID_MATCH", "FUNCTION_MATCH", "CLASS_MATCH",
                   "MODULE_MATCH", "CLOSURE_MATCH", "WEAKREF_ALIVE")  # fmt: skip


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0" and hasattr(torch.compiler, "load_compiled_function")


def default_folder() -> Path:
    """`qwen-edit-graphs/` in inductor's cache folder: the saved graphs call kernels that inductor
    keeps there, so one folder (TORCHINDUCTOR_CACHE_DIR, e.g. on the worker's volume) holds both."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / FOLDER_NAME


def call_module(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The function each saved graph is compiled from: a module's call, hooks included (as
    `nn.Module.compile` compiles it), with the module as an input."""
    return module._call_impl(*args, **kwargs)


def _keep_saveable_guard(entries: list) -> list[bool]:
    unsaved = set(_UNSAVED_GUARDS)
    return [
        not (entry.is_global or entry.guard_type in unsaved or unsaved & set(entry.derived_guard_types or ()))
        for entry in entries
    ]


@functools.cache
def environment_key(device: torch.device) -> str:
    """What the compiled code depends on without a guard for it, as a 16-hex digest (once per device
    and process: it is asked at every compiled call)."""
    parts = [
        platform.python_version(),
        torch.__version__,
        str(torch.version.cuda),
        _package_version("triton"),
    ]
    if device.type == "cuda":
        parts += [torch.cuda.get_device_name(device), str(torch.cuda.get_device_capability(device))]
    parts += [_package_version(name) for name in ("diffusers", "transformers")]
    parts.append(_source_digest())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _package_version(name: str) -> str:
    try:
        return f"{name}={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return f"{name}=none"


def _source_digest() -> str:
    """sha256 of this package's Python sources (an edit to any traced function makes new files)."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class SavedGraphs:
    """The compiled graphs of one site, saved under `folder`, shared by every module of that site."""

    def __init__(
        self, site: str, folder: Path, dynamic: bool = True, max_variants: int = MAX_VARIANTS
    ) -> None:
        self.site, self.folder, self.dynamic, self.max_variants = site, Path(folder), dynamic, max_variants
        self.variants: dict[str, list] = {}  # file key -> loaded graphs, in file order
        self.failed: str | None = None  # why AOT compilation was given up, if it was
        self.lock = threading.Lock()
        self.stats = {"loaded": 0, "saved": 0, "fallback_calls": 0}

    def find(self, module: nn.Module, args: tuple, kwargs: dict):
        """The saved graph that takes this call: loaded, or compiled and saved now; None when AOT
        compilation failed or `max_variants` are taken (the caller compiles the usual way)."""
        key = self._key(module, args, kwargs)
        variants = self.variants.get(key)
        if variants is None:
            with self.lock:
                variants = self.variants.setdefault(key, self._load(key))
        for graph in variants:
            if graph.guard_check(module, args, kwargs):
                return graph
        if self.failed is None and len(variants) < self.max_variants:
            if variants:
                log.info("%s: no saved graph takes this call (%s); compiling another", self.site,
                         _why_rejected(variants[0], module, args, kwargs))  # fmt: skip
            graph = self._compile_and_save(key, len(variants), module, args, kwargs)
            if graph is not None:
                variants.append(graph)
                return graph
        self.stats["fallback_calls"] += 1
        return None

    def _key(self, module: nn.Module, args: tuple, kwargs: dict) -> str:
        # The inputs' device, which is the module's: cheaper to find at every call than a parameter.
        tensors = (value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor))
        device = next(tensors, None)
        device = device.device if device is not None else next(module.parameters()).device
        accumulation = "fast" if fp8._FAST_ACCUMULATION else "promoted"  # read inside the graph, a global
        return f"{self.site}-{environment_key(device)}-{accumulation}"

    def _paths(self, key: str) -> list[Path]:
        return sorted(self.folder.glob(f"{key}-*.graph"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))

    def _load(self, key: str) -> list:
        graphs = []
        for path in self._paths(key)[: self.max_variants]:
            try:
                with open(path, "rb") as f:
                    graphs.append(_checked_by_caller(torch.compiler.load_compiled_function(f)))
            except Exception as error:  # a torn or foreign file: compile again rather than fail the edit
                log.warning("saved graph %s not loaded (%s: %s); it will be compiled again",
                            path.name, type(error).__name__, error)  # fmt: skip
        self.stats["loaded"] += len(graphs)
        if graphs:
            log.info("%s: %d saved graph(s) loaded from %s", self.site, len(graphs), self.folder)
        return graphs

    def _compile_and_save(self, key: str, index: int, module: nn.Module, args: tuple, kwargs: dict):
        config = torch._dynamo.config
        settings = {
            "enable_aot_compile": True,  # torch < 2.13 attaches `aot_compile` only with this on
            # Python floats (norm epsilons) as constants: tracing them as symbols makes AOT capture restart.
            "specialize_float": True,
            # Dynamic shapes, for the torch releases whose aot_compile doesn't take torch.compile's `dynamic`.
            "assume_static_by_default": not self.dynamic,
        }
        try:
            with config.patch({name: value for name, value in settings.items() if hasattr(config, name)}):
                compiler = torch.compile(
                    call_module, fullgraph=True, dynamic=self.dynamic,
                    options={"guard_filter_fn": _keep_saveable_guard},
                )  # fmt: skip
                graph = _checked_by_caller(compiler.aot_compile(((module, args, kwargs), {})))
        except Exception as error:
            self.failed = f"{type(error).__name__}: {error}"
            log.warning("%s: AOT compilation failed, compiling in each process instead (%s)",
                        self.site, self.failed[:500])  # fmt: skip
            return None
        path = self.folder / f"{key}-{index}.graph"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            graph.save_compiled_function(str(path))  # written to a temporary file, then renamed
            self.stats["saved"] += 1
            log.info("%s: compiled graph saved to %s", self.site, path)
        except Exception as error:  # read-only or full folder: this process still uses the graph
            log.warning(
                "%s: compiled graph not saved to %s (%s: %s)", self.site, path, type(error).__name__, error
            )
        return graph


def _checked_by_caller(graph):
    """`SavedGraphs.find` checks the guards before each call; the graph needn't check them again."""
    if hasattr(graph, "disable_guard_check"):
        graph.disable_guard_check()
    elif hasattr(graph, "_guard_check_enabled"):  # torch releases without the method
        graph._guard_check_enabled = False
    return graph


def _why_rejected(graph, module: nn.Module, args: tuple, kwargs: dict) -> str:
    """The first guard of `graph` that fails for this call, for the log (torch internals: best effort)."""
    try:
        failure = graph._artifacts.guard_manager.check_verbose(graph.prepare_f_locals(module, args, kwargs))
        return "; ".join(failure.verbose_code_parts)[:300]
    except Exception as error:
        return f"reason unavailable: {type(error).__name__}"


class SavedGraphCall:
    """Installed as a module's `_compiled_call_impl` (what `nn.Module.compile` sets): the module's
    calls go through its site's saved graphs, or where none takes a call, through the module's own
    `torch.compile` (exactly `nn.Module.compile`'s, which is what this replaces)."""

    def __init__(self, module: nn.Module, graphs: SavedGraphs) -> None:
        self.module, self.graphs = module, graphs
        self.compiled = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        graph = self.graphs.find(self.module, args, kwargs)
        if graph is not None:
            return graph(self.module, args, kwargs)
        if self.compiled is None:
            self.compiled = torch.compile(self.module._call_impl, dynamic=self.graphs.dynamic)
        return self.compiled(*args, **kwargs)


def compile_modules(modules: list[nn.Module], site: str, folder: Path | None = None) -> SavedGraphs | None:
    """Compile `modules` (all of one kind) with dynamic shapes: through graphs saved under `folder`
    (default: `default_folder()`) where torch supports it and DISABLE_ENV isn't "0", else with
    `nn.Module.compile`. Returns the site's SavedGraphs (None when not used)."""
    if not enabled():
        for module in modules:
            module.compile(dynamic=True)
        return None
    graphs = SavedGraphs(site, folder if folder is not None else default_folder())
    for module in modules:
        module._compiled_call_impl = SavedGraphCall(module, graphs)
    return graphs


def saved_graph_sites(model: nn.Module) -> dict[str, SavedGraphs]:
    """The SavedGraphs behind `model`'s compiled modules, by site (for stats and tests)."""
    found = {}
    for module in model.modules():
        call = module.__dict__.get("_compiled_call_impl")
        if isinstance(call, SavedGraphCall):
            found[call.graphs.site] = call.graphs
    return found
