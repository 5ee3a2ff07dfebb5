"""cuDNN's fp8 attention for the portable transformer's blocks: measured, not kept (issue 14).

On the H200 (cuDNN 9.19, nvidia-cudnn-frontend 1.32) the fp8 kernel took 1.03 ms against 1.28 ms for
PyTorch's bf16 SDPA at the edit's size, 1.31 ms with its quantization compiled in, and the compiled step
did not get faster (214.6 vs 214.0 ms) while its output moved twice as far from the bf16 model's (14.4%
vs 7.6%): benchmarks/RESULTS.md. It lives here, beside its benchmark (bench_attention.py), so the
measurement can be repeated on a newer cuDNN or card; the library runs PyTorch's SDPA.

Scales (cuDNN's fp8 SDPA takes "descale" factors for its inputs and "scale" factors for its outputs;
NVIDIA/cudnn-frontend docs/operations/Attention.md): q, k, v each get amax/448 (448: e4m3's largest
value). Softmax probabilities lie in [0, 1], so they are stored times 448. The output is a convex
combination of v's rows, so |O| <= amax(v) and it is stored in v's scale, which never overflows.
All scales stay on the GPU: no host sync per call.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0
GRAPH_CACHE_SIZE = 16  # cuDNN graphs kept, one per (shape, strides, device); each is a few KB of plan


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's attention over [B, L, H, D] inputs -> [B, L, H*D] (views to [B, H, L, D]; copying them
    to that layout first gained nothing on an H100: benchmarks/RESULTS.md)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2).to(q.dtype)


def fp8_problem(device: torch.device | str) -> str | None:
    """Why cuDNN's fp8 attention can't run on `device` (a sentence with the fix), or None if it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"attention='fp8' needs a CUDA GPU (device is {device}); use attention='sdpa'"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return (
            f"attention='fp8' needs cuDNN's fp8 attention, which starts at SM 90 (Hopper); this card is "
            f"SM {major}{minor}. Use attention='sdpa'."
        )
    try:
        import cudnn  # noqa: F401  (NVIDIA's nvidia-cudnn-frontend package)
    except ImportError as exc:
        return f"attention='fp8' needs NVIDIA's cuDNN frontend: pip install nvidia-cudnn-frontend ({exc})"
    return None


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, float32 descale of shape [1, 1, 1, 1]) with x ~= codes * descale."""
    amax = x.abs().amax().float().clamp(min=1e-12)
    descale = (amax / E4M3_MAX).reshape(1, 1, 1, 1)
    codes = (x.float() / descale.reshape(())).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, descale


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention over [B, L, H, D] bf16 inputs -> [B, L, H*D] bf16 through cuDNN's fp8 kernel.

    The quantization runs as ordinary torch ops (under torch.compile it fuses with the q/k norm and
    RoPE); the kernel itself is the opaque op `qwen_edit::cudnn_fp8_sdpa`.
    """
    (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(t) for t in (q, k, v))
    out8 = torch.ops.qwen_edit.cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv)
    return (out8.float() * dv.reshape(())).to(q.dtype).flatten(2)


@torch.library.custom_op("qwen_edit::cudnn_fp8_sdpa", mutates_args=())
def _cudnn_fp8_sdpa(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    descale_q: torch.Tensor,
    descale_k: torch.Tensor,
    descale_v: torch.Tensor,
) -> torch.Tensor:
    """e4m3 [B, L, H, D] q/k/v (contiguous) -> e4m3 [B, L, H, D] output in v's scale."""
    q8, k8, v8 = (t.contiguous() for t in (q8, k8, v8))
    out = torch.empty_like(q8)
    graph = _graph(tuple(q8.shape), tuple(k8.shape), q8.device)
    graph.run(q8, k8, v8, descale_q, descale_k, descale_v, out)
    return out


@_cudnn_fp8_sdpa.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v):
    return torch.empty_like(q8, memory_format=torch.contiguous_format)


@_cudnn_fp8_sdpa.register_kernel("cpu")
def fp8_sdpa_reference(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    descale_q: torch.Tensor,
    descale_k: torch.Tensor,
    descale_v: torch.Tensor,
) -> torch.Tensor:
    """The kernel's arithmetic in plain float32 (any device; the op's CPU kernel; bench_attention.py
    measures cuDNN against it, which checks the scales' meaning): dequantized q, k, v; softmax;
    probabilities rounded to e4m3 times 448; the output rounded to e4m3 in v's scale. cuDNN rounds the
    running (not yet normalized) probabilities of its flash loop, so the two agree to rounding only."""
    q, k, v = (t.float() * d.reshape(()) for t, d in ((q8, descale_q), (k8, descale_k), (v8, descale_v)))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    probs = (probs * E4M3_MAX).to(torch.float8_e4m3fn).float() / E4M3_MAX
    out = (probs @ v).transpose(1, 2) / descale_v.reshape(())
    return out.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous()


class _Fp8Graph:
    """One built cuDNN fp8 SDPA graph for fixed shapes; `run` executes it on the current stream."""

    def __init__(self, q_shape: tuple[int, ...], kv_shape: tuple[int, ...], device: torch.device) -> None:
        import cudnn

        self.cudnn = cudnn
        self.device = device
        with torch.cuda.device(device):
            self.handle = cudnn.create_handle()
            e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
            graph = cudnn.pygraph(
                io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=self.handle
            )
            tensors = {}
            for name, shape in (("q", q_shape), ("k", kv_shape), ("v", kv_shape), ("o", q_shape)):
                dims, strides = _bhsd(shape)
                if name != "o":
                    tensors[name] = graph.tensor(name=name, dim=dims, stride=strides, data_type=e4m3)
            scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
            for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
                tensors[name] = graph.tensor(name=name, **scalar)
            out, _, amax_s, amax_o = graph.sdpa_fp8(
                q=tensors["q"], k=tensors["k"], v=tensors["v"],
                descale_q=tensors["descale_q"], descale_k=tensors["descale_k"],
                descale_v=tensors["descale_v"], descale_s=tensors["descale_s"],
                scale_s=tensors["scale_s"], scale_o=tensors["scale_o"],
                generate_stats=False, attn_scale=1.0 / math.sqrt(q_shape[-1]), use_causal_mask=False,
                name="qwen_edit_fp8_sdpa",
            )  # fmt: skip
            dims, strides = _bhsd(q_shape)
            out.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
            for amax in (amax_s, amax_o):  # Hopper's kernels write them; nobody reads them here
                amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            graph.check_support()
            graph.build_plans()
            self.graph, self.tensors, self.out, self.amax = graph, tensors, out, (amax_s, amax_o)
            self.workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=device)
            self.amax_buffers = [
                torch.empty(1, 1, 1, 1, dtype=torch.float32, device=device) for _ in range(2)
            ]
            # P in [0, 1] is stored times 448; the output in v's scale (|O| <= amax(v)).
            self.scale_s = torch.full((1, 1, 1, 1), E4M3_MAX, dtype=torch.float32, device=device)
            self.descale_s = torch.full((1, 1, 1, 1), 1 / E4M3_MAX, dtype=torch.float32, device=device)
        self.lock = threading.Lock()  # a graph's workspace serves one call at a time

    def run(self, q8, k8, v8, descale_q, descale_k, descale_v, out) -> None:
        t = self.tensors
        pack = {
            t["q"]: q8, t["k"]: k8, t["v"]: v8,
            t["descale_q"]: descale_q, t["descale_k"]: descale_k, t["descale_v"]: descale_v,
            t["descale_s"]: self.descale_s, t["scale_s"]: self.scale_s,
            t["scale_o"]: 1.0 / descale_v,
            self.out: out, self.amax[0]: self.amax_buffers[0], self.amax[1]: self.amax_buffers[1],
        }  # fmt: skip
        with self.lock:
            self.cudnn.set_stream(
                handle=self.handle, stream=torch.cuda.current_stream(self.device).cuda_stream
            )
            self.graph.execute(pack, self.workspace, handle=self.handle)


def _bhsd(shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """cuDNN's [B, H, S, D] dims and the strides of a contiguous [B, S, H, D] tensor (the model's layout:
    no transposed copies on either side)."""
    b, s, h, d = shape
    return [b, h, s, d], [s * h * d, d, h * d, 1]


_graphs: OrderedDict[tuple, _Fp8Graph] = OrderedDict()
_graphs_lock = threading.Lock()


def _graph(q_shape: tuple[int, ...], kv_shape: tuple[int, ...], device: torch.device) -> _Fp8Graph:
    """The built graph for these shapes (LRU, at most GRAPH_CACHE_SIZE; building one takes ~0.1-1 s)."""
    key = (q_shape, kv_shape, device)
    with _graphs_lock:
        graph = _graphs.get(key)
        if graph is not None:
            _graphs.move_to_end(key)
            return graph
    graph = _Fp8Graph(q_shape, kv_shape, device)
    with _graphs_lock:
        _graphs[key] = graph
        while len(_graphs) > GRAPH_CACHE_SIZE:
            _graphs.popitem(last=False)
    return graph
