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
        result = pipe.edit([image], "a sunset", seed=0, steps=2, width=1024, height=1024)
        assert result.images[0].size == (1024, 1024)
        assert torch.cuda.max_memory_reserved() <= card_gib * 2**30
        print(card_gib, "GiB card: peak", torch.cuda.max_memory_allocated() / 2**30, result.timings)
    finally:
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
