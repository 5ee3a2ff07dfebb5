"""ComfyUI workflows on the demo model: the same pixels as the equivalent `edit()`, and every refusal.

The workflows are written by hand from the upstream node definitions (qwen_edit.workflow's docstring
names them), in the API format (`{id: {class_type, inputs}}`) and in the editor's format (`nodes` +
`links`, widget values by position, as ComfyUI saves them: KSampler's seed followed by its
"control after generate" value, LoadImage's name followed by its upload button's).
"""

from __future__ import annotations

import copy
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from qwen_edit import QwenEditPipeline
from qwen_edit.params import ParameterError
from qwen_edit.paths import ModelFolders, UnsafeModelNameError
from qwen_edit.workflow import (
    ModelMismatchError,
    WorkflowError,
    WorkflowPlan,
    parse_assignment,
    plan_workflow,
    supported_nodes,
)

TRANSFORMER = "svdq-int4_r16-demo.safetensors"
TEXT_ENCODER = "qwen_2.5_vl_demo_fp8_scaled.safetensors"
VAE = "qwen_image_vae_demo.safetensors"
PROMPT = "make it blue"


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


PICTURES = {"pic1.png": picture(72, 56, 1), "pic2.png": picture(48, 64, 2), "pic3.png": picture(64, 64, 3)}


def write_lora(path, seed: int) -> None:
    """A small ComfyUI-format LoRA for the demo transformer (width 128, MLP 512)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inp) in {
        "transformer_blocks.0.attn.to_q": (128, 128),
        "transformer_blocks.1.img_mlp.net.2": (128, 512),
    }.items():
        tensors[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(4, inp, generator=gen) / inp**0.5
        tensors[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(out, 4, generator=gen)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_dir):
    """A models folder: the demo's files under demo/ (written by QwenEditPipeline.demo), LoRAs in loras/."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(demo_dir, root / "demo")  # the session's demo files, copied: a test adds a VAE there
    (root / "loras").mkdir()
    write_lora(root / "loras" / "a.safetensors", 1)
    write_lora(root / "loras" / "b.safetensors", 2)
    return root


@pytest.fixture(scope="module")
def folders(models):
    return ModelFolders.from_extra_model_paths(
        {"test": {"base_path": str(models), "diffusion_models": "demo", "text_encoders": "demo",
                  "vae": "demo", "loras": "loras"}}
    )  # fmt: skip


@pytest.fixture(scope="module")
def pipe(models):
    demo = QwenEditPipeline.demo(cache_dir=models / "demo")
    demo.reference_area = 64 * 64  # smaller reference latents: the same code path, less CPU time
    return demo


def lora(models, name: str) -> str:
    return str((models / "loras" / name).resolve())


def same_result(a, b) -> None:
    assert len(a.images) == len(b.images)
    for i in range(len(a.images)):
        assert a.images[i].size == b.images[i].size
        assert a.images[i].tobytes() == b.images[i].tobytes()
        assert a.png_bytes(i) == b.png_bytes(i)  # pixels and the parameters embedded beside them


# -- the workflows, API format -----------------------------------------------------------------------


def seed_api(n_images: int = 1, cfg: float = 1.0, negative: str = "") -> dict:
    """The seed's graph: Nunchaku DiT loader -> LoRA -> ModelSamplingAuraFlow -> CFGNorm -> KSampler with
    TextEncodeQwenImageEditPlus (positive, negative) -> VAEDecode -> SaveImage; an EmptySD3 latent."""
    images = {f"image{k}": [str(9 + k), 0] for k in range(1, n_images + 1)}
    graph = {
        "1": {"class_type": "NunchakuQwenImageDiTLoader",
              "inputs": {"model_name": TRANSFORMER, "cpu_offload": "disable", "num_blocks_on_gpu": 1,
                         "use_pin_memory": "disable"}},
        "2": {"class_type": "NunchakuQwenImageLoraLoader",
              "inputs": {"model": ["1", 0], "lora_name": "a.safetensors", "lora_strength": 0.8,
                         "cpu_offload": "disable"}},
        "3": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["2", 0], "shift": 3.0}},
        "4": {"class_type": "CFGNorm", "inputs": {"model": ["3", 0], "strength": 1.0}},
        "5": {"class_type": "CLIPLoader",
              "inputs": {"clip_name": TEXT_ENCODER, "type": "qwen_image", "device": "default"}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "20": {"class_type": "TextEncodeQwenImageEditPlus",
               "inputs": {"clip": ["5", 0], "prompt": PROMPT, "vae": ["6", 0], **images}},
        "21": {"class_type": "TextEncodeQwenImageEditPlus",
               "inputs": {"clip": ["5", 0], "prompt": negative, "vae": ["6", 0], **images}},
        "30": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "40": {"class_type": "KSampler",
               "inputs": {"model": ["4", 0], "seed": 7, "steps": 2, "cfg": cfg, "sampler_name": "euler",
                          "scheduler": "simple", "positive": ["20", 0], "negative": ["21", 0],
                          "latent_image": ["30", 0], "denoise": 1.0}},
        "50": {"class_type": "VAEDecode", "inputs": {"samples": ["40", 0], "vae": ["6", 0]}},
        "60": {"class_type": "SaveImage", "inputs": {"images": ["50", 0], "filename_prefix": "ComfyUI"}},
    }  # fmt: skip
    for k in range(1, n_images + 1):
        graph[str(9 + k)] = {"class_type": "LoadImage", "inputs": {"image": f"pic{k}.png"}}
    return graph


def official_api() -> dict:
    """The shape of ComfyUI-nunchaku's example: image1 through ImageScaleToTotalPixels into both encoders
    and into VAEEncode (the latent), image2 raw, an EmptySD3LatentImage left unconnected; cfg 2.5."""
    graph = seed_api(2, cfg=2.5, negative="blurry")
    del graph["2"]
    graph["3"]["inputs"]["model"] = ["1", 0]
    graph["70"] = {"class_type": "ImageScaleToTotalPixels",
                   "inputs": {"image": ["10", 0], "upscale_method": "lanczos",
                              "megapixels": 0.03}}  # fmt: skip
    graph["71"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["70", 0], "vae": ["6", 0]}}
    for encoder in ("20", "21"):
        graph[encoder]["inputs"]["image1"] = ["70", 0]
    graph["40"]["inputs"]["latent_image"] = ["71", 0]
    return graph


def advanced_api() -> dict:
    """KSamplerAdvanced over the whole schedule; encoders see image1 as loaded, the latent is VAEEncode of
    image1 through ImageScaleToTotalPixels at 0.05 MP (int(0.05 * 2**20) = 52428 pixels, as ComfyUI)."""
    graph = seed_api(1)
    graph["40"] = {"class_type": "KSamplerAdvanced",
                   "inputs": {"model": ["4", 0], "add_noise": "enable", "noise_seed": 7, "steps": 2,
                              "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                              "positive": ["20", 0], "negative": ["21", 0], "latent_image": ["71", 0],
                              "start_at_step": 0, "end_at_step": 10000,
                              "return_with_leftover_noise": "disable"}}  # fmt: skip
    graph["70"] = {"class_type": "ImageScaleToTotalPixels",
                   "inputs": {"image": ["10", 0], "upscale_method": "lanczos",
                              "megapixels": 0.05}}  # fmt: skip
    graph["71"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["70", 0], "vae": ["6", 0]}}
    del graph["30"]
    return graph


def unet_api() -> dict:
    """UNETLoader -> LoraLoaderModelOnly -> NunchakuQwenImageLoraStack (2 of 3 slots read, one "None");
    denoise 0.6 on VAEEncode of image1 as loaded (image-to-image)."""
    graph = seed_api(1)
    graph["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": TRANSFORMER, "weight_dtype": "default"}}
    graph["2"] = {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": ["1", 0], "lora_name": "a.safetensors",
                             "strength_model": 0.5}}  # fmt: skip
    graph["7"] = {"class_type": "NunchakuQwenImageLoraStack",
                  "inputs": {"model": ["2", 0], "lora_count": 2, "cpu_offload": "disable",
                             "lora_name_1": "None", "lora_strength_1": 1.0,
                             "lora_name_2": "b.safetensors", "lora_strength_2": -0.3,
                             "lora_name_3": "a.safetensors", "lora_strength_3": 1.0}}  # fmt: skip
    graph["3"]["inputs"]["model"] = ["7", 0]
    graph["71"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["6", 0]}}
    graph["40"]["inputs"].update(latent_image=["71", 0], denoise=0.6)
    del graph["30"]
    return graph


# -- the same workflows, editor format -----------------------------------------------------------------


class Editor:
    """An editor-format workflow, node by node: widget values by position, connections as links."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, node_id, type_, widgets, inputs=(), outputs=(), mode=0):
        entries = []
        for name, kind, source in inputs:
            link = None
            if source is not None:
                link = len(self.links) + 1
                self.links.append([link, source[0], source[1], node_id, len(entries), kind])
            entries.append({"name": name, "type": kind, "link": link})
        self.nodes.append({
            "id": node_id, "type": type_, "mode": mode, "inputs": entries, "widgets_values": widgets,
            "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs], "pos": [0, 0], "flags": {},
        })  # fmt: skip

    def json(self) -> dict:
        by_id = {n["id"]: n for n in self.nodes}
        for link_id, origin, slot, *_ in self.links:
            if origin in by_id and slot < len(by_id[origin]["outputs"]):
                by_id[origin]["outputs"][slot]["links"].append(link_id)
        return {"last_node_id": 99, "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"frontendVersion": "1.26.13"},
                "version": 0.4}  # fmt: skip


MODEL, CLIP, VAE_T, COND, LATENT, IMAGE = "MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE"


def seed_editor(n_images: int = 1, cfg: float = 1.0, negative: str = "") -> Editor:
    e = Editor()
    e.add(1, "NunchakuQwenImageDiTLoader", [TRANSFORMER, "disable", 1, "disable"], outputs=[("MODEL", MODEL)])
    e.add(2, "NunchakuQwenImageLoraLoader", ["a.safetensors", 0.8, "disable", False],
          [("model", MODEL, (1, 0))], [("MODEL", MODEL)])  # fmt: skip
    e.add(3, "ModelSamplingAuraFlow", [3], [("model", MODEL, (2, 0))], [("MODEL", MODEL)])
    e.add(4, "CFGNorm", [1], [("model", MODEL, (3, 0))], [("patched_model", MODEL)])
    e.add(5, "CLIPLoader", [TEXT_ENCODER, "qwen_image", "default"], outputs=[("CLIP", CLIP)])
    e.add(6, "VAELoader", [VAE], outputs=[("VAE", VAE_T)])
    for k in range(1, n_images + 1):
        e.add(9 + k, "LoadImage", [f"pic{k}.png", "image"], outputs=[("IMAGE", IMAGE), ("MASK", "MASK")])
    for node_id, text in ((20, PROMPT), (21, negative)):
        slots = [(f"image{k}", IMAGE, (9 + k, 0) if k <= n_images else None) for k in (1, 2, 3)]
        e.add(node_id, "TextEncodeQwenImageEditPlus", [text],
              [("clip", CLIP, (5, 0)), ("vae", VAE_T, (6, 0)), *slots], [("CONDITIONING", COND)])  # fmt: skip
    e.add(30, "EmptySD3LatentImage", [64, 48, 1], outputs=[("LATENT", LATENT)])
    e.add(40, "KSampler", [7, "randomize", 2, cfg, "euler", "simple", 1],
          [("model", MODEL, (4, 0)), ("positive", COND, (20, 0)), ("negative", COND, (21, 0)),
           ("latent_image", LATENT, (30, 0))], [("LATENT", LATENT)])  # fmt: skip
    e.add(50, "VAEDecode", [], [("samples", LATENT, (40, 0)), ("vae", VAE_T, (6, 0))], [("IMAGE", IMAGE)])
    e.add(60, "SaveImage", ["ComfyUI"], [("images", IMAGE, (50, 0))])
    e.add(90, "MarkdownNote", ["Upload up to three pictures."])
    return e


def official_editor() -> dict:
    e = Editor()
    e.add(1, "NunchakuQwenImageDiTLoader", [TRANSFORMER, "disable", 1, "disable"], outputs=[("MODEL", MODEL)])
    e.add(3, "ModelSamplingAuraFlow", [3], [("model", MODEL, (1, 0))], [("MODEL", MODEL)])
    e.add(4, "CFGNorm", [1], [("model", MODEL, (3, 0))], [("patched_model", MODEL)])
    e.add(5, "CLIPLoader", [TEXT_ENCODER, "qwen_image", "default"], outputs=[("CLIP", CLIP)])
    e.add(6, "VAELoader", [VAE], outputs=[("VAE", VAE_T)])
    e.add(10, "LoadImage", ["pic1.png", "image"], outputs=[("IMAGE", IMAGE), ("MASK", "MASK")])
    e.add(11, "LoadImage", ["pic2.png", "image"], outputs=[("IMAGE", IMAGE), ("MASK", "MASK")])
    e.add(70, "ImageScaleToTotalPixels", ["lanczos", 0.03], [("image", IMAGE, (10, 0))], [("IMAGE", IMAGE)])
    for node_id, text in ((20, PROMPT), (21, "blurry")):
        e.add(node_id, "TextEncodeQwenImageEditPlus", [text],
              [("clip", CLIP, (5, 0)), ("vae", VAE_T, (6, 0)), ("image1", IMAGE, (70, 0)),
               ("image2", IMAGE, (11, 0)), ("image3", IMAGE, None)], [("CONDITIONING", COND)])  # fmt: skip
    e.add(71, "VAEEncode", [], [("pixels", IMAGE, (70, 0)), ("vae", VAE_T, (6, 0))], [("LATENT", LATENT)])
    e.add(30, "EmptySD3LatentImage", [64, 48, 1], outputs=[("LATENT", LATENT)])  # unconnected, as upstream
    e.add(40, "KSampler", [7, "fixed", 2, 2.5, "euler", "simple", 1],
          [("model", MODEL, (4, 0)), ("positive", COND, (20, 0)), ("negative", COND, (21, 0)),
           ("latent_image", LATENT, (71, 0))], [("LATENT", LATENT)])  # fmt: skip
    e.add(50, "VAEDecode", [], [("samples", LATENT, (40, 0)), ("vae", VAE_T, (6, 0))], [("IMAGE", IMAGE)])
    e.add(60, "SaveImage", ["ComfyUI"], [("images", IMAGE, (50, 0))])
    e.add(91, "Note", ["You can use the EmptySD3LatentImage instead of VAE Encode."])
    return e.json()


# -- the same pixels as edit() ----------------------------------------------------------------------


def names(n: int) -> list[str]:
    return [f"pic{k}.png" for k in range(1, n + 1)]


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_seed_graph_in_both_formats_matches_edit(pipe, models, folders, n_images):
    cfg, negative = (2.5, "blurry") if n_images == 3 else (1.0, "")  # 3 images: the negative is evaluated
    pipe.set_loras([(lora(models, "a.safetensors"), 0.8)])
    pictures = [PICTURES[n] for n in names(n_images)]
    direct = pipe.edit(pictures, PROMPT, negative_prompt=negative, seed=7, steps=2, cfg=cfg, shift=3.0,
                       width=64, height=48)  # fmt: skip
    pipe.set_loras([])  # run_workflow must put the LoRA back itself
    api = pipe.run_workflow(seed_api(n_images, cfg, negative), PICTURES, models=folders)
    same_result(api, direct)
    pipe.set_loras([])
    editor = pipe.run_workflow(seed_editor(n_images, cfg, negative).json(), PICTURES, models=folders)
    same_result(editor, direct)
    assert pipe.loras == [(lora(models, "a.safetensors"), 0.8)]


def official_sizes():
    """ImageScaleToTotalPixels(lanczos, 0.03 MP) of picture 1 (CUI comfy_extras/nodes_post_processing.py)."""
    w, h = PICTURES["pic1.png"].size
    scale = math.sqrt(int(0.03 * 1024 * 1024) / (w * h))
    return round(w * scale), round(h * scale)


def test_official_shape_in_both_formats_matches_edit(pipe, folders):
    w, h = official_sizes()
    scaled = PICTURES["pic1.png"].resize((w, h), Image.Resampling.LANCZOS)
    pipe.set_loras([])
    # The latent is VAEEncode of the scaled picture 1: its size (cropped to multiples of 8) is the output's.
    direct = pipe.edit([scaled, PICTURES["pic2.png"]], PROMPT, negative_prompt="blurry", seed=7, steps=2,
                       cfg=2.5, shift=3.0, output_megapixels=w * h / 2**20)  # fmt: skip
    assert direct.images[0].size == (w // 8 * 8, h // 8 * 8)
    api_plan = plan_workflow(official_api())
    assert api_plan.unused == (("30", "EmptySD3LatentImage"),)
    same_result(pipe.run_workflow(api_plan, PICTURES, models=folders), direct)
    editor_plan = plan_workflow(official_editor())
    assert editor_plan.graph == api_plan.graph  # the editor's format reads as the API export would
    assert {c for _, c in editor_plan.unused} == {"EmptySD3LatentImage", "Note"}
    same_result(pipe.run_workflow(editor_plan, PICTURES, models=folders), direct)


def test_ksampler_advanced_variant_matches_edit(pipe, models, folders):
    pipe.set_loras([(lora(models, "a.safetensors"), 0.8)])
    direct = pipe.edit([PICTURES["pic1.png"]], PROMPT, seed=7, steps=2, cfg=1.0, shift=3.0,
                       output_megapixels=52428 / 2**20)  # fmt: skip
    same_result(pipe.run_workflow(advanced_api(), PICTURES, models=folders), direct)


def test_unet_loader_variant_with_stacked_loras_and_img2img_matches_edit(pipe, models, folders):
    plan = plan_workflow(unet_api())
    assert [(lo.name, lo.strength, lo.node_id) for lo in plan.loras] == [
        ("a.safetensors", 0.5, "2"),
        ("b.safetensors", -0.3, "7"),
    ]  # slot 1 is "None", slot 3 is past lora_count
    first = PICTURES["pic1.png"]
    pipe.set_loras([(lora(models, "a.safetensors"), 0.5), (lora(models, "b.safetensors"), -0.3)])
    direct = pipe.edit([first], PROMPT, seed=7, steps=2, cfg=1.0, shift=3.0, denoise=0.6,
                       output_megapixels=first.width * first.height / 2**20)  # fmt: skip
    assert direct.images[0].size == (72, 56)
    pipe.set_loras([])
    same_result(pipe.run_workflow(plan, PICTURES, models=folders), direct)


def test_overrides_inject_request_values(pipe, models, folders):
    other = picture(64, 48, 9)
    pipe.set_loras([(lora(models, "a.safetensors"), 0.8)])
    direct = pipe.edit([other], "make it red", seed=11, steps=2, cfg=1.0, shift=3.0, width=64, height=48)
    plan = plan_workflow(seed_api(2)).with_overrides({"40.seed": "11"}, prompt="make it red", images=[other])
    assert plan.sources["seed"] == "40.seed" and plan.sources["prompt"] == "override"
    assert len(plan.images) == 1  # fewer pictures than slots: the last slots go
    same_result(pipe.run_workflow(plan, models=folders), direct)
    # The same through run_workflow's arguments: a list of pictures replaces the workflow's, in slot order.
    same_result(
        pipe.run_workflow(seed_api(2), [other], {"prompt": "make it red", "40.seed": 11}, models=folders),
        direct,
    )


def test_from_workflow_loads_what_the_loaders_name(pipe, models, folders):
    from qwen_edit.testing.demo import demo_files

    workflow = seed_api(1)
    workflow["1"]["inputs"].update(cpu_offload="enable", num_blocks_on_gpu=20, use_pin_memory="enable")
    te_config = demo_files(models / "demo")["text_encoder_config"]
    loaded = QwenEditPipeline.from_workflow(
        workflow, folders, device="cpu", backend="portable", compute="bf16", text_encoder_config=te_config
    )
    assert loaded.files.transformer.name == TRANSFORMER and loaded.files.vae.name == VAE
    assert loaded.loras == [(lora(models, "a.safetensors"), 0.8)]
    assert loaded.offload_settings == ("enable", 2, True)  # 20 resident blocks of the demo's 2: all
    assert loaded.model_folders is folders
    loaded.output_megapixels, loaded.reference_area = pipe.output_megapixels, pipe.reference_area
    same_result(
        loaded.run_workflow(workflow, PICTURES), pipe.run_workflow(workflow, PICTURES, models=folders)
    )


def test_input_folder_and_missing_pictures(pipe, folders, tmp_path):
    plan = plan_workflow(seed_api(1))
    with pytest.raises(WorkflowError, match=r"node 10 \(LoadImage\).*pic1.png") as info:
        plan.pictures({})
    assert info.value.field == "workflow.10.image" and info.value.rule == "image"
    PICTURES["pic1.png"].save(tmp_path / "pic1.png")
    [read] = plan.pictures(None, tmp_path)
    assert read.tobytes() == PICTURES["pic1.png"].tobytes()
    with pytest.raises(UnsafeModelNameError, match="workflow.10.image"):
        plan.with_overrides({"10.image": "../pic1.png"}).pictures(None, tmp_path)


def test_other_model_files_than_loaded_are_named(pipe, models, folders):
    shutil.copy(models / "demo" / VAE, models / "demo" / "other_vae.safetensors")
    workflow = seed_api(1)
    workflow["6"]["inputs"]["vae_name"] = "other_vae.safetensors"
    with pytest.raises(ModelMismatchError, match=r"node 6 \(VAELoader\)") as info:
        pipe.run_workflow(workflow, PICTURES, models=folders)
    assert set(info.value.differences) == {"vae"} and info.value.field == "workflow.6.vae_name"


# -- the plan ---------------------------------------------------------------------------------------


def test_plan_of_the_seed_graph_names_its_sources():
    plan = plan_workflow(seed_api(3, cfg=2.5, negative="blurry"))
    assert dict(plan.models) == {"transformer": TRANSFORMER, "text_encoder": TEXT_ENCODER, "vae": VAE}
    assert plan.loader.settings(60) == ("disable", 1, False)
    slots = [(s.slot, s.name, s.node_id) for s in plan.images]
    assert slots == [(1, "pic1.png", "10"), (2, "pic2.png", "11"), (3, "pic3.png", "12")]
    p = plan.params
    assert (p.prompt, p.negative_prompt, p.seed, p.steps, p.cfg, p.shift) == (
        PROMPT,
        "blurry",
        7,
        2,
        2.5,
        3.0,
    )
    assert (p.width, p.height, p.batch_size, p.sampler_name, p.scheduler) == (64, 48, 1, "euler", "simple")
    assert plan.sources["shift"] == "3.shift" and plan.sources["width"] == "30.width"
    assert plan.sources["prompt"] == "20.prompt" and plan.sources["negative_prompt"] == "21.prompt"
    assert plan.sources["transformer"] == "1.model_name" and plan.sources["images[2]"] == "12.image"
    assert plan.cfg_norm_strength == 1.0 and plan.output.filename_prefix == "ComfyUI"
    assert plan.unused == ()
    assert plan.to_dict()["loras"] == [{"name": "a.safetensors", "strength": 0.8, "node": "2"}]


def test_editor_extras_reroute_primitive_bypass_and_mute():
    e = seed_editor(1)
    e.add(80, "Reroute", [], [("", MODEL, (1, 0))], [("", MODEL)])
    e.add(81, "PrimitiveNode", [1234, "fixed"], outputs=[("INT", "INT")])
    e.add(82, "NunchakuQwenImageLoraLoader", ["b.safetensors", 1.0, "disable", False],
          [("model", MODEL, (80, 0))], [("MODEL", MODEL)], mode=4)  # fmt: skip
    data = e.json()
    nodes = {n["id"]: n for n in data["nodes"]}
    # The LoRA loader 2 now reads the bypassed node 82 (whose model comes through the Reroute 80)...
    data["links"].append([100, 82, 0, 2, 0, MODEL])
    nodes[2]["inputs"][0]["link"] = 100
    # ...and the KSampler's seed comes from the PrimitiveNode 81.
    data["links"].append([101, 81, 0, 40, 4, "INT"])
    nodes[40]["inputs"].append({"name": "seed", "type": "INT", "link": 101, "widget": {"name": "seed"}})
    nodes[90]["mode"] = 2  # a muted note stays an unused editor node
    plan = plan_workflow(data)
    assert plan.params.seed == 1234
    assert [lo.name for lo in plan.loras] == ["a.safetensors"]
    assert plan.graph["2"]["inputs"]["model"] == ["1", 0]
    assert any("node 82" in n and "bypassed" in n for n in plan.notes)
    assert ("90", "MarkdownNote") in plan.unused


def test_scaling_nodes_compute_comfyui_sizes():
    from qwen_edit.workflow import ImageOp

    # ImageScaleToTotalPixels at a125cd8: int(megapixels * 1024 * 1024) pixels, sides rounded.
    scale = math.sqrt(31457 / (72 * 56))
    assert ImageOp("1", "ImageScaleToTotalPixels", megapixels=0.03).size(72, 56) == (
        (round(72 * scale), round(56 * scale)),
        None,
    )
    # The newer node: no int(), sides rounded to resolution_steps.
    scale = math.sqrt(0.03 * 1024 * 1024 / (72 * 56))
    steps = ImageOp("1", "ImageScaleToTotalPixels", megapixels=0.03, resolution_steps=8)
    assert steps.size(72, 56) == ((round(72 * scale / 8) * 8, round(56 * scale / 8) * 8), None)
    assert ImageOp("1", "ImageScaleBy", scale_by=0.5).size(75, 51) == ((38, 26), None)  # round half even
    assert ImageOp("1", "ImageScale", width=0, height=32).size(72, 56) == ((41, 32), None)
    # crop "center" cuts the sides to the target's aspect ratio before scaling: 100x50 -> 50x50 -> 32x32.
    assert ImageOp("1", "ImageScale", width=32, height=32, crop="center").size(100, 50) == (
        (32, 32),
        (25, 0, 75, 50),
    )
    assert ImageOp("1", "ImageScale", width=0, height=0).size(7, 5) == ((7, 5), None)


def test_supported_nodes_cite_their_upstream_definition():
    sources = supported_nodes()
    assert sources["NunchakuQwenImageDiTLoader"].startswith("nunchaku-tech/ComfyUI-nunchaku@dbfd194")
    assert sources["NunchakuQwenImageLoraStack"].startswith("ussoewwin/ComfyUI-QwenImageLoraLoader@6efac00")
    assert sources["TextEncodeQwenImageEditPlus"].startswith("comfyanonymous/ComfyUI@a125cd8")
    assert parse_assignment("40.seed=42") == ("40.seed", "42")
    with pytest.raises(ParameterError):
        parse_assignment("seed=42")


def test_named_overrides_are_checked_as_edit_parameters():
    plan = plan_workflow(seed_api(1))
    with pytest.raises(ParameterError) as info:
        plan.with_overrides(steps=0)
    assert info.value.field == "steps"
    with pytest.raises(ParameterError) as info:
        plan.with_overrides(colour="red")
    assert info.value.field == "colour"
    changed = plan.with_overrides(loras=[{"name": "b.safetensors", "strength": 0.2}], cpu_offload=True)
    assert [(lo.name, lo.strength, lo.node_id) for lo in changed.loras] == [("b.safetensors", 0.2, None)]
    assert changed.loader.cpu_offload == "enable"
    assert isinstance(changed, WorkflowPlan) and plan.params.steps == 2  # the plan itself is unchanged


# -- refusals: one malformed and one unsupported graph per rule -----------------------------------------


def edited(base, change):
    graph = copy.deepcopy(base)
    change(graph)
    return graph


def inputs(node_id: str, **values):
    return lambda g: g[node_id]["inputs"].update(values)


def remove(node_id: str, name: str):
    return lambda g: g[node_id]["inputs"].pop(name)


def drop(node_id: str):
    return lambda g: g.pop(node_id)


def add_nodes(**nodes):
    return lambda g: g.update(nodes)


def both(*changes):
    def run(g):
        for change in changes:
            change(g)

    return run


ZERO_OUT = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["20", 0]}}
SECOND_CHAIN = {
    "80": {"class_type": "VAEDecode", "inputs": {"samples": ["40", 0], "vae": ["6", 0]}},
    "81": {"class_type": "ImageScaleBy",
           "inputs": {"image": ["80", 0], "upscale_method": "lanczos", "scale_by": 2.0}},
    "82": {"class_type": "SaveImage", "inputs": {"images": ["81", 0], "filename_prefix": "big"}},
}  # fmt: skip
DANGLING = {
    "80": {"class_type": "LoadImage", "inputs": {"image": "pic3.png"}},
    "81": {"class_type": "ImageScaleToTotalPixels",
           "inputs": {"image": ["80", 0], "upscale_method": "lanczos", "megapixels": 1.0}},
}  # fmt: skip

REFUSALS = [
    # (rule, kind, change to the seed graph, node id, class_type, input)
    (
        "node classes",
        "unsupported",
        both(add_nodes(**{"70": ZERO_OUT}), inputs("40", negative=["70", 0])),
        "70",
        "ConditioningZeroOut",
        None,
    ),
    ("node classes", "malformed", remove("40", "steps"), "40", "KSampler", "steps"),
    (
        "node inputs",
        "unsupported",
        inputs("1", attention="flash"),
        "1",
        "NunchakuQwenImageDiTLoader",
        "attention",
    ),
    ("node inputs", "malformed", inputs("40", positive="make it blue"), "40", "KSampler", "positive"),
    ("connections", "unsupported", inputs("40", seed=["10", 0]), "40", "KSampler", "seed"),
    (
        "connections",
        "malformed",
        inputs("20", image1=["10", 1]),
        "20",
        "TextEncodeQwenImageEditPlus",
        "image1",
    ),
    ("values", "unsupported", inputs("40", sampler_name="dpmpp_sde"), "40", "KSampler", "sampler_name"),
    ("values", "malformed", inputs("40", cfg=250.0), "40", "KSampler", "cfg"),
    ("CFGNorm", "unsupported", inputs("4", strength=0.8), "4", "CFGNorm", "strength"),
    ("CFGNorm", "malformed", inputs("4", strength="one"), "4", "CFGNorm", "strength"),
    ("model chain", "unsupported", both(inputs("4", model=["2", 0]), drop("3")), "40", "KSampler", "model"),
    ("model chain", "malformed", inputs("3", model=["4", 0]), "4", "CFGNorm", "model"),  # a loop
    ("loaders", "unsupported", inputs("5", type="wan"), "5", "CLIPLoader", "type"),
    (
        "loaders",
        "malformed",
        inputs("1", num_blocks_on_gpu=0),
        "1",
        "NunchakuQwenImageDiTLoader",
        "num_blocks_on_gpu",
    ),
    ("conditioning", "unsupported", remove("20", "vae"), "20", "TextEncodeQwenImageEditPlus", "vae"),
    ("conditioning", "malformed", inputs("20", clip=["6", 0]), "20", "TextEncodeQwenImageEditPlus", "clip"),
    (
        "picture slots",
        "unsupported",
        both(remove("20", "image1"), inputs("20", image2=["10", 0])),
        "20",
        "TextEncodeQwenImageEditPlus",
        "image2",
    ),
    (
        "picture slots",
        "malformed",
        inputs("20", image1=["99", 0]),
        "20",
        "TextEncodeQwenImageEditPlus",
        "image1",
    ),
    (
        "scaling",
        "unsupported",
        both(
            add_nodes(
                **{
                    "70": {
                        "class_type": "ImageScaleBy",
                        "inputs": {"image": ["10", 0], "upscale_method": "bilinear", "scale_by": 0.5},
                    }
                }
            ),
            inputs("20", image1=["70", 0]),
            inputs("21", image1=["70", 0]),
        ),
        "70",
        "ImageScaleBy",
        "upscale_method",
    ),  # fmt: skip
    (
        "scaling",
        "malformed",
        both(
            add_nodes(
                **{
                    "70": {
                        "class_type": "ImageScaleBy",
                        "inputs": {"image": ["10", 0], "upscale_method": "lanczos", "scale_by": 20.0},
                    }
                }
            ),
            inputs("20", image1=["70", 0]),
            inputs("21", image1=["70", 0]),
        ),
        "70",
        "ImageScaleBy",
        "scale_by",
    ),  # fmt: skip
    ("latent", "unsupported", inputs("40", denoise=0.5), "40", "KSampler", "denoise"),
    ("latent", "malformed", inputs("30", width=8), "30", "EmptySD3LatentImage", "width"),
    ("edit parameters", "unsupported", inputs("30", width=72), "30", "EmptySD3LatentImage", "width"),
    ("edit parameters", "malformed", inputs("40", steps=0), "40", "KSampler", "steps"),
    ("edit parameters", "unsupported", inputs("40", steps=500), "40", "KSampler", "steps"),
    ("output", "unsupported", add_nodes(**SECOND_CHAIN), "82", "SaveImage", "images"),
    ("output", "malformed", remove("60", "images"), "60", "SaveImage", "images"),
    ("branches", "unsupported", add_nodes(**DANGLING), "80", "LoadImage", None),
    ("links", "malformed", inputs("50", samples=["40", 3]), "50", "VAEDecode", "samples"),
]


@pytest.mark.parametrize(
    ("rule", "kind", "change", "node_id", "class_type", "input_name"),
    REFUSALS,
    ids=[f"{r[0]}-{r[1]}" for r in REFUSALS],
)
def test_refused_before_loading_with_the_node_named(rule, kind, change, node_id, class_type, input_name):
    with pytest.raises(WorkflowError) as info:
        plan_workflow(edited(seed_api(2, cfg=2.5), change))
    error = info.value
    message = str(error)
    assert f"node {node_id} ({class_type})" in message, message
    assert error.rule == kind, message
    assert error.field == ".".join(p for p in ("workflow", node_id, input_name) if p), message
    assert isinstance(error, ValueError)


def test_refusals_of_the_negative_at_cfg_not_one_and_of_the_latent_source():
    unsupported = edited(seed_api(2, cfg=2.5), inputs("21", image2=["10", 0]))
    with pytest.raises(WorkflowError, match=r"node 21 \(TextEncodeQwenImageEditPlus\), input 'image2'"):
        plan_workflow(unsupported)
    assert plan_workflow(edited(seed_api(2), inputs("21", image2=["10", 0]))).notes  # cfg 1: noted only
    latent_from_image2 = edited(official_api(), inputs("71", pixels=["11", 0]))
    with pytest.raises(WorkflowError, match=r"node 71 \(VAEEncode\), input 'pixels'.*picture 1"):
        plan_workflow(latent_from_image2)
    advanced = edited(advanced_api(), inputs("40", start_at_step=1))
    with pytest.raises(WorkflowError, match=r"node 40 \(KSamplerAdvanced\), input 'start_at_step'"):
        plan_workflow(advanced)
    unet = edited(unet_api(), inputs("1", weight_dtype="fp8_e4m3fn"))
    with pytest.raises(
        WorkflowError, match=r"node 1 \(UNETLoader\), input 'weight_dtype'.*supported: default"
    ):
        plan_workflow(unet)


def test_refusals_of_the_editor_format():
    data = seed_editor(1).json()
    nodes = {n["id"]: n for n in data["nodes"]}
    nodes[40]["widgets_values"].append(0.5)  # one value more than KSampler's widgets
    with pytest.raises(WorkflowError, match=r"node 40 \(KSampler\).*widgets_values") as info:
        plan_workflow(data)
    assert info.value.rule == "malformed"
    data = seed_editor(1).json()
    {n["id"]: n for n in data["nodes"]}[2]["mode"] = 2  # a muted LoRA loader cuts the model chain
    with pytest.raises(
        WorkflowError, match=r"node 3 \(ModelSamplingAuraFlow\), input 'model'.*node 2"
    ) as info:
        plan_workflow(data)
    assert info.value.rule == "unsupported"
    data = seed_editor(1).json()
    data["definitions"] = {"subgraphs": [{"id": "a1b2"}]}
    data["nodes"].append({"id": 77, "type": "a1b2", "mode": 0, "inputs": [], "outputs": []})
    with pytest.raises(WorkflowError, match=r"node 77 \(a1b2\).*subgraph"):
        plan_workflow(data)


def test_refusals_of_node_overrides():
    plan = plan_workflow(seed_api(1))
    with pytest.raises(WorkflowError, match=r"node 40 \(KSampler\), input 'positive'.*connection") as info:
        plan.with_overrides({"40.positive": "x"})
    assert info.value.rule == "malformed"
    with pytest.raises(
        WorkflowError, match=r"node 40 \(KSampler\), input 'sampler_name'.*supported: euler"
    ) as info:
        plan.with_overrides({"40.sampler_name": "dpmpp_sde"})
    assert info.value.rule == "unsupported"
    with pytest.raises(WorkflowError, match=r"node 40 \(KSampler\), input 'steps'.*not a int"):
        plan.with_overrides({"40.steps": "four"})


def test_not_a_workflow_and_no_output():
    with pytest.raises(WorkflowError, match="not a ComfyUI workflow") as info:
        plan_workflow({"hello": "world"})
    assert info.value.field == "workflow" and info.value.rule == "malformed"
    graph = seed_api(1)
    del graph["60"]
    with pytest.raises(WorkflowError, match="no output node") as info:
        plan_workflow(graph)
    assert info.value.field == "workflow"
