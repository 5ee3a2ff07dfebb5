"""LoRAs on the quantized transformer: reading every common file format, and applying them exactly.

Reading. Keys come in several spellings (those ComfyUI maps: Comfy-Org/ComfyUI@a125cd8 comfy/lora.py
model_lora_keys_unet, comfy/weight_adapter/lora.py LoRAAdapter.load): diffusers/PEFT (`lora_A`/`lora_B`,
with or without `.default`), ComfyUI/ai-toolkit (`diffusion_model.` prefix), kohya (`lora_unet_...`,
`lora_down`/`lora_up`, `.alpha`), bare module names. All are normalised to diffusers module names.
The scale follows ComfyUI (comfy/weight_adapter/lora.py), which the reference workflow uses:
`alpha / rank` when the file has an `.alpha` for that module, else 1 (diffusers ignores `.alpha` next
to lora_A/lora_B; ComfyUI doesn't, and we follow ComfyUI).

Applying. Every LoRA delta is linear in the layer input, so for each target layer all LoRAs are
concatenated along the rank into one branch y += (x @ down.T) @ up.T, strengths folded into `up`:
- portable layers (SVDQ, AWQ and plain Linear alike): a side branch next to the dequantized weight;
- Nunchaku SVDQ layers: appended to the layer's own low-rank branch (it sees the raw input, so
  W + s*B*A is exact; nunchaku-tech/nunchaku@3a3cc3d src/kernels/zgemm/gemm_w4a4.cuh:1098-1190
  accumulates x @ proj_down before it divides by the smoothing factor), packed in the kernel's layout,
  rank padded to a multiple of 16;
- Nunchaku AWQ modulation layers (no low-rank branch): a side branch whose output is interleaved
  like the layer's (c*6 + s) before it is added.
Fused q/k/v layers take each of q, k, v's LoRA in its own block of rows, with its own scale, so a
LoRA that covers only some of q/k/v is exact too. Weights are never modified: changing strengths,
adding or removing LoRAs only rebuilds these small branches.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .errors import LoraError
from .nunchaku_backend import MAX_RANK as NUNCHAKU_MAX_RANK
from .svdq import layout
from .svdq.checkpoint import AWQ_LAYERS, FUSED_PARTS, SVDQ_LAYERS
from .svdq.layers import DequantizedLinear

log = logging.getLogger(__name__)

# Diffusers module names a Qwen-Image LoRA may target (the Linear layers of diffusers'
# QwenImageTransformer2DModel, src/diffusers/models/transformers/transformer_qwenimage.py).
BLOCK_TARGETS = (
    *(part for name, _, _ in SVDQ_LAYERS for part in FUSED_PARTS.get(name, (name,))),
    *AWQ_LAYERS,
)
TOP_TARGETS = (
    "img_in",
    "txt_in",
    "proj_out",
    "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
)
PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.")
# (suffix, role), longest first so ".lora_A.default.weight" wins over ".lora_A.weight".
SUFFIXES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_alpha", "alpha"),
    (".alpha", "alpha"),
)
# Adapters we recognise but don't implement: pattern -> name for the error message. Matched against the
# key without its module prefix, and anchored where the marker is a key's last part, so a marker never
# matches inside a module path (".diff" inside "model.diffusion_model." did).
UNSUPPORTED = tuple(
    (re.compile(pattern), kind)
    for pattern, kind in (
        (r"(^|\.)lokr_", "LoKr"),
        (r"(^|\.)hada_", "LoHa"),
        (r"\.dora_scale$", "DoRA (dora_scale)"),
        # PEFT and diffusers save DoRA's magnitude as `<module>.lora_magnitude_vector` (PEFT drops the
        # adapter name and `.weight`; some writers keep them), beside ordinary lora_A/lora_B keys.
        (r"\.lora_magnitude_vector(\.|$)", "DoRA (PEFT lora_magnitude_vector)"),
        (r"\.lora_mid\.", "LoCon with a mid (Tucker) weight"),
        (r"\.diff_b$", "full-weight difference (diff_b)"),
        (r"\.diff$", "full-weight difference (diff)"),
        (r"\.(lora_B|lora_up)\.bias$", "LoRA with bias deltas"),
    )
)


@dataclass(frozen=True)
class LoraWeights:
    down: torch.Tensor  # [rank, in]  (lora_A / lora_down)
    up: torch.Tensor  # [out, rank]  (lora_B / lora_up)
    alpha: float | None

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]


@dataclass(frozen=True)
class LoraFile:
    path: Path
    format: str
    layers: dict[str, LoraWeights]  # diffusers module name -> weights

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass
class LoraReport:
    """What `apply_loras` did: per LoRA, how many layers it reached and which modules it could not."""

    applied: dict[str, int] = field(default_factory=dict)
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0


# -- reading -------------------------------------------------------------------------------------

_UNDERSCORED = {name.replace(".", "_"): name for name in (*BLOCK_TARGETS, *TOP_TARGETS)}
_KOHYA_BLOCK = re.compile(r"^transformer_blocks_(\d+)_(.+)$")


def _without_prefix(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _unsupported_kind(key: str) -> str | None:
    """The adapter kind `key` belongs to when qwen-edit doesn't implement it, else None."""
    rest = _without_prefix(key)
    return next((kind for pattern, kind in UNSUPPORTED if pattern.search(rest)), None)


def _module_name(raw: str) -> tuple[str, str]:
    """A key's module part -> (diffusers module name, format label)."""
    fmt = "diffusers/PEFT"
    for prefix in PREFIXES:
        if raw.startswith(prefix):
            fmt = "ComfyUI/ai-toolkit" if "diffusion_model" in prefix else fmt
            raw = raw[len(prefix) :]
            break
    else:
        fmt = "bare module names"
    for prefix in ("lora_unet_", "lycoris_"):
        if raw.startswith(prefix):
            flat = raw[len(prefix) :]
            match = _KOHYA_BLOCK.match(flat)
            if match and match.group(2) in _UNDERSCORED:
                return f"transformer_blocks.{match.group(1)}.{_UNDERSCORED[match.group(2)]}", "kohya"
            return _UNDERSCORED.get(flat, flat), "kohya"
    return raw, fmt


def parse_lora_state_dict(tensors: dict[str, torch.Tensor], source: str = "LoRA") -> tuple[str, dict]:
    """{key: tensor} in any supported format -> (format, {diffusers module: LoraWeights})."""
    for key in tensors:
        kind = _unsupported_kind(key)
        if kind is not None:
            raise LoraError(
                f"{source} is a {kind} adapter (key {key!r}); qwen-edit supports plain LoRA "
                "(lora_A/lora_B or lora_down/lora_up, optional .alpha). Convert it to a LoRA first."
            )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    formats = set()
    unknown = []
    for key, tensor in tensors.items():
        role = next(((suffix, r) for suffix, r in SUFFIXES if key.endswith(suffix)), None)
        if role is None:
            unknown.append(key)
            continue
        module, fmt = _module_name(key[: -len(role[0])])
        formats.add(fmt)
        parts.setdefault(module, {})[role[1]] = tensor
    if unknown:
        raise LoraError(f"{source}: {len(unknown)} keys are not LoRA weights: {unknown[:5]}")
    layers = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            raise LoraError(f"{source}: module {module!r} has only {sorted(p)}; a LoRA needs both A and B")
        down, up = p["down"].float(), p["up"].float()
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraError(
                f"{source}: {module!r} has A {tuple(down.shape)} and B {tuple(up.shape)}, "
                "expected A [rank, in] and B [out, rank]"
            )
        alpha = float(p["alpha"].float().item()) if "alpha" in p else None
        layers[module] = LoraWeights(down, up, alpha)
    if not layers:
        raise LoraError(f"{source} holds no LoRA weights")
    return " + ".join(sorted(formats)), layers


# Parsed LoRA files, least recently used first, so that a job that only changes strengths (or goes
# back to a LoRA used a moment ago) neither reads nor parses the file again. Bounded by the parsed
# tensors' bytes, not by their number: a rank-64 LoRA on all 840 layers of the 20B transformer parses
# to ~2.2 GiB of float32. The budget holds one such LoRA and a few small ones; a file larger than the
# whole budget is parsed for each use and not kept. Change it by assigning LORA_CACHE_BYTES (0 keeps
# nothing); `clear_lora_cache()` empties the cache.
LORA_CACHE_BYTES = 4 * 2**30
# path -> ((mtime_ns, size), parsed file, its bytes)
_cache: OrderedDict[str, tuple[tuple[int, int], LoraFile, int]] = OrderedDict()
_cache_lock = threading.Lock()  # read_lora is a library function: callers may run it in several threads


def lora_bytes(lora: LoraFile) -> int:
    """Bytes of a parsed LoRA's tensors (what keeping it in the cache costs)."""
    return sum(w.down.nbytes + w.up.nbytes for w in lora.layers.values())


def cached_lora_bytes() -> int:
    """Bytes the LoRA cache holds now (at most LORA_CACHE_BYTES)."""
    with _cache_lock:
        return sum(nbytes for _, _, nbytes in _cache.values())


def clear_lora_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _read_cached(path: str, mtime_ns: int, size: int) -> LoraFile:
    stamp = (mtime_ns, size)  # a file changed in place is read again
    with _cache_lock:
        hit = _cache.get(path)
        if hit is not None and hit[0] == stamp:
            _cache.move_to_end(path)
            return hit[1]
    fmt, layers = parse_lora_state_dict(load_file(path), source=path)
    lora = LoraFile(Path(path), fmt, layers)
    nbytes = lora_bytes(lora)
    with _cache_lock:
        _cache.pop(path, None)  # an older version of the file
        if nbytes <= LORA_CACHE_BYTES:
            _cache[path] = (stamp, lora, nbytes)
        while sum(entry[2] for entry in _cache.values()) > LORA_CACHE_BYTES:
            _cache.popitem(last=False)
    return lora


def read_lora(path: str | Path) -> LoraFile:
    """Parse a LoRA file; reading the same unchanged file again returns the cached parse (while it
    fits LORA_CACHE_BYTES with the files read since)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    stat = path.stat()
    try:
        return _read_cached(str(path), stat.st_mtime_ns, stat.st_size)
    except LoraError:
        raise
    except Exception as exc:  # safetensors' own errors for a damaged or non-safetensors file
        raise LoraError(f"{path} is not a readable .safetensors LoRA ({exc})") from exc


# -- applying ------------------------------------------------------------------------------------

_FUSED_INDEX = {part: (fused, i) for fused, parts in FUSED_PARTS.items() for i, part in enumerate(parts)}


def _resolve(model: nn.Module, module: str) -> tuple[str, int] | None:
    """A diffusers module name -> (layer in this model, index of its rows block), or None if absent.

    q/k/v (and the text stream's) live in fused layers here; index says which third of the rows.
    """
    try:
        model.get_submodule(module)
        return module, 0
    except AttributeError:
        pass
    block, sep, leaf = module.partition(".attn.")
    if sep and f"attn.{leaf}" in _FUSED_INDEX:
        fused, index = _FUSED_INDEX[f"attn.{leaf}"]
        try:
            model.get_submodule(f"{block}.{fused}")
        except AttributeError:
            return None
        return f"{block}.{fused}", index
    return None


def _out_features(layer: nn.Module) -> int:
    if hasattr(layer, "out_features"):
        return int(layer.out_features)
    return int(layer.proj_up.shape[0] if hasattr(layer, "proj_up") else layer.bias.shape[0])


def apply_loras(model: nn.Module, loras: Sequence[tuple[LoraFile | str | Path, float]]) -> LoraReport:
    """Set the model's LoRAs to exactly `loras` [(file or path, strength), ...]; [] removes them all.

    Replaces whatever was applied before. Weights are not touched, so this is cheap to call again
    with new strengths.
    """
    import time

    start = time.perf_counter()
    report = LoraReport()
    branches: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}  # layer -> (down, up, row)
    for item, strength in loras:
        lora = item if isinstance(item, LoraFile) else read_lora(item)
        report.applied[lora.name] = 0
        unmatched = report.unmatched.setdefault(lora.name, [])
        for module, weights in lora.layers.items():
            target = _resolve(model, module)
            if target is None:
                unmatched.append(module)
                continue
            report.applied[lora.name] += 1
            if strength == 0:
                continue  # strength 0 is exactly the base model: add nothing
            name, index = target
            up = weights.up * (strength * weights.scale)
            branches.setdefault(name, []).append((weights.down, up, index * up.shape[0]))
        if unmatched and report.applied[lora.name] == 0:
            raise LoraError(
                f"LoRA {lora.path} matches no module of this transformer (first keys: {unmatched[:3]}); "
                "is it a LoRA for another model?"
            )
        if unmatched:
            warnings.warn(
                f"LoRA {lora.name}: {len(unmatched)} modules not in this transformer were skipped: "
                f"{unmatched[:5]}",
                stacklevel=2,
            )
    layers = list(_lora_layers(model))
    new = {name: _concat(branches.pop(name, []), module) for name, module in layers}
    if branches:  # a target resolved above but is not a LoRA-capable layer
        raise LoraError(f"cannot attach LoRA to {sorted(branches)[:5]}: not linear layers")
    for name, module in layers:  # checked before any layer changes: a refused set leaves the model as it was
        if _is_nunchaku_svdq(module) and new[name] is not None:
            _check_nunchaku_rank(name, module, new[name][0].shape[0])
    for name, module in layers:
        _set_branch(module, new[name])
    report.seconds = time.perf_counter() - start
    return report


def _concat(parts: list[tuple[torch.Tensor, torch.Tensor, int]], layer: nn.Module):
    """[(down [r,K], up [n,r], first row)] -> (down [R,K], up [N,R]) or None; up zero outside its rows."""
    if not parts:
        return None
    n = _out_features(layer)
    down = torch.cat([d for d, _, _ in parts])
    up = torch.zeros(n, down.shape[0])
    col = 0
    for d, u, row in parts:
        if d.shape[1] != down.shape[1] or row + u.shape[0] > n:
            raise LoraError(
                f"LoRA shape A {tuple(d.shape)} B {tuple(u.shape)} does not fit a layer of {n} outputs"
            )
        up[row : row + u.shape[0], col : col + d.shape[0]] = u
        col += d.shape[0]
    return down, up


def _lora_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        linear = isinstance(module, (DequantizedLinear, nn.Linear))
        if linear or _is_nunchaku_svdq(module) or _is_nunchaku_awq(module):
            yield name, module


def _is_nunchaku_svdq(module: nn.Module) -> bool:
    return hasattr(module, "proj_down") and hasattr(module, "proj_up") and hasattr(module, "qweight")


def _is_nunchaku_awq(module: nn.Module) -> bool:
    return hasattr(module, "wzeros") and hasattr(module, "qweight")


def _branch_dtype(module: nn.Module) -> torch.dtype:
    """The activation dtype the branch runs in: the layer's bias/weight dtype (never fp8 or int)."""
    for name in ("bias", "weight", "wscales"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.element_size() > 1:
            return t.dtype
    return torch.bfloat16


def _set_branch(module: nn.Module, branch: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    if _is_nunchaku_svdq(module):
        _set_nunchaku_low_rank(module, branch)
        return
    down = up = None
    if branch is not None:
        device, dtype = next(module.parameters()).device, _branch_dtype(module)
        down, up = branch[0].to(device, dtype), branch[1].to(device, dtype)
        if _is_nunchaku_awq(module):
            up = layout.interleave_modulation(up)  # the layer's raw output is interleaved (c*6 + s)
    if isinstance(module, DequantizedLinear):
        module.lora_down, module.lora_up = down, up
        return
    # nn.Linear and Nunchaku AWQ layers: buffers plus a forward hook, removed when the branch is cleared.
    if down is None and not hasattr(module, "_qwen_edit_lora_hook"):
        return
    module.register_buffer("lora_down", down, persistent=False)
    module.register_buffer("lora_up", up, persistent=False)
    hook = getattr(module, "_qwen_edit_lora_hook", None)
    if down is None:
        hook.remove()
        del module._qwen_edit_lora_hook
    elif hook is None:
        module._qwen_edit_lora_hook = module.register_forward_hook(_add_branch)


def _add_branch(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    x = inputs[0]
    delta = F.linear(F.linear(x.to(module.lora_down.dtype), module.lora_down), module.lora_up)
    return output + delta.to(output.dtype)


def _check_nunchaku_rank(name: str, module: nn.Module, lora_rank: int) -> None:
    base = getattr(module, "_qwen_edit_base_rank", module.proj_down.shape[1])
    total = base + lora_rank + (-lora_rank % 16)
    if total > NUNCHAKU_MAX_RANK:
        raise LoraError(
            f"{name}: the quantized layer's rank {base} plus the LoRAs' {lora_rank} (padded to "
            f"{total - base}) is {total}, over the {NUNCHAKU_MAX_RANK} ranks Nunchaku's kernel supports. "
            "Use fewer or lower-rank LoRAs on the Nunchaku backend, or backend='portable' (no limit)."
        )


def _set_nunchaku_low_rank(module: nn.Module, branch: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Append (or remove) LoRA ranks to a Nunchaku SVDQW4A4Linear's own packed low-rank branch."""
    if not hasattr(module, "_qwen_edit_base_rank"):
        if branch is None:
            return  # never had a LoRA: nothing to remove
        module._qwen_edit_base_rank = module.proj_down.shape[1]
    base = module._qwen_edit_base_rank
    down = layout.unpack_proj_down(module.proj_down.data)[:base]  # [R, K]
    up = layout.unpack_proj_up(module.proj_up.data)[:, :base]  # [N, R]
    if branch is not None:
        extra_down, extra_up = branch[0].to(down), branch[1].to(up)
        pad = -extra_down.shape[0] % 16  # the kernel works in 16-rank tiles
        down = torch.cat([down, extra_down, down.new_zeros(pad, down.shape[1])])
        up = torch.cat([up, extra_up, up.new_zeros(up.shape[0], pad)], dim=1)
    module.proj_down = nn.Parameter(layout.pack_proj_down(down), requires_grad=False)
    module.proj_up = nn.Parameter(layout.pack_proj_up(up), requires_grad=False)
    if hasattr(module, "rank"):
        module.rank = down.shape[0]
