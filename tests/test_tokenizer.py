"""Tokenizer, vision preprocessing and edit template against ComfyUI's TextEncodeQwenImageEditPlus.

The references below re-derive ComfyUI's behaviour step by step from its source, Comfy-Org/ComfyUI@a125cd8
(= a125cd84b054a57729b5eecab930ca9408719832), citing the lines they follow; they call transformers'
Qwen2Tokenizer directly, not qwen_edit's loader.
"""

from __future__ import annotations

import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_edit import tokenizer as tk
from qwen_edit.testing.text_encoder import write_comfy_text_encoder
from qwen_edit.text_encoder import encode_tokens, load_text_encoder

# comfy_extras/nodes_qwen.py:75 (llama_template of TextEncodeQwenImageEditPlus)
COMFY_EDITPLUS_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input "
    "where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tokenizer(shared_dir):
    return tk.load_tokenizer(shared_dir / "data" / "qwen25_tokenizer")


@pytest.fixture(scope="module")
def hf_tokenizer(shared_dir):
    from transformers import Qwen2Tokenizer

    # comfy/text_encoders/qwen_image.py:8-11: Qwen2Tokenizer.from_pretrained(bundled qwen25_tokenizer)
    return Qwen2Tokenizer.from_pretrained(str(shared_dir / "data" / "qwen25_tokenizer"))


def comfy_reference(hf_tokenizer, prompt: str, n_images: int, counts: list[int]):
    """(expanded ids, image spans, template_end) following ComfyUI's code path line by line."""
    # nodes_qwen.py:77-98: one prefix per connected slot, numbered by slot, no separators
    image_prompt = ""
    for i in range(n_images):
        image_prompt += f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>"
    text = image_prompt + prompt
    # qwen_image.py:21-33: the node's llama_template is applied unless the text starts with a chat tag
    llama_text = text if text.startswith("<|im_start|>") else COMFY_EDITPLUS_TEMPLATE.format(text)
    # sd1_clip.py:536-545: escape_important, weights disabled, unescape_important
    llama_text = llama_text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    llama_text = llama_text.replace("\0\1", ")").replace("\0\2", "(")
    # sd1_clip.py:546-573: split before " embedding:" / "\nembedding:", tokenize each piece alone
    split = re.split(" {0}|\n{0}".format("embedding:"), llama_text)
    to_tokenize = [split[0]] + ["embedding:" + s for s in split[1:]]
    tokens = []
    for word in [x for x in to_tokenize if x != ""]:
        # :554: the embedding lookup runs only with an embedding directory, and Qwen25_7BVLITokenizer
        # builds its SDTokenizer without one (qwen_image.py:8-11): "embedding:NAME" stays text
        tokens += [(t, 1.0) for t in hf_tokenizer(word)["input_ids"]]
    if len(tokens) < 1:  # min_length=1, pad 151643 (qwen_image.py:11, sd1_clip.py:620-621)
        tokens += [(151643, 1.0)]
    # qwen_image.py:38-46: each 151655 becomes an image entry while images remain
    embed_count = 0
    for i in range(len(tokens)):
        if tokens[i][0] == 151655 and n_images > embed_count:
            tokens[i] = ({"type": "image", "index": embed_count},) + tokens[i][1:]
            embed_count += 1
    # sd1_clip.py:181-234: an image entry is deleted and its embeddings spliced in at its position
    ids, spans = [], []
    for t, _ in tokens:
        if isinstance(t, dict):
            spans.append((len(ids), counts[t["index"]]))
            ids += [151655] * counts[t["index"]]
        else:
            ids.append(t)
    # qwen_image.py:62-78: index of the 2nd <|im_start|>, +3 over "user\n", on the unexpanded list
    template_end, count_im_start = -1, 0
    for i, v in enumerate(tokens):
        if isinstance(v[0], int) and v[0] == 151644 and count_im_start < 2:
            template_end = i
            count_im_start += 1
    if (
        len(ids) > template_end + 3
        and tokens[template_end + 1][0] == 872
        and tokens[template_end + 2][0] == 198
    ):
        template_end += 3
    return ids, spans, template_end


PROMPTS = [
    "make the cat wear a red hat",
    "",  # ComfyUI's negative prompt in the reference workflow
    "swap \\(left\\) and (right:1.2) objects,\nkeep  the background",  # escapes; weights stay literal
    "a dog embedding:missing, sitting\nembedding:other on grass",  # "embedding:" words stay text
    "literal <|image_pad|> and <|img|> tokens",
]


@pytest.mark.parametrize("n_images", [1, 2, 3])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_edit_prompt_ids_match_comfyui(tokenizer, hf_tokenizer, prompt, n_images):
    counts = [196, 187, 35][:n_images]
    tokens = tk.edit_prompt_token_ids(tokenizer, prompt, n_images, counts)
    ids, spans, end = comfy_reference(hf_tokenizer, prompt, n_images, counts)
    assert tokens.input_ids == ids
    assert tokens.image_spans == spans
    assert tokens.drop == end == 64  # = diffusers' prompt_template_encode_start_idx
    assert sum(c for _, c in spans) == sum(counts)


def test_edit_prompt_known_ids(tokenizer):
    """Anchors measured with ComfyUI's files (shared/docs/comfy-semantics.md §1.2)."""
    t = tk.edit_prompt_token_ids(tokenizer, "make it red", 2, [4, 6])
    ids = t.input_ids
    assert [i for i, v in enumerate(ids) if v == 151644][:2] == [0, 61]
    assert ids[61:64] == [151644, 872, 198]
    assert ids[64:72] == [24669, 220, 16, 25, 220, 151652, 151655, 151655]  # "Picture 1: " <|vision_start|>
    assert t.image_spans == [(70, 4), (81, 6)]
    assert ids[74:83] == [151653, 24669, 220, 17, 25, 220, 151652, 151655, 151655]  # no separator
    assert ids[-5:] == [151645, 198, 151644, 77091, 198]  # the kept tail
    assert t.comfy_ids.count(151655) == 2 and len(t.comfy_ids) == len(ids) - 8


def test_embedding_words_stay_text_as_in_comfyui(tokenizer):
    """Ids ComfyUI's own TextEncodeQwenImageEditPlus tokenizer gave (Comfy-Org/ComfyUI@a125cd8): the
    split before " embedding:" eats the space, and the word is tokenized as text, not dropped."""
    assert tk.comfy_tokenize(tokenizer, "a photo in embedding:mystyle, sharp") == [
        64, 6548, 304, 94611, 30286, 597, 967, 11, 17232,
    ]  # fmt: skip
    assert tk.comfy_tokenize(tokenizer, "embedding:a\nembedding:b") == tk.comfy_tokenize(
        tokenizer, "embedding:a"
    ) + tk.comfy_tokenize(tokenizer, "embedding:b")


def test_picture_numbers_follow_slots(tokenizer):
    t = tk.edit_prompt_token_ids(tokenizer, "x", 2, [4, 4], slots=[2, 3])
    assert t.input_ids[64:67] == [24669, 220, 17]  # "Picture 2"
    assert tk.edit_prompt_text("x", [2]).count("Picture 2: <|vision_start|><|image_pad|><|vision_end|>x") == 1


def test_drop_rule_edge_cases():
    # qwen_image.py:64-76: no <|im_start|> keeps only the last state; "user\n" after it adds 3
    assert tk.template_end([5, 6, 7], 3) == -1
    assert tk.template_end([151644, 872, 198, 5, 151644, 872, 198, 9], 8) == 7
    assert tk.template_end([151644, 5, 151644, 9, 9], 5) == 2  # not "user\n": cut at the <|im_start|>


def test_argument_errors(tokenizer):
    with pytest.raises(ValueError, match="image_token_counts has 1 entries for 2 images"):
        tk.edit_prompt_token_ids(tokenizer, "x", 2, [4])
    with pytest.raises(TypeError, match="prompt must be a str"):
        tk.edit_prompt_token_ids(tokenizer, None, 0, [])


# ------------------------------------------------------------------------------------------ tokenizer files


def test_tokenizer_loads_from_repo_layout(shared_dir, tmp_path, tokenizer):
    repo = tmp_path / "Qwen-Image-Edit-2509"
    shutil.copytree(shared_dir / "data" / "qwen25_tokenizer", repo / "tokenizer")
    loaded = tk.load_tokenizer(repo)  # the repository root finds tokenizer/
    assert loaded("Picture 1: hi")["input_ids"] == tokenizer("Picture 1: hi")["input_ids"]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found.*vocab.json, merges.txt"):
        tk.load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="needs vocab.json and merges.txt"):
        tk.load_tokenizer(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "vocab.json").write_text('{"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}')
    (other / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="not the Qwen2.5-VL tokenizer"):
        tk.load_tokenizer(other)


# ------------------------------------------------------------------------------------------------- images


def comfy_vl_size(width: int, height: int) -> tuple[int, int]:
    # nodes_qwen.py:80-85
    scale_by = math.sqrt(384 * 384 / (width * height))
    return round(width * scale_by), round(height * scale_by)


@pytest.mark.parametrize(
    ("size", "vl", "grid", "n_tokens"),
    [
        ((1254, 836), (470, 314), (308, 476), 187),  # the §1.6 worked example (after ImageScaleToTotalPixels)
        ((384, 384), (384, 384), (392, 392), 196),
        ((1024, 1024), (384, 384), (392, 392), 196),
        ((640, 360), (512, 288), (280, 504), 180),
    ],
)
def test_vision_sizes(size, vl, grid, n_tokens):
    image = Image.new("RGB", size, (10, 20, 30))
    resized = tk.resize_for_vision(image)
    assert (resized.shape[1], resized.shape[0]) == vl == comfy_vl_size(*size)
    assert tk.vision_grid_size(*resized.shape[:2]) == grid
    pixels, grid_thw = tk.preprocess_vision_image(resized)
    assert grid_thw.tolist() == [[1, grid[0] // 14, grid[1] // 14]]
    assert pixels.shape == (grid[0] * grid[1] // 196, 1176) and pixels.dtype == torch.float32
    assert tk.vision_token_count(grid_thw) == n_tokens


def test_vision_grid_fallbacks():
    # qwen_vl.py:39-45: below 3136 pixels scale up with ceil, above 12845056 scale down with floor
    assert tk.vision_grid_size(30, 30) == (56, 56)
    # round(10/28) = 0: ceil rule, beta = sqrt(3136/4000), ceil(10 beta/28) = 1, ceil(400 beta/28) = 13
    assert tk.vision_grid_size(10, 400) == (28, 364)
    # 5012^2 > 3584^2: floor rule; 5000 / beta is 3584 in exact arithmetic but just under it in floats
    assert tk.vision_grid_size(5000, 5000) == (3556, 3556)


def test_area_resize_is_block_mean():
    # "area" = adaptive average pooling: a 2x downscale averages 2x2 blocks
    x = torch.rand(768, 768, 3)
    expected = x.reshape(384, 2, 384, 2, 3).mean(dim=(1, 3))
    torch.testing.assert_close(tk.resize_for_vision(x), expected, rtol=0, atol=1e-6)


def test_pixel_values_layout_and_normalization():
    """Each row is one 14x14 patch as (channel, time, y, x); rows go 2x2 merge group by group."""
    h, w = 56, 84  # already multiples of 28: the bilinear resize is the identity
    image = torch.rand(h, w, 3)
    pixels, grid = tk.preprocess_vision_image(image)
    mean = torch.tensor(tk.CLIP_MEAN)
    std = torch.tensor(tk.CLIP_STD)
    norm = (image - mean) / std
    gh, gw = h // 14, w // 14
    row = 0
    for by in range(gh // 2):
        for bx in range(gw // 2):
            for my in range(2):
                for mx in range(2):
                    py, px = 2 * by + my, 2 * bx + mx
                    patch = norm[py * 14 : (py + 1) * 14, px * 14 : (px + 1) * 14].permute(2, 0, 1)  # c y x
                    expected = torch.stack([patch, patch], dim=1).reshape(-1)  # c t y x, frame repeated
                    torch.testing.assert_close(pixels[row], expected, rtol=1e-5, atol=1e-5)
                    row += 1
    assert row == pixels.shape[0] == grid.prod().item()


def test_image_to_tensor_matches_load_image():
    rgba = Image.fromarray(np.array([[[255, 128, 0, 7]]], dtype=np.uint8), "RGBA")
    x = tk.image_to_tensor(rgba)  # nodes.py:1660-1669: convert("RGB") drops alpha, then /255
    assert x.shape == (1, 1, 3)
    torch.testing.assert_close(x[0, 0], torch.tensor([1.0, 128 / 255, 0.0]))
    with pytest.raises(ValueError, match=r"\[H, W, C>=3\]"):
        tk.image_to_tensor(torch.zeros(4, 4))


# ------------------------------------------------------------------------------------------- end to end


def test_encode_edit_prompt_end_to_end(tmp_path, tokenizer):
    config = write_comfy_text_encoder(tmp_path / "te.safetensors")
    model = load_text_encoder(tmp_path / "te.safetensors", config=config, dtype=torch.float32)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    out = tk.encode_edit_prompt(model, tokenizer, "make it red", [None, image])

    pixels, grid = tk.preprocess_vision_image(tk.resize_for_vision(image))
    count = tk.vision_token_count(grid)
    tokens = tk.edit_prompt_token_ids(tokenizer, "make it red", 1, [count], slots=[2])
    full = encode_tokens(model, tokens.input_ids, images=[(pixels, grid)], image_spans=tokens.image_spans)
    assert out.shape == (1, len(tokens.input_ids) - 64, config["hidden_size"]) and out.dtype == torch.float32
    torch.testing.assert_close(out, full[:, 64:], rtol=0, atol=0)
    assert tokens.input_ids[64:67] == [24669, 220, 17]  # the lone image sits in slot 2
