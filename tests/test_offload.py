"""Block streaming and offload planning (CPU; the GPU measurements live in benchmarks/bench_offload.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from qwen_edit import QwenEditPipeline
from qwen_edit import pipeline as pipeline_module
from qwen_edit.lora import apply_loras
from qwen_edit.model import comfy_forward
from qwen_edit.offload import ACTIVATION_BYTES, GIB, plan_offload, set_block_offload
from qwen_edit.pipeline import GPUOutOfMemoryError
from qwen_edit.svdq import checkpoint
from qwen_edit.testing.demo import demo_files
from qwen_edit.testing.transformer import write_tiny_transformer
from qwen_edit.transformer import load_transformer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_transformer(tmp_path_factory.mktemp("off") / "tiny.safetensors", precision="fp4")


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, 16, 1, 8, 8, generator=gen), torch.tensor([0.7, 0.7]),
            torch.randn(2, 5, 64, generator=gen), [torch.randn(1, 16, 1, 6, 10, generator=gen)])  # fmt: skip


def _load(path, compute="bf16", **kwargs):
    return load_transformer(
        path, backend="portable", compute=compute, device="cpu", dtype=torch.float32, **kwargs
    )


@torch.no_grad()
@pytest.mark.parametrize("num_blocks_on_gpu", [0, 1])
@pytest.mark.parametrize("compute", ["bf16", "fp8"])  # packed 4-bit streamed / fp8 weights streamed
def test_streamed_blocks_give_identical_outputs(tiny, num_blocks_on_gpu, compute):
    resident = comfy_forward(_load(tiny, compute), *_inputs())
    model = _load(tiny, compute, num_blocks_on_gpu=num_blocks_on_gpu)
    assert model._qwen_edit_streamer.form == {"bf16": "packed", "fp8": "weights"}[compute]
    streamed_weights = [m.weight for m in model.transformer_blocks[-1].modules() if hasattr(m, "compute")]
    assert streamed_weights and all(w is None for w in streamed_weights)  # the block really left
    assert torch.equal(comfy_forward(model, *_inputs()), resident)
    assert torch.equal(comfy_forward(model, *_inputs()), resident)  # and again: the prefetch wrapped around


@torch.no_grad()
def test_changing_the_setting_moves_blocks_and_keeps_outputs(tiny):
    model = _load(tiny)
    resident = comfy_forward(model, *_inputs())
    for n in (1, 0, 2, 0, 1, 2):
        set_block_offload(model, n, use_pin_memory=False)
        assert (model._qwen_edit_streamer is None) == (n == 2)
        assert torch.equal(comfy_forward(model, *_inputs()), resident), n


@torch.no_grad()
def test_loras_reach_streamed_blocks(tiny, tmp_path):
    gen = torch.Generator().manual_seed(1)
    lora = {}
    for block in (0, 1):
        for name, (n, k) in {
            "attn.to_k": (128, 128),
            "img_mlp.net.2": (128, 512),
            "txt_mod.1": (768, 128),
        }.items():
            key = f"transformer_blocks.{block}.{name}"
            lora[f"{key}.lora_A.weight"] = torch.randn(4, k, generator=gen) / k**0.5
            lora[f"{key}.lora_B.weight"] = torch.randn(n, 4, generator=gen) * 0.3
    path = tmp_path / "l.safetensors"
    save_file(lora, str(path))
    resident = _load(tiny)
    apply_loras(resident, [(path, 0.9)])
    expected = comfy_forward(resident, *_inputs())
    streamed = _load(tiny, num_blocks_on_gpu=0)
    apply_loras(streamed, [(path, 0.9)])
    assert torch.equal(comfy_forward(streamed, *_inputs()), expected)
    apply_loras(streamed, [])
    assert torch.equal(comfy_forward(streamed, *_inputs()), comfy_forward(_load(tiny), *_inputs()))


# Full-size Qwen-Image-Edit-2509 numbers: 60 blocks of 339.7 M weights; fp8 text encoder 8.3 GB file.
# fp8 blocks of 339.7 M weights (streamed through two fp8 buffer blocks), an 8.3 GB fp8 text encoder.
FULL = dict(
    num_blocks=60, block_bytes=339_738_624, stream_buffer_bytes=2 * 339_738_624,
    other_transformer_bytes=int(0.08 * GIB), text_encoder_bytes=int(8.3e9), vae_bytes=int(0.25e9),
)  # fmt: skip


@pytest.mark.parametrize(
    "card_gib, expect_encoders_on_cpu, expect_blocks",
    [(80, False, 60), (32, True, 60), (24, True, 42), (16, True, 17), (12, True, 4)],
)
def test_auto_fits_the_card(card_gib, expect_encoders_on_cpu, expect_blocks):
    budget = int((card_gib - 1) * GIB)  # what a card leaves after the CUDA context
    plan = plan_offload(cpu_offload="auto", num_blocks_on_gpu=1, use_pin_memory=True, budget=budget, **FULL)
    assert (plan.encoders_on_cpu, plan.blocks_on_gpu) == (expect_encoders_on_cpu, expect_blocks), plan.reason
    # Whatever it chose fits: resident blocks (+ buffer, staging, temporaries if streaming) and the
    # largest stage: the encoders and the activations take turns.
    act = ACTIVATION_BYTES
    resident = FULL["other_transformer_bytes"] + plan.blocks_on_gpu * FULL["block_bytes"]
    if plan.streams_blocks:
        resident += FULL["stream_buffer_bytes"]
    te, vae = FULL["text_encoder_bytes"], FULL["vae_bytes"]
    if plan.encoders_on_cpu:
        peak = max(te + act["text_encoder"], vae + act["vae"], act["transformer"])
    else:
        peak = te + vae + max(act.values())
    assert resident + peak <= budget


def test_explicit_settings_and_errors():
    plan = plan_offload(cpu_offload="enable", num_blocks_on_gpu=20, use_pin_memory=False, budget=None, **FULL)
    assert (plan.blocks_on_gpu, plan.encoders_on_cpu, plan.streams_blocks) == (20, True, True)
    plan = plan_offload(cpu_offload="disable", num_blocks_on_gpu=20, use_pin_memory=False, budget=1, **FULL)
    assert (plan.blocks_on_gpu, plan.streams_blocks) == (60, False)
    assert plan_offload(cpu_offload="auto", num_blocks_on_gpu=1, use_pin_memory=False, budget=None,
                        **FULL).reason == "not a CUDA device: nothing to offload"  # fmt: skip
    with pytest.raises(MemoryError, match="every transformer block streamed"):
        plan_offload(cpu_offload="auto", num_blocks_on_gpu=1, use_pin_memory=False, budget=4 * GIB, **FULL)
    with pytest.raises(ValueError, match="cpu_offload: must be one of"):
        plan_offload(cpu_offload="yes", num_blocks_on_gpu=1, use_pin_memory=False, budget=None, **FULL)
    with pytest.raises(ValueError, match=r"num_blocks_on_gpu: must be in \[0, 60\]"):
        plan_offload(cpu_offload="enable", num_blocks_on_gpu=61, use_pin_memory=False, budget=None, **FULL)


@pytest.fixture(scope="module")
def demo(demo_dir):
    return QwenEditPipeline.demo(cache_dir=demo_dir)


def test_the_transformer_header_is_read_once(demo_dir, monkeypatch):
    """Planning, loading, block streaming and later offload changes share one read of the checkpoint's
    header (the real file's lists ~5,000 tensors)."""
    files = demo_files(demo_dir)
    reads = []
    read_header = checkpoint.read_header
    monkeypatch.setattr(checkpoint, "read_header", lambda path: reads.append(Path(path)) or read_header(path))
    pipe = QwenEditPipeline.from_files(
        **files, device="cpu", backend="portable", compute="bf16", cpu_offload="enable", num_blocks_on_gpu=1
    )
    assert pipe.transformer._qwen_edit_streamer is not None  # streaming set up at load
    assert pipe.set_offload("enable", num_blocks_on_gpu=0).streams_blocks
    assert not pipe.set_offload("disable").streams_blocks
    assert reads == [Path(files["transformer"])]


def test_pipeline_offload_settings_give_the_same_images(demo):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    kwargs = dict(seed=2, width=48, height=32)
    base = np.asarray(demo.edit([image], "p", **kwargs).images[0])
    plan = demo.set_offload("enable", num_blocks_on_gpu=1)
    assert plan.streams_blocks and plan.encoders_on_cpu
    assert np.array_equal(np.asarray(demo.edit([image], "p", **kwargs).images[0]), base)
    plan = demo.set_offload("disable")
    assert not plan.streams_blocks and demo.transformer._qwen_edit_streamer is None
    assert np.array_equal(np.asarray(demo.edit([image], "p", **kwargs).images[0]), base)


def test_out_of_memory_is_reported_with_settings_and_the_pipeline_survives(demo, monkeypatch):
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline_module, "comfy_forward", oom)
        with pytest.raises(GPUOutOfMemoryError, match="during sampling.*num_blocks_on_gpu=") as info:
            demo.edit([image], "p", width=32, height=32)
    assert info.value.suggestion["cpu_offload"] == "enable"
    assert info.value.suggestion["num_blocks_on_gpu"] < len(demo.transformer.transformer_blocks)
    assert demo.edit([image], "p", width=32, height=32).images[0].size == (32, 32)
