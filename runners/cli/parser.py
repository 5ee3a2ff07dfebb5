"""The `qwen-edit` command line as tables: each command's flags are data, `build_parser` walks them.

A flag is `(names, argparse keyword arguments)`; the key "group" puts it in a named mutually exclusive
group. Shared flag sets (`--json`/`-v`; where the models are and how they run) are listed once and
named by the commands that take them. `--help` shows each flag's default: argparse's own where there
is one, else the help text says where it comes from (the settings' `generation:`, else the 4-step
Lightning values, which tests/test_cli.py checks against `EditParams`).
"""

from __future__ import annotations

import argparse
from typing import Any

from .output import EXIT_CODES

Flag = tuple[tuple[str, ...], dict[str, Any]]
DEFAULT_OUT = "qwen-edit_{seed}.png"
# Flags that take several values (--seed 1 2 3, as mflux) but must not swallow the pictures after them.
MULTI_INT_FLAGS = ("--seed",)

COMMON: list[Flag] = [
    (("--json",), {"action": "store_true", "help": "NDJSON events on stdout, a final envelope line"}),
    (("-v", "--verbose"), {"action": "count", "default": 0, "help": "library logs on stderr (-vv: debug)"}),
]
MODELS: list[Flag] = [
    (("--config",), {
        "action": "append", "metavar": "YAML",
        "help": "settings file (model folders as in ComfyUI's extra_model_paths.yaml, generation "
        "defaults); repeat to layer, e.g. configs/runpod-pod.yaml configs/lightning-8step.yaml",
    }),
    (("--models-dir",), {
        "metavar": "DIR",
        "help": "a ComfyUI models/ folder (diffusion_models/, text_encoders/, vae/, loras/); "
        "overrides the folders of --config",
    }),
    (("--device",), {"help": "auto, cuda, cuda:1, cpu (default: settings, else cuda if present)"}),
    (("--backend",), {"choices": ("auto", "nunchaku", "portable")}),
    (("--compute",), {"choices": ("auto", "bf16", "fp8"), "help": "portable backend's GEMM precision"}),
    (("--text-encoder-compute",), {
        "choices": ("upcast", "fp8"),
        "help": "upcast: ComfyUI's numbers (fp8 weights, bf16 activations; default: settings, else upcast); "
        "fp8: activations in fp8 too",
    }),
]  # fmt: skip
OFFLOAD: list[Flag] = [
    (("--offload",), {
        "choices": ("auto", "enable", "disable"),
        "help": "ComfyUI-nunchaku's cpu_offload: stream transformer blocks from CPU memory",
    }),
    (("--num-blocks-on-gpu",), {"type": int, "metavar": "N", "help": "with --offload enable"}),
    (("--pin-memory",), {
        "action": argparse.BooleanOptionalAction, "default": None,
        "help": "pinned host memory for streamed blocks (faster copies)",
    }),
]  # fmt: skip
SHARED = {"common": COMMON, "models": MODELS}

EDIT: list[Flag] = [
    (("images",), {"nargs": "*", "metavar": "IMAGE", "help": "1-3 input images (picture 1 sets the size)"}),
    (("-p", "--prompt"), {"group": "prompt"}),
    (("--prompt-file",), {"group": "prompt", "metavar": "FILE", "help": "the prompt, read from a file"}),
    (("-n", "--negative-prompt"), {"help": "used when --cfg > 1 (default: empty)"}),
    (("--seed",), {
        "type": int, "nargs": "+", "action": "extend", "metavar": "N",
        "help": "one job per seed; -1: random (default: random; the seed is reported and embedded)",
    }),
    (("--steps",), {"type": int, "help": "sampling steps (default: settings, else 4)"}),
    (("--cfg", "--guidance"), {
        "type": float, "dest": "cfg", "help": "CFG scale; 1 skips the negative (default: settings, else 1.0)",
    }),
    (("--sampler",), {
        "help": "euler, euler_ancestral, heun, dpmpp_2m, dpmpp_2m_sde, lcm (default: settings, else euler)",
    }),
    (("--scheduler",), {
        "help": "simple, normal, sgm_uniform, karras, exponential, beta (default: settings, else simple)",
    }),
    (("--denoise",), {"type": float, "help": "below 1: start from picture 1 (default: settings, else 1.0)"}),
    (("--shift",), {"type": float, "help": "ModelSamplingAuraFlow shift (default: settings, else 3.0)"}),
    (("--width",), {
        "type": int, "help": "output width, multiple of 16, with --height (default: picture 1 at about one "
        "megapixel, no side over 4096)",
    }),
    (("--height",), {"type": int, "help": "output height, multiple of 16, with --width"}),
    (("--batch-size",), {"type": int, "help": "images per job (default: settings, else 1)"}),
    (("--lora",), {
        "action": "append", "metavar": "PATH[:STRENGTH]",
        "help": "a LoRA file or a name in the loras folder; repeatable; replaces the config's",
    }),
    (("--batch-file",), {
        "metavar": "FILE",
        "help": "one job per line: a prompt, or a JSON object (prompt, images, seed, steps, cfg, "
        "sampler, scheduler, denoise, shift, width, height, batch_size, out, loras); the "
        "command line gives the defaults; the models load once",
    }),
    (("-o", "--out", "--output"), {
        "default": DEFAULT_OUT, "metavar": "PATH",
        "help": "output file or folder; {seed}, {job}, {index} are filled in; .png (with the parameters), "
        ".jpg or .webp; a name taken gets _1, _2, ...",
    }),
    (("--overwrite",), {"action": "store_true", "help": "replace existing files instead of _1, _2, ..."}),
    (("--from",), {
        "dest": "from_picture", "metavar": "PICTURE",
        "help": "re-run what made a PNG qwen-edit wrote (its parameters, pictures, model files); "
        "flags given here change it",
    }),
    (("--transformer",), {
        "help": "transformer file (path, or name in diffusion_models/; default: the settings', else 'auto', "
        "the 4-step file of this card's precision)",
    }),
    (("--text-encoder",), {"help": "text encoder file (path or name in text_encoders/; default: settings)"}),
    (("--vae",), {"help": "VAE file (path or name in vae/; default: the settings')"}),
    (("--tokenizer",), {"help": "tokenizer folder (default: beside the text encoder)"}),
    *OFFLOAD,
    (("--compile",), {
        "action": "store_true", "help": "torch.compile the transformer blocks and the text encoder",
    }),
    (("--demo",), {"action": "store_true", "help": "use the tiny random-weight demo model (CPU)"}),
    (("--dry-run",), {
        "action": "store_true", "help": "check the parameters, inputs and model files; load nothing",
    }),
]  # fmt: skip
DOWNLOAD: list[Flag] = [
    (("--models-dir",), {
        "metavar": "DIR",
        "help": "target models/ folder (default: $QWEN_EDIT_MODELS, an existing RunPod models "
        "folder, /workspace/data/models on a pod, else ./models)",
    }),
    (("--precision",), {
        "choices": ("auto", "fp4", "int4"), "default": "auto",
        "help": "auto: fp4 on RTX 50xx (SM 120/121), int4 elsewhere",
    }),
    (("--rank",), {"type": int, "nargs": "+", "default": [128], "help": "SVD rank(s): 128 or 32"}),
    (("--steps",), {
        "type": int, "nargs": "+", "default": [4],
        "help": "Lightning transformer(s): 4 and/or 8 steps (default: 4; --steps 4 8 for both)",
    }),
    (("--no-tokenizer",), {"action": "store_true", "help": "skip Qwen/Qwen-Image-Edit-2509 tokenizer/"}),
    (("--checksum",), {"action": "store_true", "help": "also verify sha256 (reads every file)"}),
    (("--retries",), {"type": int, "default": 5, "help": "resume attempts without progress per file"}),
    (("--dry-run",), {"action": "store_true", "help": "list what would be fetched; write nothing"}),
    (("--device",), {"help": "the card --precision auto decides for (default: this one)"}),
]  # fmt: skip
DEMO: list[Flag] = [
    (("-o", "--out", "--output"), {"default": "qwen-edit-demo.png", "metavar": "PATH"}),
    (("--overwrite",), {"action": "store_true", "help": "replace the file instead of writing _1, _2, ..."}),
    (("-p", "--prompt"), {"default": "make the sky a warm sunset"}),
    (("--seed",), {"type": int, "default": 0}),
    (("--steps",), {"type": int, "default": 4}),
    (("--device",), {"default": "cpu"}),
    (("--compute",), {"choices": ("bf16", "fp8"), "default": "bf16"}),
    (("--cache-dir",), {
        "metavar": "DIR",
        "help": "where the demo files are written (default: $QWEN_EDIT_CACHE or ~/.cache/qwen-edit)",
    }),
]  # fmt: skip

RUN: list[Flag] = [
    (("workflow",), {"metavar": "WORKFLOW.json", "help": "a ComfyUI workflow, API or editor format"}),
    (("--set",), {
        "action": "append", "metavar": "NODE.INPUT=VALUE",
        "help": "change a node's input, e.g. --set 3.seed=42 --set 6.text='a red car' (repeatable)",
    }),
    (("--image",), {
        "action": "append", "metavar": "NAME=PATH",
        "help": "the file for a LoadImage node's image name (repeatable); others come from --input-dir",
    }),
    (("--input-dir",), {"metavar": "DIR", "help": "ComfyUI's input/ folder: where LoadImage names are read"}),
    (("-o", "--out", "--output"), {"default": ".", "metavar": "DIR", "help": "where SaveImage's files go"}),
    (("--dry-run",), {"action": "store_true", "help": "check the graph, the --set values and the pictures"}),
    (("--demo",), {
        "action": "store_true",
        "help": "the tiny demo model's files as the model folders (name them in the workflow)",
    }),
    (("--cache-dir",), {"metavar": "DIR", "help": "with --demo: where its files are"}),
]  # fmt: skip

# command -> its parser: shared flag sets, its own flags, defaults, and the text of --help.
COMMANDS: dict[str, dict[str, Any]] = {
    "edit": {
        "shared": ("common", "models"),
        "flags": EDIT,
        "defaults": {"cache_dir": None},
        "help": "edit images following a prompt",
        "description": "Edit 1-3 images following a prompt; writes PNGs with the parameters "
        "embedded (text chunk 'parameters').",
    },
    "run": {
        "shared": ("common", "models"),
        "flags": RUN,
        "help": "run a ComfyUI Qwen-Image-Edit-2509 workflow headless",
        "description": "Run a ComfyUI workflow (API or editor JSON) the way ComfyUI would: its loader, "
        "LoRA, sampling and image nodes; anything else is refused before loading, naming the node.",
    },
    "download": {
        "shared": ("common",),
        "flags": DOWNLOAD,
        "help": "fetch the model files from the Hugging Face hub",
        "description": "Fetch the SVDQ transformer(s), text encoder, VAE and tokenizer into "
        "a ComfyUI models/ folder; resumable; sizes verified.",
    },
    "doctor": {
        "shared": ("common", "models"),
        "flags": [],
        "defaults": {"backend": "auto", "compute": "auto"},
        "help": "check GPU, drivers, Nunchaku and models",
        "description": "Check the GPU, torch, Nunchaku, the backend and precision that would "
        "run, the model files, memory and disk; a verdict and a fix per problem.",
        "epilog": "exit codes: 0 ready; 4 environment problem; 3 model files missing",
    },
    "demo": {
        "shared": ("common",),
        "flags": DEMO,
        "help": "run the tiny random-weight model end to end (CPU)",
        "description": "Every stage of the real path on a tiny random model, on the CPU, in "
        "seconds: a PNG out (noise, with the parameters embedded).",
        "epilog": None,
    },
}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, plus "(default: X)" for every flag that has a default the help doesn't already name."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "default" not in text
            and default not in (None, False, argparse.SUPPRESS, [])
        ):
            shown = " ".join(map(str, default)) if isinstance(default, list) else "%(default)s"
            text += f" (default: {shown})"
        return text


def split_multi_values(argv: list[str]) -> list[str]:
    """`--seed 1 2 room.png` as `--seed=1 --seed=2 room.png`: the numbers after a MULTI_INT_FLAGS flag
    are its values, the first word that is not one is a picture again (argparse's nargs="+" would take
    every word up to the next flag, and fail on the picture)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            out.extend(argv[i:])
            break
        if word in MULTI_INT_FLAGS:
            values = []
            while i + 1 + len(values) < len(argv) and _is_int(argv[i + 1 + len(values)]):
                values.append(argv[i + 1 + len(values)])
            if values:
                out.extend(f"{word}={value}" for value in values)
                i += 1 + len(values)
                continue
        out.append(word)
        i += 1
    return out


def _is_int(word: str) -> bool:
    try:
        int(word)
    except ValueError:
        return False
    return True


class UsageError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so `--json` still gets its envelope for a bad flag."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self, message)


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag]) -> None:
    groups: dict[str, Any] = {}
    for names, options in flags:
        options = dict(options)
        group = options.pop("group", None)
        if group is not None and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        (parser if group is None else groups[group]).add_argument(*names, **options)


def build_parser() -> Parser:
    from qwen_edit import __version__

    epilog = "exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items())
    parser = Parser(
        prog="qwen-edit",
        description="Qwen-Image-Edit-2509 with Nunchaku SVDQuant weights, without ComfyUI.",
        epilog=epilog,
    )
    parser.add_argument("--version", action="version", version=f"qwen-edit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    parser.formatter_class = HelpFormatter
    for name, command in COMMANDS.items():
        # Fresh parents per command: argparse shares a parent's actions with every child, so one
        # command's set_defaults (doctor's backend="auto") would otherwise become every command's, and
        # `edit` would override the settings' backend with it.
        parents = []
        for shared in command["shared"]:
            parents.append(Parser(add_help=False))
            add_flags(parents[-1], SHARED[shared])
        child = sub.add_parser(
            name,
            parents=parents,
            help=command["help"],
            description=command["description"],
            epilog=command.get("epilog", epilog),
            formatter_class=HelpFormatter,
        )
        add_flags(child, command["flags"])
        child.set_defaults(**command.get("defaults", {}))
    sub.add_parser("bench", help="per-stage latency benchmark (see `qwen-edit bench --help`)", add_help=False)
    return parser
