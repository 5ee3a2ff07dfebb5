"""Mutation check of tests/test_edit_reference.py: one-line wiring mutants of qwen_edit/pipeline.py.

Not part of the test suite (pytest collects test_*.py only). Run from the repository root:

    python3 tests/mutate_pipeline.py [-k NAME]

For each mutant it copies the package to a temporary folder, applies the one-line change there (the
checkout is never edited), runs the whole-edit test against the copy, and reports which assertion
failed. The unmutated copy runs first and must pass; every mutant must fail. Exit status 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = "tests/test_edit_reference.py"

# name -> (text in pipeline.py, its replacement); each text must occur exactly once.
MUTANTS: dict[str, tuple[str, str]] = {
    "cond/uncond swapped in the model function": (
        "context = (uncond if use_uncond else cond)",
        "context = (cond if use_uncond else uncond)",
    ),
    "reference latents dropped": (
        "comfy_forward(self.transformer, x, sigma, context, refs)",
        "comfy_forward(self.transformer, x, sigma, context, [])",
    ),
    "seed + 1": ("model_fn, latent, seed=params.seed,", "model_fn, latent, seed=params.seed + 1,"),
    "negative prompt encoded without the images": (
        "self._encode(params.negative_prompt, node_images, check)",
        "self._encode(params.negative_prompt, [], check)",
    ),
    "CFGNorm off": (
        "callback=on_step, cancel=cancel,",
        "callback=on_step, cancel=cancel, cfg_norm_strength=None,",
    ),
    "reference order reversed": (
        "for i, p in enumerate(node_images):",
        "for i, p in enumerate(reversed(node_images)):",
    ),
    "encoders see image 1 unscaled": (
        "[conditioning.scale_to_megapixels(pictures[0], megapixels), *pictures[1:]]",
        "list(pictures)",
    ),
}


def run_test(package_root: Path) -> tuple[bool, str]:
    """(passed, what failed) of the whole-edit test with `qwen_edit` imported from `package_root`.

    Run from `package_root`: `python -m` puts the working folder first on sys.path, ahead of PYTHONPATH.
    """
    # A wide terminal, or pytest cuts the failure message off the FAILED summary lines.
    env = {**os.environ, "PYTHONPATH": str(package_root), "COLUMNS": "400"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(REPO),
        str(REPO / TEST),
    ]
    done = subprocess.run(command, cwd=package_root, env=env, capture_output=True, text=True)
    out = done.stdout + done.stderr
    failures = []
    for case, message in re.findall(r"^FAILED .*?\[(.+?)\](?: - (.*))?$", out, flags=re.MULTILINE):
        failures.append(f"[{case}] {message[:140]}")
    if done.returncode != 0 and not failures:
        failures.append(out.strip().splitlines()[-1] if out.strip() else f"exit {done.returncode}")
    return done.returncode == 0, "\n    ".join(failures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", help="run only the mutants whose name contains this")
    args = parser.parse_args()
    source = (REPO / "qwen_edit" / "pipeline.py").read_text()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "qwen_edit", root / "qwen_edit", ignore=shutil.ignore_patterns("__pycache__"))
        target = root / "qwen_edit" / "pipeline.py"
        probe = [sys.executable, "-c", "import qwen_edit.pipeline as p; print(p.__file__)"]
        imported = subprocess.run(probe, cwd=root, capture_output=True, text=True).stdout.strip()
        if Path(imported) != target:
            print(f"the copy is not what gets imported ({imported}); nothing was checked")
            return 1
        passed, failure = run_test(root)
        print(f"unmutated: {'passes' if passed else 'FAILS: ' + failure}")
        ok &= passed
        for name, (old, new) in MUTANTS.items():
            if args.k and args.k not in name:
                continue
            if source.count(old) != 1:
                print(f"{name}: its text occurs {source.count(old)} times in pipeline.py; update MUTANTS")
                ok = False
                continue
            target.write_text(source.replace(old, new))
            passed, failure = run_test(root)
            target.write_text(source)
            print(f"{name}: {'SURVIVED' if passed else 'killed'}\n    {failure}")
            ok &= not passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
