"""GPU checks of the portable backend (skipped without CUDA; run on the GPU machine)."""

from __future__ import annotations

import pytest
import torch
from twins import with_text_lengths

from qwen_edit import fp8
from qwen_edit.testing.transformer import write_tiny_transformer
from qwen_edit.transformer import load_transformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_scaled_mm_matches_the_emulated_fp8_product():
    if not fp8.fp8_supported("cuda"):
        pytest.skip("no fp8 tensor cores on this GPU")
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(37, 256, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(384, 256, device="cuda", generator=gen) / 16
    codes, scale = fp8.quantize_weight_per_channel(w)
    bias = torch.randn(384, device="cuda", generator=gen, dtype=torch.bfloat16)
    y_gpu = fp8.fp8_linear(x, codes, scale, bias)
    x_codes, x_scale = fp8.quantize_per_token(x)
    y_ref = (x_codes.float() @ codes.float().t()) * x_scale * scale + bias.float()
    # Same fp8 operands: only accumulation order and the bf16 output rounding differ.
    assert (y_gpu.float() - y_ref).abs().max() < 1e-2 * y_ref.abs().max()


def test_fast_accumulation_reaches_the_gemm_only_inside_its_block(monkeypatch):
    if not fp8.fp8_supported("cuda"):
        pytest.skip("no fp8 tensor cores on this GPU")
    seen = []
    scaled_mm = torch._scaled_mm

    def recording(*args, **kwargs):
        seen.append(kwargs["use_fast_accum"])
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    codes, scale = fp8.quantize_weight_per_channel(torch.randn(32, 64, device="cuda"))
    fp8.fp8_linear(x, codes, scale)
    with fp8.fast_accumulation(False):
        fp8.fp8_linear(x, codes, scale)
    fp8.fp8_linear(x, codes, scale)
    assert seen == [True, False, True]


@pytest.mark.parametrize("precision", ["int4", "fp4"])
@pytest.mark.parametrize("compute", ["bf16", "fp8"])
@torch.no_grad()
def test_tiny_model_on_gpu_matches_cpu(tmp_path, precision, compute):
    path = write_tiny_transformer(tmp_path / "tiny.safetensors", precision=precision)
    gen = torch.Generator().manual_seed(0)
    inputs = with_text_lengths(
        dict(
            hidden_states=torch.randn(1, 32, 64, generator=gen),
            encoder_hidden_states=torch.randn(1, 7, 64, generator=gen),
            timestep=torch.tensor([0.5]),
            img_shapes=[[(1, 4, 4), (1, 4, 4)]],
            return_dict=False,
        )
    )
    cpu = load_transformer(path, backend="portable", compute="bf16", device="cpu", dtype=torch.float32)
    y_cpu = cpu(**inputs)[0]
    gpu = load_transformer(path, backend="portable", compute=compute, device="cuda")
    assert gpu.qwen_edit_info.compute == compute
    cuda_inputs = {k: v.cuda().bfloat16() if torch.is_tensor(v) else v for k, v in inputs.items()}
    y_gpu = gpu(**cuda_inputs)[0].float().cpu()
    error = ((y_gpu - y_cpu).norm() / y_cpu.norm()).item()
    assert error < (0.03 if compute == "bf16" else 0.1), error


@torch.no_grad()
def test_fp8_text_encoder_on_gpu_matches_cpu(tmp_path):
    from qwen_edit.testing.text_encoder import write_comfy_text_encoder
    from qwen_edit.text_encoder import encode_tokens, load_text_encoder

    path = tmp_path / "te.safetensors"
    config = write_comfy_text_encoder(path)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    cpu = load_text_encoder(path, device="cpu", compute="upcast", dtype=torch.float32, config=config)
    y_cpu = encode_tokens(cpu, ids)
    # The default (upcast: ComfyUI's bf16 activations) within bf16 rounding; fp8 activations (opt-in,
    # fp8 tensor cores on SM >= 8.9) within what e4m3 rounding allows (~5-8% measured on the CPU).
    for compute, bound in (("upcast", 0.03), ("fp8", 0.1)):
        gpu = load_text_encoder(path, device="cuda", compute=compute, config=config)
        y_gpu = encode_tokens(gpu, ids.cuda()).float().cpu()
        error = ((y_gpu - y_cpu).norm() / y_cpu.norm()).item()
        assert error < bound, (compute, error)


def _pictures() -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(128, 96), (96, 128)]  # two references, so their order matters too
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _edit(pipe, images, **kwargs):
    """(x0 of every step on the CPU in float32, image 0 as an int array) of one edit."""
    import numpy as np

    steps = []
    result = pipe.edit(images, callback=lambda step, total, x0: steps.append(x0.float().cpu()), **kwargs)
    return steps, np.asarray(result.images[0], dtype=int)


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b, strict=True))


EDIT = dict(prompt="p", negative_prompt="n", seed=4, width=64, height=64, cfg=2.0)


def test_demo_pipeline_on_gpu_is_deterministic_and_matches_the_cpu(tmp_path):
    """The default GPU configuration (upcast text encoder, bf16 DiT and VAE) against
    the CPU pipeline on the same files. Their precisions differ (the CPU encoder upcasts to bf16), so the
    bound is what rounding allows: on the CPU, fp8 vs bf16 encoder activations and an fp32 vs bf16 DiT
    each move the steps' x0 by about 0.8% (relative L2), so 5% for both plus the kernels' own rounding.
    A wrong seed moves it by ~100%, missing reference latents by 6%, a negative encoded without its
    images by 11%; the float32 test below catches the subtler wiring errors."""
    from qwen_edit import QwenEditPipeline

    images = _pictures()
    gpu = QwenEditPipeline.demo(cache_dir=tmp_path, device="cuda")
    a_steps, a = _edit(gpu, images, **EDIT)
    b_steps, b = _edit(gpu, images, **EDIT)
    assert a.shape == (64, 64, 3)
    assert all(torch.equal(x, y) for x, y in zip(a_steps, b_steps, strict=True)) and (a == b).all()
    cpu_steps, cpu = _edit(QwenEditPipeline.demo(cache_dir=tmp_path, device="cpu"), images, **EDIT)
    error = _max_rel(a_steps, cpu_steps)
    assert error < 5e-2, error
    assert abs(a - cpu).mean() < 1.5  # 8-bit levels; another seed gives ~25


def _float32_demo(cache_dir, device: str):
    """The demo pipeline with every stage in float32: DiT, text encoder (ComfyUI's upcast) and VAE."""
    from qwen_edit import QwenEditPipeline
    from qwen_edit.testing.demo import demo_files
    from qwen_edit.text_encoder import load_text_encoder

    files = demo_files(cache_dir)
    pipe = QwenEditPipeline.demo(cache_dir=cache_dir, device=device)
    pipe.transformer = load_transformer(
        files["transformer"], backend="portable", compute="bf16", device=device, dtype=torch.float32
    )
    pipe.text_encoder = load_text_encoder(
        files["text_encoder"], device=device, compute="upcast", dtype=torch.float32,
        config=files["text_encoder_config"],
    )  # fmt: skip
    pipe.vae = pipe.vae.float()
    return pipe


@pytest.fixture
def no_tf32():
    """Full float32 matmuls and convolutions (cuDNN allows TF32 by default: 10-bit mantissas)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("cfg, denoise", [(1.0, 1.0), (2.0, 0.7)])
def test_float32_demo_pipeline_on_gpu_equals_the_cpu_to_rounding(tmp_path, no_tf32, cfg, denoise):
    """Every stage in float32 on both sides, so only kernel rounding differs: changing the CPU's thread
    count (another reduction order) moves the steps' x0 by 5e-7 (relative L2). The subtlest wiring errors
    move it far more on this model: CFGNorm off by 1.7e-4, the two references swapped by 2.3e-4, image 1
    encoded unscaled by 6e-3. So 5e-5: ten times the rounding, a third of the smallest wiring error."""
    images = _pictures()
    kwargs = {**EDIT, "cfg": cfg, "denoise": denoise}
    gpu_steps, gpu = _edit(_float32_demo(tmp_path, "cuda"), images, **kwargs)
    cpu_steps, cpu = _edit(_float32_demo(tmp_path, "cpu"), images, **kwargs)
    error = _max_rel(gpu_steps, cpu_steps)
    assert error < 5e-5, error
    # 8-bit images: a value that sits on a level boundary may land one level off, no more.
    assert abs(gpu - cpu).max() <= 1 and abs(gpu - cpu).mean() < 0.01


def test_compiled_demo_pipeline_matches_eager_and_takes_new_prompt_lengths(tmp_path):
    """compile=True (transformer blocks, text encoder: dynamic shapes; VAE: static) gives the eager pipeline's
    images up to kernel rounding, and a prompt of another length runs without recompiling the blocks."""
    import numpy as np
    from PIL import Image

    from qwen_edit import QwenEditPipeline

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    eager = QwenEditPipeline.demo(cache_dir=tmp_path, device="cuda")
    compiled = QwenEditPipeline.demo(cache_dir=tmp_path, device="cuda", compile=True)
    for prompt in ("a red hat", "a much longer prompt, with other words in it"):
        a = eager.edit([image], prompt, seed=3, width=64, height=64)
        b = compiled.edit([image], prompt, seed=3, width=64, height=64)
        diff = np.abs(np.asarray(a.images[0], dtype=int) - np.asarray(b.images[0], dtype=int))
        assert diff.mean() < 1.0 and diff.max() <= 24, (prompt, diff.mean(), diff.max())
        assert len(b.timings["steps"]) == 4 and all(t > 0 for t in b.timings["steps"])
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled.edit([image], "a third prompt of yet another length entirely", seed=3, width=64, height=64)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no new graph for a new length
    # The VAE: compiled (static shapes) from a shape's second use, in the edits above.
    assert compiled.vae.encoder.forward.compiled and compiled.vae.decoder.forward.compiled


def test_a_second_process_edits_with_saved_graphs_and_traces_nothing(tmp_path, subprocess_timeout):
    """compile=True saves the compiled graphs (precompile.py); a second process loads them, fp8 GEMMs and
    the Triton GELU kernel included, and gives the first one's image without tracing anything."""
    from test_precompile import check_second_process_ran_the_saved_graphs, run_two_processes

    first, second = run_two_processes(tmp_path, "cuda", subprocess_timeout)
    check_second_process_ran_the_saved_graphs(first, second)
    assert second["seconds"] < first["seconds"] / 3, (first["seconds"], second["seconds"])


def test_fused_gelu_quantize_kernel_matches_the_unfused_ops():
    from qwen_edit import kernels

    if not fp8.fp8_supported("cuda") or not kernels.register():
        pytest.skip("needs fp8 tensor cores and Triton")
    gen = torch.Generator("cuda").manual_seed(0)
    x = (torch.randn(333, 12288, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    x[5] = 0  # an all-zero row takes the 1e-12 floor of the scale
    codes, scale = kernels.gelu_tanh_quantize(x)
    ref_codes, ref_scale = fp8.quantize_per_token(torch.nn.functional.gelu(x, approximate="tanh"))
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    same = (codes.float() == ref_codes.float()).float().mean().item()
    assert same > 0.999, same  # libdevice tanh vs tanhf may differ in the last bit once in a while
    # and then the code moves by at most one e4m3 step: 1/8 relative, or the smallest subnormal 2^-9
    torch.testing.assert_close(codes.float(), ref_codes.float(), rtol=0.125, atol=2**-9)


def test_fused_mlp_matches_the_unfused_mlp_and_steps_aside_for_loras(tmp_path):
    from qwen_edit import kernels

    if not fp8.fp8_supported("cuda") or not kernels.register():
        pytest.skip("needs fp8 tensor cores and Triton")
    path = write_tiny_transformer(tmp_path / "t.safetensors", precision="fp4")
    model = load_transformer(path, backend="portable", compute="fp8", device="cuda")
    mlp = model.transformer_blocks[0].img_mlp
    assert "forward" in mlp.__dict__  # fused at load
    x = torch.randn(2, 77, mlp.net[0].proj.in_features, device="cuda", dtype=torch.bfloat16)
    fused = mlp(x)
    unfused = type(mlp).forward(mlp, x)
    torch.testing.assert_close(fused, unfused, rtol=0.02, atol=0.02)
    assert ((fused.float() - unfused.float()).norm() / unfused.float().norm()).item() < 1e-3
    # with a LoRA on the second linear, the layer needs its bf16 input: the unfused path runs
    fc2 = mlp.net[2]
    fc2.lora_down = torch.randn(4, fc2.in_features, device="cuda", dtype=torch.bfloat16) / 64
    fc2.lora_up = torch.randn(fc2.out_features, 4, device="cuda", dtype=torch.bfloat16) / 64
    torch.testing.assert_close(mlp(x), type(mlp).forward(mlp, x), rtol=0, atol=0)


@torch.no_grad()
def test_streamed_blocks_on_gpu_use_the_fused_mlp_and_match_resident_ones(tmp_path):
    """Block streaming copies blocks into buffers (deepcopy); their fused fp8 MLPs must run the buffer's
    own weights: streamed and resident forwards agree exactly."""
    from qwen_edit.model import comfy_forward

    path = write_tiny_transformer(tmp_path / "t.safetensors", precision="fp4")
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 16, 1, 8, 8), (1, 5, 64), (1, 16, 1, 6, 10)]
    x, context, ref = (torch.randn(*shape, generator=gen).cuda() for shape in shapes)
    inputs = (x, torch.tensor([0.7]).cuda(), context, [ref])
    resident_model = load_transformer(path, backend="portable", compute="fp8", device="cuda")
    resident = comfy_forward(resident_model, *inputs)
    streamed = load_transformer(path, backend="portable", compute="fp8", device="cuda", num_blocks_on_gpu=0)
    buffers = streamed._qwen_edit_streamer.buffers
    if fp8.fp8_supported("cuda") and "forward" in streamed.transformer_blocks[0].img_mlp.__dict__:
        assert all(b.img_mlp.forward.args[0] is b.img_mlp for b in buffers)  # a partial on the buffer
    torch.testing.assert_close(comfy_forward(streamed, *inputs), resident, rtol=0, atol=0)
