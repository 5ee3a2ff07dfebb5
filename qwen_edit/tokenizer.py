"""Prompt and image inputs of the Qwen2.5-VL text encoder, exactly as ComfyUI's TextEncodeQwenImageEditPlus.

Three pieces, all from Comfy-Org/ComfyUI@a125cd8 (a125cd84b054a57729b5eecab930ca9408719832):
- the Qwen2.5 BPE tokenizer, from ComfyUI's bundled folder (vocab.json, merges.txt,
  tokenizer_config.json) or the `tokenizer/` folder of Qwen/Qwen-Image-Edit-2509;
- the vision preprocessing: an "area" resize to about 384x384 (comfy_extras/nodes_qwen.py:81-85), a
  bilinear resize to multiples of 28, CLIP normalization and patchifying
  (comfy/text_encoders/qwen_vl.py:9-88);
- the edit template with one "Picture N: <|vision_start|><|image_pad|><|vision_end|>" slot per image
  (nodes_qwen.py:75-98), and the rule that drops the system prompt from the hidden states
  (comfy/text_encoders/qwen_image.py:59-83), 64 tokens for this template.
`encode_edit_prompt` puts them together with `text_encoder.encode_tokens`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


PAD_ID = 151643  # <|endoftext|>, ComfyUI's pad token (qwen_image.py:11)
IM_START_ID = 151644
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
USER_ID = 872  # "user"
NEWLINE_ID = 198  # "\n"

EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input "
    "where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PICTURE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"

VISION_AREA = 384 * 384  # target pixel count of the VL image (nodes_qwen.py:80)
MIN_PIXELS = 3136
MAX_PIXELS = 12845056
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
_EMBEDDING = "embedding:"


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The Qwen2.5 tokenizer from a folder with vocab.json + merges.txt (+ tokenizer_config.json) or
    tokenizer.json: ComfyUI's comfy/text_encoders/qwen25_tokenizer/ or the tokenizer/ folder (or the root)
    of Qwen/Qwen-Image-Edit-2509."""
    from transformers import AutoTokenizer, Qwen2Tokenizer

    path = Path(path)
    if path.is_dir() and (path / "tokenizer").is_dir() and not (path / "vocab.json").is_file():
        path = path / "tokenizer"  # the diffusers repository root was passed
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder not found: {path}. Expected a folder with {', '.join(TOKENIZER_FILES)}: "
            "ComfyUI's comfy/text_encoders/qwen25_tokenizer/ or the tokenizer/ folder of "
            "Qwen/Qwen-Image-Edit-2509."
        )
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        # The class ComfyUI uses (qwen_image.py:8-11); in transformers 4.x this is the slow tokenizer.
        tokenizer = Qwen2Tokenizer.from_pretrained(str(path))
    elif (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        present = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"{path} has no Qwen2.5 tokenizer: it needs vocab.json and merges.txt (or tokenizer.json), "
            f"found {present[:8]}. Use ComfyUI's comfy/text_encoders/qwen25_tokenizer/ or the tokenizer/ "
            "folder of Qwen/Qwen-Image-Edit-2509."
        )
    if tokenizer.convert_tokens_to_ids("<|image_pad|>") != IMAGE_PAD_ID:
        raise ValueError(
            f"{path} is not the Qwen2.5-VL tokenizer: '<|image_pad|>' is not token {IMAGE_PAD_ID}. Use "
            "ComfyUI's qwen25_tokenizer/ folder or the tokenizer/ folder of Qwen/Qwen-Image-Edit-2509."
        )
    return tokenizer


def comfy_tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids as ComfyUI's SDTokenizer.tokenize_with_weights with weights disabled.

    Comfy-Org/ComfyUI@a125cd8, comfy/sd1_clip.py:526-626. Besides plain tokenization this keeps ComfyUI's
    quirks: `\\(` and `\\)` lose their backslash (the escape/unescape round trip, :344-352, :536-545),
    and the text is tokenized in pieces split before " embedding:" / "\\nembedding:" (:546-551), the
    space or newline before each "embedding:" consumed by the split. The words themselves stay text:
    the Qwen tokenizer is built without an embedding directory (Qwen25_7BVLITokenizer passes none to
    SDTokenizer, comfy/text_encoders/qwen_image.py:8-11), so the textual-inversion lookup (:554-568)
    never runs. An empty result becomes one pad token (min_length=1, :620-621).
    """
    text = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    text = text.replace("\0\1", ")").replace("\0\2", "(")
    pieces = re.split(f" {_EMBEDDING}|\n{_EMBEDDING}", text)
    words = [pieces[0]] + [_EMBEDDING + p for p in pieces[1:]]
    ids: list[int] = []
    for word in words:
        if word != "":
            ids += tokenizer(word)["input_ids"]
    return ids or [PAD_ID]


@dataclass
class EditPromptTokens:
    """The tokenized edit prompt. `input_ids` has each image's pad expanded to its vision-token count."""

    input_ids: list[int]
    image_spans: list[tuple[int, int]]  # (start, length) of each image's tokens in input_ids
    drop: int  # leading hidden states ComfyUI drops (the system prompt and "<|im_start|>user\n")
    comfy_ids: list[int]  # ids before the expansion: ComfyUI's token list, one 151655 per image


def edit_prompt_text(prompt: str, slots: Sequence[int]) -> str:
    """The full text ComfyUI tokenizes: the template around the picture prefixes and the prompt."""
    text = "".join(PICTURE_PROMPT.format(slot) for slot in slots) + prompt
    if text.startswith("<|im_start|>") or text.startswith("<|start_header_id|>"):
        return text  # a hand-written chat prompt gets no template (qwen_image.py:21-33)
    return EDIT_TEMPLATE.format(text)


def template_end(comfy_ids: Sequence[int], seq_len: int) -> int:
    """Index of the first kept hidden state: the 2nd <|im_start|>, +3 if "user\\n" follows
    (QwenImageTEModel.encode_token_weights, qwen_image.py:59-76). -1 (no <|im_start|>) keeps the last one."""
    end = -1
    seen = 0
    for i, token in enumerate(comfy_ids):
        if token == IM_START_ID and seen < 2:
            end = i
            seen += 1
    if seq_len > end + 3 and list(comfy_ids[end + 1 : end + 3]) == [USER_ID, NEWLINE_ID]:
        end += 3
    return end


def edit_prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    n_images: int,
    image_token_counts: Sequence[int],
    *,
    slots: Sequence[int] | None = None,
) -> EditPromptTokens:
    """Tokenize an edit prompt for `n_images` images with `image_token_counts` vision tokens each.

    slots: the picture numbers (ComfyUI numbers by input slot: image2 alone is "Picture 2"); 1..n by default.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if len(image_token_counts) != n_images:
        raise ValueError(f"image_token_counts has {len(image_token_counts)} entries for {n_images} images")
    slots = list(range(1, n_images + 1)) if slots is None else list(slots)
    if len(slots) != n_images:
        raise ValueError(f"slots has {len(slots)} entries for {n_images} images")
    comfy_ids = comfy_tokenize(tokenizer, edit_prompt_text(prompt, slots))
    input_ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for token in comfy_ids:
        # Pads are given to the images in order; a pad typed into the prompt beyond them stays a token
        # (qwen_image.py:38-46).
        if token == IMAGE_PAD_ID and len(spans) < n_images:
            count = int(image_token_counts[len(spans)])
            spans.append((len(input_ids), count))
            input_ids += [IMAGE_PAD_ID] * count
        else:
            input_ids.append(token)
    if len(spans) != n_images:
        raise ValueError(f"the prompt has {len(spans)} image slots for {n_images} images")
    end = template_end(comfy_ids, len(input_ids))
    # ComfyUI slices out[:, end:] with `end` counted in its unexpanded list (qwen_image.py:78); images
    # only come after the template's user turn, where both counts agree.
    return EditPromptTokens(input_ids, spans, end % len(input_ids), comfy_ids)


# ---------------------------------------------------------------------------------------------------------
# Images


def image_to_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """[H, W, 3] float32 in [0, 1], as ComfyUI's LoadImage makes it (nodes.py:1655-1669); a ComfyUI IMAGE
    tensor ([H, W, C] or [1, H, W, C]) passes through, keeping its first 3 channels."""
    if isinstance(image, torch.Tensor):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 3 or image.shape[-1] < 3:
            raise ValueError(
                f"image tensors must be [H, W, C>=3] floats in [0, 1], got shape {list(image.shape)}"
            )
        return image[..., :3].float().cpu()
    if not isinstance(image, Image.Image):
        raise TypeError(f"images must be PIL images or [H, W, 3] tensors, got {type(image).__name__}")
    image = ImageOps.exif_transpose(image)
    if image.mode == "I":
        image = image.point(lambda v: v * (1 / 255))
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb)


def resize_for_vision(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """The VL image: an "area" resize to about 384x384 pixels keeping the aspect ratio, sizes rounded with
    Python's round and no multiple (nodes_qwen.py:79-86, comfy/utils.py:861-887).

    Returns [h, w, 3] float32.
    """
    x = image_to_tensor(image)
    height, width = x.shape[:2]
    scale = math.sqrt(VISION_AREA / (width * height))
    w, h = round(width * scale), round(height * scale)
    if w < 1 or h < 1:
        raise ValueError(f"image of {width}x{height} pixels is too thin to resize to ~384x384 area")
    return F.interpolate(x.permute(2, 0, 1)[None], size=(h, w), mode="area")[0].permute(1, 2, 0)


def vision_grid_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) in pixels, multiples of 28, for the vision tower (qwen_vl.py:31-45; transformers'
    smart_resize without its aspect-ratio limit)."""
    factor = PATCH_SIZE * MERGE_SIZE
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > MAX_PIXELS:
        beta = math.sqrt((height * width) / MAX_PIXELS)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_vision_image(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, W, 3] float image -> (pixel_values [h*w/196, 1176] float32, image_grid_thw [[1, h/14, w/14]]).

    Bilinear resize (align_corners=False, no antialias) to `vision_grid_size`, CLIP normalization, the
    frame repeated to 2 temporal patches, then one row per 14x14 patch. Rows go 2x2 merge group by group
    (groups row-major), and row-major inside a group; a row holds (channel, time, y, x) of its patch.
    This is the layout of transformers' Qwen2VLImageProcessor, which Qwen2.5-VL's vision tower reads
    (qwen_vl.py:47-88).
    """
    image = image_to_tensor(image)
    height, width = image.shape[:2]
    h_bar, w_bar = vision_grid_size(height, width)
    resized = F.interpolate(
        image.permute(2, 0, 1)[None], size=(h_bar, w_bar), mode="bilinear", align_corners=False
    )[0]
    normalized = torch.empty_like(resized)
    for c in range(3):  # python-float mean/std in float32 arithmetic, as ComfyUI does
        normalized[c] = (resized[c] - CLIP_MEAN[c]) / CLIP_STD[c]
    gh, gw = h_bar // PATCH_SIZE, w_bar // PATCH_SIZE
    m, p, t = MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE
    frames = normalized[None].expand(t, -1, -1, -1)  # [t, c, H, W]
    # split H into (group row, row in group, pixel row) and W alike, then order the axes
    # group row, group col, row in group, col in group | channel, time, pixel row, pixel col
    patches = frames.reshape(t, 3, gh // m, m, p, gw // m, m, p).permute(2, 5, 3, 6, 1, 0, 4, 7)
    pixel_values = patches.reshape(gh * gw, 3 * t * p * p).contiguous()
    return pixel_values, torch.tensor([[1, gh, gw]], dtype=torch.long)


def vision_token_count(grid_thw: torch.Tensor | Sequence[int]) -> int:
    """Tokens an image gives the LLM after the 2x2 merge: t * h * w / 4."""
    t, h, w = (int(v) for v in torch.as_tensor(grid_thw).reshape(-1))
    return t * h * w // (MERGE_SIZE * MERGE_SIZE)


# ---------------------------------------------------------------------------------------------------------
# Everything together


def encode_edit_prompt(
    text_encoder: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    images: Sequence[Image.Image | torch.Tensor | None],
) -> torch.Tensor:
    """ComfyUI's TextEncodeQwenImageEditPlus conditioning: hidden states [1, L, 3584], float32 like ComfyUI's
    (sd1_clip.py:267) whatever the encoder's activation dtype.

    images: the node's image slots in order; None marks an empty slot (numbering follows the slot, so
    [None, img] gives "Picture 2"). The vision tower sees each image at about 384x384; the reference
    latents for the VAE are not made here.
    """
    from .text_encoder import encode_tokens

    slots = [i + 1 for i, image in enumerate(images) if image is not None]
    vision_inputs = [
        preprocess_vision_image(resize_for_vision(image)) for image in images if image is not None
    ]
    counts = [vision_token_count(grid) for _, grid in vision_inputs]
    tokens = edit_prompt_token_ids(tokenizer, prompt, len(vision_inputs), counts, slots=slots)
    hidden = encode_tokens(
        text_encoder, tokens.input_ids, images=vision_inputs, image_spans=tokens.image_spans
    )
    return hidden[:, tokens.drop :].float()
