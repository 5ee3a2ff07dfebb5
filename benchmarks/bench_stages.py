"""The edit's other stages on Hopper (issue 14): text encoder compute modes, VAE layouts and compiles.

Text encoder (full-size random fp8 file, compiled with dynamic shapes as `compile=True` does): the whole
text encode of an edit (a 200-character prompt and one 1024x1024 image) with compute="upcast" (fp8
weights cast to bf16 per layer: ComfyUI's numbers, the default) and compute="fp8" (fp8 activations too),
and how far the fp8 states are from the upcast ones.

VAE at 1024x1024 (encode of the reference pixels, decode of a 128x128 latent), each variant on a fresh
copy of the model: eager; channels-last (3D) weights and inputs; torch.compile with static shapes (one
graph per image size, dynamo's recompile limit bounds how many); both. First call (compilation) and
median, and the largest difference from eager.

    python benchmarks/bench_stages.py --workdir /tmp/qb --json benchmarks/results/stages_h200.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from bench_encoders import PROMPT, wall_ms
from bench_pipeline import full_size_files
from PIL import Image

from qwen_edit import conditioning, tokenizer
from qwen_edit.text_encoder import compile_text_encoder, load_text_encoder
from qwen_edit.vae import decode_latents, encode_images, load_vae, use_channels_last


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(((a.float() - b.float()).norm() / b.float().norm()).item(), 5)


def text_part(files: dict, image: Image.Image) -> dict:
    tok = tokenizer.load_tokenizer(files["tokenizer"])
    out, states = {}, {}
    for compute in ("upcast", "fp8"):
        te = load_text_encoder(files["text_encoder"], device="cuda", compute=compute)
        compile_text_encoder(te)

        def encode(te=te):
            return tokenizer.encode_edit_prompt(te, tok, PROMPT[:200], [image])

        timing = wall_ms(encode, warmup=3, repeats=7)
        result = encode()
        states[compute] = result[0] if isinstance(result, tuple) else result
        out[compute] = {**timing, "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 2)}
        print("text", compute, json.dumps(out[compute]), flush=True)
        del te
        torch.cuda.empty_cache()
    out["fp8_vs_upcast_states"] = rel(states["fp8"], states["upcast"])
    return out


def compiled(vae) -> None:
    vae.encoder.compile(dynamic=False)
    vae.decoder.compile(dynamic=False)


def vae_part(files: dict, image: Image.Image) -> dict:
    base = load_vae(files["vae"], device="cuda")
    pixels = conditioning.reference_pixels(image, device="cuda")
    latent = torch.randn(1, 16, 1, 128, 128, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    eager = (encode_images(base, pixels), decode_latents(base, latent))
    variants = {
        "eager": [],
        "channels-last": [use_channels_last],
        "compiled, static shapes": [compiled],
        "channels-last + compiled, static shapes": [use_channels_last, compiled],
    }
    out = {}
    for name, changes in variants.items():
        torch._dynamo.reset()
        vae = copy.deepcopy(base)
        for change in changes:
            change(vae)
        row = {}
        for stage, fn in (
            ("encode", lambda v=vae: encode_images(v, pixels)),
            ("decode", lambda v=vae: decode_latents(v, latent)),
        ):
            try:
                row[stage] = wall_ms(fn, warmup=2, repeats=7)
                row[stage]["rel_diff_vs_eager"] = rel(fn(), eager[0 if stage == "encode" else 1])
            except Exception as exc:  # a variant that fails must not end the run
                row[stage] = {"error": repr(exc)[:300]}
        out[name] = row
        print("vae", name, json.dumps(row), flush=True)
        vae = None
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--parts", nargs="+", default=["text", "vae"])
    args = parser.parse_args()
    files = full_size_files(args.workdir, "fp4")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    start = time.perf_counter()
    if "vae" in args.parts:
        result["vae"] = vae_part(files, image)
    if "text" in args.parts:
        result["text"] = text_part(files, image)
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
