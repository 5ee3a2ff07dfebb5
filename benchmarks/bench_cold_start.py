"""Cold start, component by component: files on disk to modules ready on the GPU, against the disk floor.

For each model file: the load with its pages dropped from the page cache (posix_fadvise) and again with
them cached, so the difference is the disk and the rest is our processing. The floor is the file's
bytes over the disk's measured read bandwidth (one stream of 64 MiB reads, and 8 parallel streams).
Beside ours: diffusers' `QwenImageTransformer2DModel.from_pretrained(...).to("cuda")` of a bf16 model
folder with as many bytes as the SVDQ transformer file (19 of the 60 blocks), the way diffusers users
load a transformer.

    python benchmarks/bench_cold_start.py --workdir /tmp/qb --json benchmarks/results/cold_start.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import threading
import time
from pathlib import Path

import torch
from bench_pipeline import full_size_files
from bench_transformer import diffusers_bf16

from qwen_edit.svdq.checkpoint import DEFAULT_CONFIG
from qwen_edit.text_encoder import load_text_encoder
from qwen_edit.transformer import load_transformer
from qwen_edit.vae import load_vae
from runners.bench import drop_page_cache, read_bandwidth

DIFFUSERS_BLOCKS = 19  # 19 bf16 blocks (0.68 GB each) ~ the 13.1 GB fp4 r128 file


def parallel_read_bandwidth(path: Path, threads: int = 8, limit: int = 4 << 30) -> float:
    """Bytes/s reading the first `limit` bytes of `path` in `threads` interleaved 64 MiB chunks."""
    drop_page_cache([path])
    size = min(path.stat().st_size, limit)
    chunk = 64 << 20
    offsets = list(range(0, size, chunk))

    def worker(mine: list[int]) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            for off in mine:
                os.pread(fd, chunk, off)
        finally:
            os.close(fd)

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(offsets[i::threads],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return size / (time.perf_counter() - start)


def timed_load(load, files: list[Path]) -> dict:
    """(cold seconds, warm seconds) of `load()`, the result freed after each."""
    out = {}
    for label in ("cold", "warm"):
        gc.collect()
        torch.cuda.empty_cache()
        if label == "cold":
            drop_page_cache(files)
        torch.cuda.synchronize()
        start = time.perf_counter()
        module = load()
        torch.cuda.synchronize()
        out[f"{label}_s"] = round(time.perf_counter() - start, 2)
        del module
    out["bytes"] = sum(f.stat().st_size for p in files for f in ([p] if p.is_file() else p.rglob("*")))
    return out


def diffusers_folder(workdir: Path) -> Path:
    folder = workdir / f"diffusers-bf16-{DIFFUSERS_BLOCKS}blocks"
    if not (folder / "config.json").exists():
        model = diffusers_bf16({**DEFAULT_CONFIG, "num_layers": DIFFUSERS_BLOCKS}, "cuda")
        model.save_pretrained(folder, max_shard_size="5GB")
        del model
        torch.cuda.empty_cache()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--computes", nargs="+", default=["fp8"])
    args = parser.parse_args()
    from diffusers import QwenImageTransformer2DModel

    files = full_size_files(args.workdir, "fp4")
    folder = diffusers_folder(args.workdir)
    torch.zeros(1, device="cuda")  # CUDA context outside the timings
    single = read_bandwidth(files["transformer"], limit=4 << 30)
    parallel = parallel_read_bandwidth(files["transformer"])
    rows = {}
    for compute in args.computes:
        rows[f"transformer ({compute})"] = timed_load(
            lambda c=compute: load_transformer(
                files["transformer"], backend="portable", compute=c, device="cuda"
            ),
            [files["transformer"]],
        )
    rows["text encoder (fp8)"] = timed_load(
        lambda: load_text_encoder(files["text_encoder"], device="cuda"), [files["text_encoder"]]
    )
    rows["vae"] = timed_load(lambda: load_vae(files["vae"], device="cuda"), [files["vae"]])
    rows[f"diffusers from_pretrained bf16, {DIFFUSERS_BLOCKS} blocks"] = timed_load(
        lambda: QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).to("cuda"),
        [folder],
    )
    for row in rows.values():
        row["floor_s"] = round(row["bytes"] / single, 2)
        row["cold_vs_floor"] = round(row["cold_s"] / row["floor_s"], 2)
    result = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "disk_read_gb_s": {"one stream": round(single / 1e9, 3), "8 streams": round(parallel / 1e9, 3)},
        "rows": rows,
    }
    print(json.dumps(result, indent=2), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
