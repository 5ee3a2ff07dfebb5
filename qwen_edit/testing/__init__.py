"""Model files in the real formats with tiny or random weights: for tests, benchmarks and the demo.

Not fixtures of the library's runtime: nothing under qwen_edit/ outside this package imports it, except
`QwenEditPipeline.demo()` (and the CLI's and worker's demo modes on top of it), which writes its model
with `demo.demo_files`. That is why it ships in the package rather than under tests/.

- `transformer`: SVDQ checkpoints quantized from a dense model or filled with random values; the tiny
  reference transformer;
- `text_encoder`: a small Qwen2.5-VL in ComfyUI's single-file formats and as a diffusers folder;
- `vae`: a narrow Qwen-Image VAE in ComfyUI's format;
- `demo`: the demo model's four files and tokenizer, written once into a cache folder.
"""
