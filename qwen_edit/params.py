"""The parameters of one edit, validated up front with errors that name the field and the allowed range.

Defaults are those of the 4-step Lightning workflow (steps 4, cfg 1.0, euler, simple, shift 3.0,
denoise 1.0). Ranges follow ComfyUI's node inputs (KSampler, ModelSamplingAuraFlow, EmptySD3LatentImage)
where they exist; batch and size caps keep one job within a GPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import ParameterError
from .sampling import SAMPLER_NAMES, SCHEDULER_NAMES

MAX_SEED = 2**64 - 1  # ComfyUI's KSampler seed range (0xffffffffffffffff)
MAX_SIDE = 4096
MAX_BATCH = 8
MAX_IMAGES = 3  # TextEncodeQwenImageEditPlus has three image slots
# Both prompts are encoded whole (the negative one whenever cfg != 1), and one encoder call can't be
# stopped part-way, while its cost grows with the square of the length: 20,000 characters (about 5,000
# tokens) keeps text encoding to seconds, and the text-to-image attention of every step with it.
MAX_PROMPT = 20_000


@dataclass(frozen=True)
class EditParams:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 4
    cfg: float = 1.0
    sampler_name: str = "euler"
    scheduler: str = "simple"
    denoise: float = 1.0
    shift: float = 3.0
    width: int | None = None
    height: int | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        _check_text("prompt", self.prompt)
        _check_text("negative_prompt", self.negative_prompt)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("steps", self.steps, 1, 200)
        _check_float("cfg", self.cfg, 0.0, 100.0)
        _check_choice("sampler_name", self.sampler_name, SAMPLER_NAMES)
        _check_choice("scheduler", self.scheduler, SCHEDULER_NAMES)
        _check_float("denoise", self.denoise, 0.0, 1.0)
        if self.denoise == 0:
            raise ParameterError("denoise", "must be > 0 (0 would return the input unchanged)")
        _check_float("shift", self.shift, 0.0, 100.0)
        if self.shift == 0:  # the sigma schedule divides by it
            raise ParameterError("shift", "must be > 0 (3.0 is the workflow's)")
        if (self.width is None) != (self.height is None):
            raise ParameterError(
                "width" if self.width is None else "height", "give both width and height, or neither"
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 16, MAX_SIDE)
                if value % 16:
                    raise ParameterError(
                        name, f"must be a multiple of 16 (got {value}; try {round(value / 16) * 16})"
                    )
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_text(name: str, value) -> None:
    if not isinstance(value, str):
        raise ParameterError(name, f"must be a string, got {type(value).__name__}")
    if len(value) > MAX_PROMPT:
        raise ParameterError(name, f"longer than {MAX_PROMPT} characters ({len(value)} given)")
    if not value.isascii():
        try:  # "\ud800" is valid JSON but no text: the tokenizer can't take it
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ParameterError(
                name, f"is not valid Unicode text: a lone surrogate {value[exc.start]!r} at index {exc.start}"
            ) from None


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(name, f"must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ParameterError(name, f"must be in [{low}, {high}], got {value}")


def _check_float(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParameterError(name, f"must be a number in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ParameterError(name, f"must be in [{low}, {high}], got {value}")


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ParameterError(name, f"{value!r} is not supported; choose one of: {', '.join(allowed)}")
