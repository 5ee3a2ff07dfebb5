"""Saved compiled graphs (qwen_edit/precompile.py): a second process runs them without tracing, guards
pick the variant, anything that can't be saved or loaded falls back to compiling, and nothing is lost.

torch.compile on a CPU needs a C++ compiler (inductor's CPU code); without one these tests skip, and
the GPU tests (test_gpu.py) run the same path with Triton kernels on the device machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from torch import nn

from qwen_edit import fp8, precompile

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not precompile.enabled() or not (shutil.which("c++") or shutil.which("g++")),
        reason="needs torch's AOT compile and a C++ compiler for inductor's CPU kernels",
    ),
]


class TinyBlock(nn.Module):
    """Norm, linear, GELU and a residual: enough ops for a real inductor graph, seconds to compile."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.nn.functional.gelu(self.linear(self.norm(x)), approximate="tanh")
        return x + (y if scale is None else y * scale)


@pytest.fixture
def graphs_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield tmp_path / "inductor" / precompile.FOLDER_NAME
    torch._dynamo.reset()


def _blocks(count: int = 3) -> list[TinyBlock]:
    torch.manual_seed(0)
    return [TinyBlock().eval() for _ in range(count)]


def _traced_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@torch.no_grad()
def test_the_blocks_share_saved_graphs_that_a_new_site_loads_without_tracing(graphs_folder):
    blocks = _blocks()
    x = torch.randn(1, 7, 32)
    expected = [block(x) for block in blocks]
    graphs = precompile.compile_modules(blocks, "tiny")
    assert all(isinstance(b._compiled_call_impl, precompile.SavedGraphCall) for b in blocks)
    for block, want in zip(blocks, expected, strict=True):
        torch.testing.assert_close(block(x), want, rtol=1e-4, atol=1e-5)
    assert graphs.stats == {"loaded": 0, "saved": 1, "fallback_calls": 0}  # one graph for the three blocks
    (saved,) = graphs_folder.glob("tiny-*.graph")

    # Another sequence length: the dynamic graph takes it, nothing new is compiled.
    longer = torch.randn(1, 19, 32)
    torch.testing.assert_close(blocks[1](longer), blocks[1].forward(longer), rtol=1e-4, atol=1e-5)
    assert graphs.stats["saved"] == 1

    # As a new process would: fresh modules, nothing in Dynamo's memory, the graph read from the file.
    torch._dynamo.reset()
    before = _traced_graphs()
    fresh = _blocks()
    again = precompile.compile_modules(fresh, "tiny")
    for block, want in zip(fresh, expected, strict=True):
        torch.testing.assert_close(block(x), want, rtol=1e-4, atol=1e-5)
    assert again.stats == {"loaded": 1, "saved": 0, "fallback_calls": 0}
    assert _traced_graphs() == before  # ran without Dynamo tracing anything
    assert list(graphs_folder.glob("tiny-*.graph")) == [saved]


@torch.no_grad()
def test_a_call_its_saved_graphs_reject_gets_a_new_variant_and_each_is_found_again(graphs_folder):
    blocks = _blocks(2)
    x, scale = torch.randn(1, 5, 32), torch.rand(32)
    graphs = precompile.compile_modules(blocks, "tiny")
    blocks[0](x)
    blocks[0](x, scale)  # a tensor where there was None: the first graph's guards refuse it
    blocks[1](torch.randn(2, 5, 32))  # batch 2: sizes 0 and 1 are specialized even with dynamic shapes
    assert graphs.stats["saved"] == 3
    torch._dynamo.reset()
    before = _traced_graphs()
    fresh = _blocks(2)
    again = precompile.compile_modules(fresh, "tiny")
    torch.testing.assert_close(fresh[1](x, scale), fresh[1].forward(x, scale), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fresh[0](torch.ones(2, 3, 32)), fresh[0].forward(torch.ones(2, 3, 32)))
    fresh[0](x)
    assert again.stats == {"loaded": 3, "saved": 0, "fallback_calls": 0}
    assert _traced_graphs() == before


@torch.no_grad()
def test_the_fp8_accumulation_mode_read_inside_the_graph_keys_its_own_files(graphs_folder):
    blocks = _blocks(1)
    graphs = precompile.compile_modules(blocks, "tiny")
    x = torch.randn(1, 4, 32)
    blocks[0](x)
    with fp8.fast_accumulation(False):
        blocks[0](x)
    names = sorted(path.name for path in graphs_folder.glob("*.graph"))
    assert len(names) == 2 and "-fast-" in names[0] and "-promoted-" in names[1], names
    assert graphs.stats["saved"] == 2


class GraphBreak(TinyBlock):
    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if float(x.abs().max()) > 1e6:  # a host sync: Dynamo breaks the graph here, no AOT capture
            return x
        return super().forward(x)


@torch.no_grad()
def test_a_module_aot_compile_cant_take_is_compiled_as_before_and_nothing_is_saved(graphs_folder, caplog):
    torch.manual_seed(0)
    blocks = [GraphBreak().eval() for _ in range(2)]
    x = torch.randn(1, 6, 32)
    expected = [block.forward(x) for block in blocks]
    graphs = precompile.compile_modules(blocks, "breaks")
    with caplog.at_level(logging.WARNING, logger="qwen_edit.precompile"):
        for block, want in zip(blocks, expected, strict=True):
            torch.testing.assert_close(block(x), want, rtol=1e-4, atol=1e-5)
    assert graphs.failed and "compiling in each process instead" in caplog.text
    assert graphs.stats["fallback_calls"] == 2 and graphs.stats["saved"] == 0
    assert all(
        block._compiled_call_impl.compiled is not None for block in blocks
    )  # torch.compile, per module
    assert not list(graphs_folder.glob("*.graph"))


@torch.no_grad()
def test_a_torn_file_is_compiled_again_and_replaced(graphs_folder, caplog):
    blocks = _blocks(1)
    x = torch.randn(1, 4, 32)
    precompile.compile_modules(blocks, "tiny")
    blocks[0](x)
    (path,) = graphs_folder.glob("tiny-*.graph")
    path.write_bytes(path.read_bytes()[:1000])  # a copy cut short
    torch._dynamo.reset()
    fresh = _blocks(1)
    again = precompile.compile_modules(fresh, "tiny")
    with caplog.at_level(logging.WARNING, logger="qwen_edit.precompile"):
        torch.testing.assert_close(fresh[0](x), fresh[0].forward(x), rtol=1e-4, atol=1e-5)
    assert "not loaded" in caplog.text and path.name in caplog.text
    assert again.stats == {"loaded": 0, "saved": 1, "fallback_calls": 0}
    torch._dynamo.reset()
    third = precompile.compile_modules(_blocks(1), "tiny")
    third.find(fresh[0], (x,), {})
    assert third.stats["loaded"] == 1  # the replacement loads


def test_saved_graphs_can_be_switched_off(graphs_folder, monkeypatch):
    monkeypatch.setenv(precompile.DISABLE_ENV, "0")
    blocks = _blocks(2)
    assert precompile.compile_modules(blocks, "tiny") is None
    calls = [block._compiled_call_impl for block in blocks]
    assert all(call is not None and not isinstance(call, precompile.SavedGraphCall) for call in calls)


PROCESS = """
import json, sys, time
import numpy as np, torch
from PIL import Image
from qwen_edit import QwenEditPipeline
from qwen_edit.fp8 import fp8_supported
from qwen_edit.precompile import saved_graph_sites
compute = "fp8" if fp8_supported(sys.argv[2]) else "bf16"  # fp8: the GEMMs and the Triton GELU kernel
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
pipe = QwenEditPipeline.demo(cache_dir=sys.argv[1], device=sys.argv[2], compute=compute, compile=True)
start = time.perf_counter()
result = pipe.edit([image], "a red hat", seed=3, width=64, height=64, steps=2)
seconds = time.perf_counter() - start
eager = QwenEditPipeline.demo(cache_dir=sys.argv[1], device=sys.argv[2], compute=compute).edit(
    [image], "a red hat", seed=3, width=64, height=64, steps=2)
sites = {**saved_graph_sites(pipe.transformer), **saved_graph_sites(pipe.text_encoder)}
print(json.dumps({
    "stats": {site: g.stats for site, g in sites.items()},
    "failed": {site: g.failed for site, g in sites.items()},
    "traced": torch._dynamo.utils.counters["stats"]["unique_graphs"],
    "image": np.asarray(result.images[0]).tolist(),
    "eager": np.asarray(eager.images[0]).tolist(),
    "seconds": seconds,
}))
"""


def run_two_processes(tmp_path, device: str, hang_guard: float) -> tuple[dict, dict]:
    """The demo pipeline with compile=True in two fresh processes sharing one inductor cache folder
    (compiling takes minutes on a CPU: five times the CLI's hang guard)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "PYTHONPATH": str(REPO)}
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", PROCESS, str(tmp_path / "demo"), device], env=env,
                              capture_output=True, text=True, timeout=5 * hang_guard)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs[0], runs[1]


def check_second_process_ran_the_saved_graphs(first: dict, second: dict) -> None:
    import numpy as np

    sites = {"transformer-block", "text-encoder-layer", "vision-block"}
    assert set(first["stats"]) == sites and not any(first["failed"].values()), first["failed"]
    assert all(s["saved"] >= 1 and s["loaded"] == 0 for s in first["stats"].values()), first["stats"]
    for site in sites:
        assert second["stats"][site] == {
            "loaded": first["stats"][site]["saved"],
            "saved": 0,
            "fallback_calls": 0,
        }
    assert second["traced"] == 0  # no Dynamo tracing at all in the second process
    assert second["image"] == first["image"]  # the same kernels
    image, eager = np.asarray(second["image"], dtype=int), np.asarray(second["eager"], dtype=int)
    assert abs(image - eager).mean() < 1.0, abs(image - eager).mean()


def test_a_second_process_edits_with_the_first_ones_saved_graphs(tmp_path, subprocess_timeout):
    first, second = run_two_processes(tmp_path, "cpu", subprocess_timeout)
    check_second_process_ran_the_saved_graphs(first, second)


@torch.no_grad()
def test_blocks_that_start_or_stop_streaming_keep_compiled_calls_that_run_their_own_weights(
    graphs_folder, demo_dir
):
    from qwen_edit.model import comfy_forward
    from qwen_edit.offload import set_block_offload
    from qwen_edit.testing.demo import demo_files
    from qwen_edit.transformer import compile_blocks, load_transformer

    path = demo_files(demo_dir)["transformer"]
    eager = load_transformer(path, device="cpu", compute="bf16")
    model = load_transformer(path, device="cpu", compute="bf16", compile=True)
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 16, 1, 8, 8, generator=gen), torch.tensor([0.7]),
              torch.randn(1, 6, model.config.joint_attention_dim, generator=gen))  # fmt: skip
    expected = comfy_forward(eager, *inputs)
    blocks = model.transformer_blocks
    for resident in (1, 0, len(blocks)):
        set_block_offload(model, resident, use_pin_memory=False)
        compile_blocks(model)  # as QwenEditPipeline.set_offload does
        streamer = model._qwen_edit_streamer
        for i, block in enumerate(blocks):
            call = block._compiled_call_impl
            assert isinstance(call, precompile.SavedGraphCall) if i < resident else call is None, (
                resident,
                i,
            )
        buffers = streamer.buffers if streamer is not None else []
        assert all(isinstance(b._compiled_call_impl, precompile.SavedGraphCall) for b in buffers)
        error = float((comfy_forward(model, *inputs) - expected).norm() / expected.norm())
        assert error < 0.02, (resident, error)  # bf16 kernels compiled vs eager: ~0.5%; wrong weights: ~100%


def test_set_offload_on_a_compiled_pipeline_compiles_its_new_shells_and_buffers_anew(graphs_folder, demo_dir):
    from qwen_edit import QwenEditPipeline

    pipe = QwenEditPipeline.demo(cache_dir=demo_dir)
    blocks = pipe.transformer.transformer_blocks
    pipe.transformer.qwen_edit_compiled = True  # as compile=True leaves it, without compiling anything yet
    pipe.set_offload("enable", num_blocks_on_gpu=1)
    assert isinstance(blocks[0]._compiled_call_impl, precompile.SavedGraphCall)
    assert all(block._compiled_call_impl is None for block in blocks[1:])  # shells hand over to a buffer
    buffers = pipe.transformer._qwen_edit_streamer.buffers
    assert buffers and all(isinstance(b._compiled_call_impl, precompile.SavedGraphCall) for b in buffers)
    pipe.set_offload("disable")
    assert all(isinstance(block._compiled_call_impl, precompile.SavedGraphCall) for block in blocks)
