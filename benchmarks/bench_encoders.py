"""Text encoder and VAE stages, piece by piece and compiled or not, on the full-size random files.

The text encode of an edit is CPU work (the ~384x384 vision copy of the image, patches, token ids), the
vision tower and the 28-layer language model; the VAE encode is the reference image's pixels (CPU) and
the encoder. Each piece's median wall time (CUDA-synchronized) shows where a stage waits on the host.
Variants: transformers' vision attention (one SDPA per window, a host sync per layer) against ours
(one masked call), then everything compiled with dynamic shapes (prompt lengths vary); "new prompt"
is the first call at a token count not seen before.

    python benchmarks/bench_encoders.py --workdir /tmp/qb --json benchmarks/results/encoders.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from bench_pipeline import full_size_files
from PIL import Image

from qwen_edit import conditioning, tokenizer
from qwen_edit.text_encoder import compile_text_encoder, load_text_encoder, use_masked_window_attention
from qwen_edit.vae import decode_latents, encode_images, load_vae

PROMPT = "turn the sky into a warm sunset and add reflections on the water " * 8


def wall_ms(fn, warmup: int = 2, repeats: int = 5) -> dict:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - start) * 1000
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return {"first_ms": round(first, 1), "median_ms": round(statistics.median(times), 2)}


def text_rows(te, tok, image: Image.Image) -> dict:
    def prep():
        vision = tokenizer.preprocess_vision_image(tokenizer.resize_for_vision(image))
        ids = tokenizer.edit_prompt_token_ids(tok, PROMPT[:200], 1, [tokenizer.vision_token_count(vision[1])])
        return vision, ids

    rows = {
        "cpu preprocessing": wall_ms(prep),
        "whole text encode": wall_ms(lambda: tokenizer.encode_edit_prompt(te, tok, PROMPT[:200], [image])),
    }
    (pixels, grid), _ = prep()
    from qwen_edit.text_encoder import image_embeddings

    rows["vision tower"] = wall_ms(lambda: image_embeddings(te, pixels, grid))
    for chars in (150, 151):  # two token counts never seen before
        start = time.perf_counter()
        tokenizer.encode_edit_prompt(te, tok, PROMPT[:chars], [image])
        torch.cuda.synchronize()
        first = (time.perf_counter() - start) * 1000
        rows[f"new prompt ({chars} chars), first call"] = {"first_ms": round(first, 1)}
    return rows


def vae_rows(vae, image: Image.Image) -> dict:
    pixels = conditioning.reference_pixels(image)
    latent = torch.randn(1, 16, 1, 128, 128, device="cuda")
    return {
        "reference pixels (cpu)": wall_ms(lambda: conditioning.reference_pixels(image)),
        "reference pixels (gpu)": wall_ms(lambda: conditioning.reference_pixels(image, device="cuda")),
        "encode (pixels ready)": wall_ms(lambda: encode_images(vae, pixels)),
        "decode": wall_ms(lambda: decode_latents(vae, latent)),
        "to uint8 (cpu)": wall_ms(lambda: conditioning.to_uint8(torch.rand(1, 3, 1024, 1024, device="cuda"))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    files = full_size_files(args.workdir, "fp4")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    te = load_text_encoder(files["text_encoder"], device="cuda")
    tok = tokenizer.load_tokenizer(files["tokenizer"])
    vae = load_vae(files["vae"], device="cuda")
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "text": {}, "vae": {}}

    def per_window():
        for block in te.visual.blocks:
            block.attn.__dict__.pop("forward", None)  # transformers' own attention again

    variants = {
        "transformers' per-window vision attention": per_window,
        "one-call window attention (current)": lambda: use_masked_window_attention(te),
        "+ compiled (dynamic shapes)": lambda: compile_text_encoder(te),
    }
    for name, apply in variants.items():
        apply()
        try:
            result["text"][name] = text_rows(te, tok, image)
        except Exception as exc:  # a variant that does not compile must not end the run
            result["text"][name] = {"error": repr(exc)[:400]}
        print("text", name, json.dumps(result["text"][name]), flush=True)
    result["vae"]["eager"] = vae_rows(vae, image)
    print("vae eager", json.dumps(result["vae"]["eager"]), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
