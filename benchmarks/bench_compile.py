"""Does torch.compile pay on the portable transformer? Eager vs per-block compiled, bf16 and fp8.

Prediction recorded before the run (benchmarks/RESULTS.md): the GEMMs are ~70% of an eager bf16 step
(230 TFLOP of linears at ~790 TFLOP/s ~ 290 ms of 396 ms); compile fuses the elementwise work around
them (norms, modulation, RoPE, and in fp8 the per-token activation quantization, 4-5 kernels per linear
in eager), so bf16 should gain ~10% and fp8 ~25%.

    python benchmarks/bench_compile.py --workdir /tmp/qb --json benchmarks/results/compile.json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--computes", nargs="+", default=["bf16", "fp8"])
    args = parser.parse_args()
    files = full_size_files(args.workdir, "fp4")
    inputs = forward_inputs(1024, 1, 256, torch.device("cuda"))
    rows = []
    for compute in args.computes:
        model = load_transformer(files["transformer"], backend="portable", compute=compute, device="cuda")
        eager = statistics.median(time_forward(model, inputs, 2, 5))
        for block in model.transformer_blocks:
            block.compile(dynamic=False)
        start = time.perf_counter()
        time_forward(model, inputs, 1, 1)  # first call compiles (all blocks share one graph)
        compile_s = time.perf_counter() - start
        compiled = statistics.median(time_forward(model, inputs, 2, 5))
        row = {"compute": compute, "eager_ms": round(eager, 1), "compiled_ms": round(compiled, 1),
               "compile_s": round(compile_s, 1), "speedup": round(eager / compiled, 3)}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
