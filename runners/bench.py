"""Benchmark harness: per-stage and end-to-end edit latency, cold start, peak memory; JSON and a chart.

Several configurations run one after another in one process on one card (comparison mode), each:
cold start (files on disk to the first image, page cache dropped per file with posix_fadvise where the
OS allows, and said so in the output), warm-up edits, then repeated edits whose per-stage times
(`EditResult.timings`: text encode, VAE encode, each step, VAE decode; CUDA-synchronized) are
reported as medians. The floor for the cold start is the bytes read over the disk's measured
sequential read bandwidth.

    qwen-edit bench --config configs/runpod-pod.yaml --compute fp8 bf16 --json out.json --chart out.png
    qwen-edit bench --demo --size 64 --steps 2        # tiny model, CPU: checks the harness itself
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from qwen_edit.precompile import saved_graph_sites

STAGES = ("text_encode", "vae_encode", "steps", "vae_decode")
COLORS = {
    "text_encode": (66, 133, 244),
    "vae_encode": (52, 168, 83),
    "steps": (251, 188, 5),
    "vae_decode": (234, 67, 53),
}


def drop_page_cache(paths: list[Path]) -> bool:
    """Evict the files' pages from the page cache (POSIX_FADV_DONTNEED); False where not possible."""
    if not hasattr(os, "posix_fadvise"):
        return False
    ok = True
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            try:
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fsync(fd)  # dirty pages (a file just written) are not dropped until written back
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except OSError:
                ok = False
    return ok


def read_bandwidth(path: Path, limit: int = 2 << 30) -> float:
    """Sequential read bandwidth (bytes/s) of up to `limit` bytes of `path`, page cache dropped first."""
    drop_page_cache([path])
    start, total = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while total < limit:
            chunk = f.read(64 << 20)
            if not chunk:
                break
            total += len(chunk)
    return total / max(time.perf_counter() - start, 1e-9)


def bench_config(name: str, build, *, image: Image.Image, prompt: str, edit_kwargs: dict, warmup: int,
                 repeats: int, files: list[Path], device: torch.device) -> dict:  # fmt: skip
    """One configuration: cold start, then `repeats` timed edits after `warmup` untimed ones."""
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cache_dropped = drop_page_cache(files)
    start = time.perf_counter()
    pipe = build()
    load_s = time.perf_counter() - start
    first = pipe.edit([image], prompt, **edit_kwargs)
    cold_start_s = time.perf_counter() - start
    for _ in range(warmup):
        pipe.edit([image], prompt, **edit_kwargs)
    runs = [pipe.edit([image], prompt, **edit_kwargs).timings for _ in range(repeats)]
    info = pipe.info()
    row = {
        "config": name,
        "load_s": round(load_s, 3),
        "cold_start_s": round(cold_start_s, 3),
        "first_edit_s": round(first.timings["total"], 3),
        "first_edit_ms": {
            key: round(1000 * (sum(value) if isinstance(value, list) else value), 1)
            for key, value in first.timings.items()
        },
        "load_phases_s": pipe.load_seconds,
        "page_cache_dropped": cache_dropped,
        "median_ms": {
            "text_encode": _median_ms(r["text_encode"] for r in runs),
            "vae_encode": _median_ms(r["vae_encode"] for r in runs),
            "step": _median_ms(s for r in runs for s in r["steps"]),
            "steps": _median_ms(sum(r["steps"]) for r in runs),
            "vae_decode": _median_ms(r["vae_decode"] for r in runs),
            "total": _median_ms(r["total"] for r in runs),
        },
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        **{key: info.get(key) for key in ("backend", "compute", "text_encoder_compute", "offload")},
    }
    graphs = {**saved_graph_sites(pipe.transformer), **saved_graph_sites(pipe.text_encoder)}
    if graphs:  # compiled graphs loaded from disk, or compiled and saved by this process (precompile.py)
        row["saved_graphs"] = {site: dict(g.stats, failed=g.failed) for site, g in graphs.items()}
    stages = sum(row["median_ms"][k] for k in STAGES)
    row["overhead_pct"] = round(100 * (row["median_ms"]["total"] - stages) / max(stages, 1e-9), 1)
    del pipe
    return row


def _median_ms(values) -> float:
    return round(statistics.median(list(values)) * 1000, 2)


def write_chart(result: dict, path: Path) -> Path:
    """A horizontal stacked bar per configuration: where the time of one edit goes (PNG, no plotting deps)."""
    rows = result["rows"]
    width, bar_h, left, top = 900, 28, 260, 40
    height = top + len(rows) * (bar_h + 14) + 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), f"{result['card']}: one edit, median ms per stage", fill="black")
    longest = max(sum(r["median_ms"][k] for k in STAGES) for r in rows) or 1.0
    scale = (width - left - 80) / longest  # room for the total at the end of the longest bar
    for i, row in enumerate(rows):
        y = top + i * (bar_h + 14)
        draw.text((10, y + 8), row["config"][:40], fill="black")
        x = left
        for stage in STAGES:
            w = row["median_ms"][stage] * scale
            draw.rectangle([x, y, x + w, y + bar_h], fill=COLORS[stage])
            x += w
        draw.text((x + 4, y + 8), f"{row['median_ms']['total']:.0f} ms", fill="black")
    x = left
    for stage in STAGES:
        draw.rectangle([x, height - 30, x + 14, height - 16], fill=COLORS[stage])
        draw.text((x + 18, height - 30), stage, fill="black")
        x += 140
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def run(argv: list[str] | None = None) -> dict:
    """Parse arguments, run every configuration, write JSON (and a chart); returns the result."""
    from qwen_edit import QwenEditPipeline
    from qwen_edit.settings import load_settings, resolve_spec
    from qwen_edit.testing.demo import demo_settings

    parser = argparse.ArgumentParser(prog="qwen-edit bench", description="Per-stage edit latency benchmark.")
    parser.add_argument("--config", action="append", default=[], help="settings YAML (repeatable: layered)")
    parser.add_argument("--demo", action="store_true", help="use the tiny demo model (checks the harness)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", nargs="+", default=["auto"], help="one configuration per value")
    parser.add_argument("--compute", nargs="+", default=["auto"], help="one configuration per value")
    parser.add_argument(
        "--text-encoder-compute",
        nargs="+",
        default=["upcast"],
        help="one configuration per value: upcast, fp8",
    )
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--size", type=int, default=1024, help="input and output side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--prompt", default="turn the sky into a warm sunset and add reflections on the water"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench.json"))
    parser.add_argument("--chart", type=Path, default=None, help="PNG of per-stage time by configuration")
    args = parser.parse_args(argv)
    if not args.demo and not args.config:
        parser.error("give --config (model folders and names) or --demo")

    device = torch.device(args.device) if args.device else (torch.device("cuda") if torch.cuda.is_available()
                                                             else torch.device("cpu"))  # fmt: skip
    # The demo's files as settings: its own image budgets keep a CPU run short.
    settings = demo_settings() if args.demo else load_settings(args.config)
    base = resolve_spec(settings, device=str(device))  # every file found before the first load
    paths = [p for p in (base.files.transformer, base.files.text_encoder, base.files.vae) if p is not None]
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    )
    edit_kwargs = {"seed": 0, "steps": args.steps, "width": args.size, "height": args.size}
    rows = []
    configs = [(b, c, t) for b in args.backend for c in args.compute for t in args.text_encoder_compute]
    for backend, compute, encoder_compute in configs:
        spec = resolve_spec(
            settings, device=str(device), compute=compute, compile=args.compile,
            text_encoder_compute=encoder_compute,
            backend=None if args.demo else backend,  # the demo runs the portable backend
        )  # fmt: skip
        name = f"{spec.backend}/{compute}"  # then only what differs from the defaults
        name += "/encoder-fp8" if encoder_compute == "fp8" else ""
        rows.append(bench_config(
            name + ("/compiled" if args.compile else ""), lambda s=spec: QwenEditPipeline.from_spec(s),
            image=image, prompt=args.prompt, edit_kwargs=edit_kwargs, warmup=args.warmup,
            repeats=args.repeats, files=paths, device=device,
        ))  # fmt: skip
    total_bytes = sum(p.stat().st_size if p.is_file() else 0 for p in paths)
    bandwidth = read_bandwidth(max(paths, key=lambda p: p.stat().st_size if p.is_file() else 0))
    result = {
        "card": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "size": args.size,
        "steps": args.steps,
        "repeats": args.repeats,
        "model_bytes": total_bytes,
        "disk_read_gb_s": round(bandwidth / 1e9, 3),
        "cold_start_floor_s": round(total_bytes / bandwidth, 3),
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    if args.chart is not None:
        write_chart(result, args.chart)
    return result


def main(argv: list[str] | None = None) -> int:
    result = run(argv)
    for row in result["rows"]:
        m = row["median_ms"]
        print(f"{row['config']:<28} text {m['text_encode']:8.1f}  vae-enc {m['vae_encode']:8.1f}  "
              f"step {m['step']:8.1f}  vae-dec {m['vae_decode']:8.1f}  total {m['total']:8.1f} ms  "
              f"cold start {row['cold_start_s']:.2f} s")  # fmt: skip
    print(f"cold-start floor: {result['cold_start_floor_s']} s ({result['model_bytes'] / 1e9:.2f} GB at "
          f"{result['disk_read_gb_s']} GB/s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
