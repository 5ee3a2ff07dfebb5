"""Offload "auto" on full-size files under a simulated 24 GB and 16 GB card (GPU machine only).

Needs the full-size random files that benchmarks/bench_pipeline.py writes; point QWEN_EDIT_FULL_SIZE_DIR
at its --workdir. Skipped without a GPU or without the files.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
FULL = Path(os.environ.get("QWEN_EDIT_FULL_SIZE_DIR", "/nonexistent"))


@pytest.mark.skipif(not (FULL / "svdq-fp4_r128-random.safetensors").exists(), reason="no full-size files")
@pytest.mark.parametrize("card_gib, streams", [(24, True), (16, True)])
def test_auto_fits_a_smaller_card_and_the_edit_completes(card_gib, streams):
    from qwen_edit import QwenEditPipeline

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(card_gib * 2**30 / total)
    try:
        torch.cuda.reset_peak_memory_stats()
        pipe = QwenEditPipeline.from_files(
            transformer=FULL / "svdq-fp4_r128-random.safetensors",
            text_encoder=FULL / "qwen_2.5_vl_7b_fp8_scaled-random.safetensors",
            vae=FULL / "qwen_image_vae-random.safetensors", tokenizer=FULL / "tokenizer",
            device="cuda", backend="portable", compute="auto", cpu_offload="auto",
        )  # fmt: skip
        plan = pipe.offload_plan
        print(card_gib, plan)
        assert plan.encoders_on_cpu and plan.streams_blocks == streams
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
        streamed = []
        result = pipe.edit(
            [image], "a sunset", seed=0, steps=2, width=1024, height=1024,
            callback=lambda step, total, x0: streamed.append(x0.float().cpu()),
        )  # fmt: skip
        assert result.images[0].size == (1024, 1024)
        assert torch.cuda.max_memory_reserved() <= card_gib * 2**30
        print(card_gib, "GiB card: peak", torch.cuda.max_memory_allocated() / 2**30, result.timings)

        # The same edit with everything resident on the whole card. Offloading moves weights, it never
        # changes them, and the streamed blocks run the same kernels on the same values: the x0 of each
        # step agrees to the kernels' rounding (exact in the CPU-side test of streamed blocks). A block
        # run with stale or wrong weights, or a stage skipped, moves x0 by tens of percent. The images
        # may differ a little more: a decode that ran out of memory on the small card fell back to
        # tiles, which are close to the whole decode but not equal.
        torch.cuda.set_per_process_memory_fraction(1.0)
        pipe.set_offload(cpu_offload="disable")
        assert not pipe.offload_plan.streams_blocks and not pipe.offload_plan.encoders_on_cpu
        resident = []
        again = pipe.edit(
            [image], "a sunset", seed=0, steps=2, width=1024, height=1024,
            callback=lambda step, total, x0: resident.append(x0.float().cpu()),
        )  # fmt: skip
        errors = [((x - y).norm() / y.norm()).item() for x, y in zip(streamed, resident, strict=True)]
        assert max(errors) < 1e-3, errors
        diff = np.abs(np.asarray(result.images[0], dtype=int) - np.asarray(again.images[0], dtype=int))
        assert diff.mean() < 1.0, diff.mean()
    finally:
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
