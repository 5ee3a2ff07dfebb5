"""Transformer block streaming on the GPU: step time and memory for num_blocks_on_gpu in {60, 30, 10, 1},
pinned and pageable host memory, and the per-block arithmetic that says how much transfer can hide.

    python benchmarks/bench_offload.py --workdir /tmp/qb --json benchmarks/results/offload.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from bench_pipeline import full_size_files
from bench_transformer import forward_inputs, time_forward

from qwen_edit.transformer import load_transformer


def cuda_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def block_arithmetic(path: Path, compute: str, inputs: dict) -> dict:
    """Per block: copy of its packed tensors (pinned and pageable), expansion, and compute."""
    model = load_transformer(path, backend="portable", compute=compute, device="cuda", num_blocks_on_gpu=59,
                             use_pin_memory=True)  # fmt: skip
    streamer = model._qwen_edit_streamer
    packed = streamer.host[59]  # what is kept in (pinned) host memory for a streamed block
    nbytes = sum(t.numel() * t.element_size() for layer in packed.values() for t in layer.values())
    pageable = {layer: {k: v.clone() for k, v in t.items()} for layer, t in packed.items()}  # clone: unpinned

    def copy(source):
        for layer, tensors in source.items():
            for k, v in tensors.items():
                streamer.staging[0][layer][k].copy_(v, non_blocking=True)

    copy_pinned = cuda_ms(lambda: copy(packed))
    copy_pageable = cuda_ms(lambda: copy(pageable))
    streamer._prefetch(59)
    torch.cuda.synchronize()

    def expand():
        streamer.pending[59] = 0
        streamer.copied[0] = None  # the staging copy above already finished
        streamer._materialize(59)

    expand_ms = cuda_ms(expand)
    with torch.no_grad():
        step_ms = statistics.median(time_forward(model, inputs, 1, 3))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "packed_block_mb": round(nbytes / 1e6, 1),
        "copy_pinned_ms": round(copy_pinned, 2),
        "copy_pageable_ms": round(copy_pageable, 2),
        "pinned_gb_s": round(nbytes / copy_pinned / 1e6, 1),
        "pageable_gb_s": round(nbytes / copy_pageable / 1e6, 1),
        "expand_ms": round(expand_ms, 2),
        "resident_step_ms_59_blocks_plus_1": round(step_ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--compute", default="fp8")
    parser.add_argument("--blocks", type=int, nargs="+", default=[60, 30, 10, 1])
    args = parser.parse_args()

    files = full_size_files(args.workdir, "fp4")
    inputs = forward_inputs(1024, 1, 256, torch.device("cuda"))
    rows = []
    for pin in (False, True):
        for n in args.blocks:
            if n == 60 and pin:
                continue  # nothing is streamed: pinning changes nothing
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            model = load_transformer(
                files["transformer"], backend="portable", compute=args.compute, device="cuda",
                num_blocks_on_gpu=None if n >= 60 else n, use_pin_memory=pin,
            )  # fmt: skip
            load_s = time.perf_counter() - start
            weights = torch.cuda.memory_allocated()
            times = time_forward(model, inputs, 2, 5)
            row = {
                "num_blocks_on_gpu": n,
                "use_pin_memory": pin,
                "load_s": round(load_s, 1),
                "step_ms": round(statistics.median(times), 1),
                "gpu_weights_gib": round(weights / 2**30, 2),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            del model
    arithmetic = block_arithmetic(files["transformer"], args.compute, inputs)
    print(json.dumps(arithmetic), flush=True)
    base = next(r["step_ms"] for r in rows if r["num_blocks_on_gpu"] >= 60)
    per_block_compute = base / 60
    for r in rows:
        streamed = 60 - r["num_blocks_on_gpu"]
        if not streamed:
            continue
        copy = arithmetic["copy_pinned_ms" if r["use_pin_memory"] else "copy_pageable_ms"]
        serial = base + streamed * (copy + arithmetic["expand_ms"])  # if nothing overlapped
        ideal = base + streamed * max(
            0.0, max(copy, per_block_compute + arithmetic["expand_ms"]) - per_block_compute
        )
        r["if_serial_ms"] = round(serial, 1)
        r["if_fully_overlapped_ms"] = round(ideal, 1)
        r["copy_hidden_pct"] = round(100 * (serial - r["step_ms"]) / max(1e-9, streamed * copy), 1)
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "compute": args.compute,
              "size": 1024, "rows": rows, "per_block": arithmetic}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
