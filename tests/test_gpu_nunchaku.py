"""The Nunchaku backend on Nunchaku's real kernels (GPU with a working `nunchaku` install; else skipped).

On a card Nunchaku supports (SM 80/86/89 int4, SM 120/121 fp4) this runs as is. On an H100/H200 (SM 90)
it needs a from-source build of Nunchaku for SM 90 and QWEN_EDIT_FORCE_NUNCHAKU=int4 (benchmarks/
RESULTS.md, "Nunchaku's real kernels on the H200"). Checked: real kernels against the CPU emulator the
CI tests run on (so the emulator is checked too), against the portable backend, LoRAs, and offload with
pinned memory.
"""

from __future__ import annotations

import types

import nunchaku_emulator
import pytest
import torch

from qwen_edit.hardware import describe_device
from qwen_edit.lora import apply_loras
from qwen_edit.model import comfy_forward
from qwen_edit.nunchaku_backend import status
from qwen_edit.offload import set_block_offload
from qwen_edit.testing.transformer import (
    TINY_TRANSFORMER_CONFIG,
    quantize_transformer,
    tiny_reference_transformer,
)
from qwen_edit.transformer import load_transformer


def _precision() -> str | None:
    if not torch.cuda.is_available() or not status().ok:
        return None
    return describe_device("cuda").nunchaku_precision


PRECISION = _precision()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        PRECISION is None, reason="needs a CUDA card with Nunchaku kernels and nunchaku installed"
    ),
]
BLOCKS = 3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = {**TINY_TRANSFORMER_CONFIG, "num_layers": BLOCKS}
    path = tmp_path_factory.mktemp("gpu-nunchaku") / f"svdq-{PRECISION}_r32.safetensors"
    return quantize_transformer(tiny_reference_transformer(config=config), path, precision=PRECISION, rank=32)


def inputs(device):
    gen = torch.Generator().manual_seed(0)
    tensors = (
        torch.randn(1, 16, 1, 16, 20, generator=gen),
        torch.tensor([0.7]),
        torch.randn(1, 19, 64, generator=gen),
        [torch.randn(1, 16, 1, 12, 16, generator=gen)],
    )
    return tensors[0].to(device), tensors[1].to(device), tensors[2].to(device), [tensors[3][0].to(device)]


@torch.no_grad()
def run(model):
    return comfy_forward(model, *inputs(model.img_in.weight.device))


def emulated_ops() -> types.SimpleNamespace:
    names = ("quantize_w4a4_act_fuse_lora", "gemm_w4a4", "gemv_awq")
    return types.SimpleNamespace(**{n: getattr(nunchaku_emulator, n) for n in names})


def test_real_kernels_match_the_emulator_and_the_portable_backend(tiny, monkeypatch):
    model = load_transformer(tiny, backend="nunchaku", device="cuda")
    real = run(model)
    import nunchaku.ops.gemm
    import nunchaku.ops.gemv
    import nunchaku.ops.quantize

    for module in (nunchaku.ops.gemm, nunchaku.ops.gemv, nunchaku.ops.quantize):
        monkeypatch.setattr(module, "ops", emulated_ops())
    cpu = load_transformer(tiny, backend="nunchaku", device="cpu")
    emulated = run(cpu)
    monkeypatch.undo()
    portable = run(load_transformer(tiny, backend="portable", compute="bf16", device="cuda"))
    # The emulator differs from the GPU by its float32 accumulation (the int4 GEMM sums in bf16 there).
    errors = {"vs emulator": rel(real, emulated.to(real.device)), "vs portable": rel(real, portable)}
    print(errors)
    assert errors["vs emulator"] < 0.03, errors
    assert errors["vs portable"] < 0.15, errors  # the 4-bit activations, as on the CPU tests


def test_lora_and_pinned_offload_on_real_kernels(tiny, tmp_path):
    from test_nunchaku_backend import lora_file

    lora = lora_file(tmp_path / "lora.safetensors", blocks=[0, 2])
    model = load_transformer(tiny, backend="nunchaku", device="cuda")
    base = run(model)
    apply_loras(model, [(lora, 1.0)])
    with_lora = run(model)
    portable = load_transformer(tiny, backend="portable", compute="bf16", device="cuda")
    apply_loras(portable, [(lora, 1.0)])
    errors = {"lora effect": rel(with_lora, base), "vs portable": rel(with_lora, run(portable))}
    # The kernels sum the low-rank branch with atomics: two runs of the same model may differ a little.
    noise = rel(run(model), with_lora)
    set_block_offload(model, 1, use_pin_memory=True)
    streamed = model.transformer_blocks[2]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in streamed.parameters())
    errors["streamed vs resident"] = rel(run(model), with_lora)
    loaded_streamed = load_transformer(tiny, backend="nunchaku", device="cuda", num_blocks_on_gpu=1,
                                       use_pin_memory=True)  # fmt: skip
    assert all(p.device.type == "cpu" for p in loaded_streamed.transformer_blocks[1].parameters())
    errors["loaded streamed vs resident"] = rel(run(loaded_streamed), base)
    print(errors, "run-to-run:", noise)
    assert errors["lora effect"] > 0.15 and errors["vs portable"] < 0.15, errors
    assert errors["streamed vs resident"] <= max(10 * noise, 1e-3), errors
    assert errors["loaded streamed vs resident"] <= max(10 * noise, 1e-3), errors
