"""Full-size transformer timing: SVDQ files through the portable backend vs diffusers' bf16 model.

Writes full-size (60-block) random-weight SVDQ files in the real layout
(qwen_edit.testing.transformer.write_random_checkpoint), loads each through `load_transformer` in bf16
and fp8 modes, and runs the Qwen-Image-Edit forward at 1024x1024 output with one 1024x1024 reference
image and a 256-token prompt. The baseline, diffusers' QwenImageTransformer2DModel in bf16 with random
weights, runs in the same process on the same card.

    python benchmarks/bench_transformer.py --workdir /tmp/qwen-bench \
        --json benchmarks/results/transformer.json
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from qwen_edit.svdq.checkpoint import DEFAULT_CONFIG
from qwen_edit.testing.transformer import write_random_checkpoint
from qwen_edit.transformer import load_transformer


def forward_inputs(size: int, ref_images: int, text_tokens: int, device, dtype=torch.bfloat16) -> dict:
    """The transformer's inputs for one edit step: packed latents of the output + reference images."""
    side = size // 16  # VAE /8, then 2x2 patches
    gen = torch.Generator(device).manual_seed(0)
    tokens = side * side * (1 + ref_images)
    inputs = dict(
        hidden_states=torch.randn(1, tokens, 64, generator=gen, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, text_tokens, 3584, generator=gen, device=device, dtype=dtype),
        encoder_hidden_states_mask=torch.ones(1, text_tokens, device=device, dtype=torch.long),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        img_shapes=[[(1, side, side)] * (1 + ref_images)],
        return_dict=False,
    )
    from diffusers import QwenImageTransformer2DModel

    # diffusers 0.36 (the worker extra's line) sizes the text RoPE from `txt_seq_lens`; later releases
    # take it from encoder_hidden_states and no longer accept the argument.
    if "txt_seq_lens" in inspect.signature(QwenImageTransformer2DModel.forward).parameters:
        inputs["txt_seq_lens"] = [text_tokens]
    return inputs


@torch.no_grad()
def time_forward(model, inputs: dict, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        model(**inputs)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(**inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


@torch.no_grad()
def diffusers_bf16(config: dict, device) -> torch.nn.Module:
    """diffusers' model with random bf16 weights, allocated directly on the GPU (no fp32 init)."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights():
        model = QwenImageTransformer2DModel.from_config({k: v for k, v in config.items() if k[0] != "_"})
    model = model.to(torch.bfloat16).to_empty(device=device)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    return model.eval()


def random_lora(config: dict, rank: int, path: Path) -> Path:
    """A rank-`rank` LoRA on every block Linear (diffusers names, bf16), as ai-toolkit trains them."""
    from safetensors.torch import save_file

    from qwen_edit.lora import BLOCK_TARGETS

    d = config["num_attention_heads"] * config["attention_head_dim"]
    sizes = {
        "img_mlp.net.0.proj": (4 * d, d),
        "txt_mlp.net.0.proj": (4 * d, d),
        "img_mlp.net.2": (d, 4 * d),
        "txt_mlp.net.2": (d, 4 * d),
        "img_mod.1": (6 * d, d),
        "txt_mod.1": (6 * d, d),
    }
    tensors = {}
    for i in range(config["num_layers"]):
        for name in BLOCK_TARGETS:
            n, k = sizes.get(name, (d, d))
            key = f"diffusion_model.transformer_blocks.{i}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, k) / k**0.5).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(n, rank) * 0.01).bfloat16()
    save_file(tensors, str(path))
    return path


def measure_lora(model, lora_path: Path, inputs: dict, args, base: dict) -> dict:
    from qwen_edit.lora import apply_loras, read_lora

    read_lora(lora_path)  # parse once (file read), like a worker that keeps its LoRAs
    before = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    start = time.perf_counter()
    apply_loras(model, [(lora_path, 1.0)])
    torch.cuda.synchronize()
    apply_s = time.perf_counter() - start
    extra = torch.cuda.memory_allocated() - before
    times = time_forward(model, inputs, args.warmup, args.repeats)
    start = time.perf_counter()
    apply_loras(model, [(lora_path, 0.5)])
    torch.cuda.synchronize()
    restrength_s = time.perf_counter() - start
    apply_loras(model, [])
    row = {
        "config": f"{base['config']} + rank-{args.lora_rank} LoRA",
        "lora_apply_s": round(apply_s, 2),
        "lora_change_strength_s": round(restrength_s, 2),
        "lora_extra_gib": round(extra / 2**30, 2),
        "step_ms_median": round(statistics.median(times), 1),
        "step_overhead_ms": round(statistics.median(times) - base["step_ms_median"], 1),
    }
    print(json.dumps(row), flush=True)
    return row


def measure(name: str, build, inputs: dict, args, lora_path: Path | None = None) -> list[dict]:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = build()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    weights = torch.cuda.memory_allocated()
    times = time_forward(model, inputs, args.warmup, args.repeats)
    row = {
        "config": name,
        "load_s": round(load_s, 2),
        "step_ms_median": round(statistics.median(times), 1),
        "step_ms_all": [round(t, 1) for t in times],
        "weights_gib": round(weights / 2**30, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    print(json.dumps(row), flush=True)
    rows = [row]
    if lora_path is not None:
        rows.append(measure_lora(model, lora_path, inputs, args, row))
    del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the full-size files are written")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--precisions", nargs="+", default=["fp4", "int4"])
    parser.add_argument("--computes", nargs="+", default=["bf16", "fp8"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--lora-rank", type=int, default=0, help="also time a LoRA of this rank (0: none)")
    parser.add_argument("--compile", action="store_true", help="also time each portable model compiled")
    args = parser.parse_args()

    device = torch.device("cuda")
    config = dict(DEFAULT_CONFIG)
    inputs = forward_inputs(args.size, 1, args.text_tokens, device)
    # diffusers' pipelines always pass the prompt mask, so its attention runs with a mask (PyTorch's
    # memory-efficient kernel); the portable model needs none (one prompt, no padding) and the row
    # without it shows what the mask costs diffusers.
    unmasked = {**inputs, "encoder_hidden_states_mask": None}
    rows = measure("diffusers bf16 (baseline)", lambda: diffusers_bf16(config, device), inputs, args)
    rows += measure("diffusers bf16, no text mask", lambda: diffusers_bf16(config, device), unmasked, args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    lora_path = None
    if args.lora_rank:
        lora_path = random_lora(config, args.lora_rank, args.workdir / f"lora-r{args.lora_rank}.safetensors")
    for precision in args.precisions:
        path = args.workdir / f"svdq-{precision}_r{args.rank}-random.safetensors"
        if not path.exists():
            start = time.perf_counter()
            write_random_checkpoint(path, config, precision=precision, rank=args.rank, device=device)
            seconds = time.perf_counter() - start
            print(f"wrote {path.name} ({path.stat().st_size / 1e9:.1f} GB) in {seconds:.0f}s", flush=True)
        for compute in args.computes:
            for compiled in (False, True) if args.compile else (False,):
                rows += measure(
                    f"portable {precision} r{args.rank}, {compute}" + (", compiled" if compiled else ""),
                    lambda p=path, c=compute, k=compiled: load_transformer(
                        p, backend="portable", compute=c, device=device, compile=k
                    ),
                    unmasked,
                    args,
                    lora_path if precision == args.precisions[0] and not compiled else None,
                )
                torch._dynamo.reset()
    result = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "size": args.size,
        "reference_images": 1,
        "text_tokens": args.text_tokens,
        "note": "load_s reads a file just written (page cache warm); weights are random",
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(markdown_table(result))


def markdown_table(result: dict) -> str:
    base = result["rows"][0]["step_ms_median"]
    lines = [
        f"{result['card']}, torch {result['torch']}, {result['size']}x{result['size']} + 1 reference image, "
        f"{result['text_tokens']} text tokens",
        "",
        "| configuration | load (s) | step median (ms) | vs baseline | weights (GiB) | peak (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "lora_apply_s" in r:
            lines.append(
                f"| {r['config']} | apply {r['lora_apply_s']}, change strength {r['lora_change_strength_s']} "
                f"| {r['step_ms_median']} (+{r['step_overhead_ms']}) | {r['step_ms_median'] / base:.2f}x "
                f"| +{r['lora_extra_gib']} | |"
            )
            continue
        lines.append(
            f"| {r['config']} | {r['load_s']} | {r['step_ms_median']} | {r['step_ms_median'] / base:.2f}x "
            f"| {r['weights_gib']} | {r['peak_gib']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
