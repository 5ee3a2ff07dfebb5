"""Build-time check of the worker image: torch, torchvision and the Nunchaku wheel are one working set.

The Dockerfile runs it once everything is installed (Nunchaku, then this package's worker extra):

    python runners/check_image.py --torch 2.9.0+cu128 --torchvision 0.24.0+cu128 --wheel "$NUNCHAKU_WHEEL"

and the build fails (exit 1, one line per problem) when
- torch or torchvision is not the build the image installed first (a later `pip install` replaced it:
  Nunchaku's wheel needs `torchvision>=0.20`, and without a pinned torchvision pip once upgraded torch);
- the wheel's `+torchX.Y` tag is not the installed torch's major.minor, or its `cpXY` not this Python;
- the installed nunchaku is not that wheel, or `import nunchaku` / `from nunchaku._C import ops` fails
  (a wheel for another torch fails there with an undefined symbol; the backend choice `auto` would then
  quietly fall back to the portable backend at run time).

Importing the extension should need no GPU: in Nunchaku 1.0.2 its module init only registers classes
(csrc/pybind.cpp), the extension is not linked against the driver library (setup.py), and the Python
modules make no CUDA call at import time. So this runs in `docker build`, which has no GPU. (Read
from the source, not yet seen in a build: if the import ever fails there for want of a driver, that
is the message to look for.)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import urllib.parse
from dataclasses import dataclass

# nunchaku-<version>+torch<X.Y>-cp<XY>-cp<XY>-<platform>.whl (the release assets' names)
WHEEL_NAME = re.compile(
    r"^nunchaku-(?P<version>[^-+]+)\+torch(?P<torch>\d+\.\d+)-(?P<python>cp\d+)-(?P<abi>cp\d+t?)-"
    r"(?P<platform>[^-]+)\.whl$"
)


@dataclass(frozen=True)
class Wheel:
    version: str  # "1.0.2"
    torch: str  # major.minor it was built for: "2.9"
    python: str  # "cp312"
    platform: str  # "linux_x86_64"

    @property
    def local_version(self) -> str:
        """The installed distribution's version: "1.0.2+torch2.9"."""
        return f"{self.version}+torch{self.torch}"


def parse_wheel(name_or_url: str) -> Wheel:
    """The tags of a Nunchaku wheel file name or release URL ('+' may be written %2B)."""
    name = urllib.parse.unquote(urllib.parse.urlsplit(name_or_url).path.rsplit("/", 1)[-1])
    match = WHEEL_NAME.match(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a Nunchaku release wheel name (nunchaku-<version>+torch<X.Y>-cp<XY>-cp<XY>-"
            "<platform>.whl)"
        )
    return Wheel(match["version"], match["torch"], match["python"], match["platform"])


def major_minor(version: str) -> str:
    """ "2.9.0+cu128" -> "2.9"."""
    return ".".join(version.split("+")[0].split(".")[:2])


def version_problems(
    wheel: Wheel,
    *,
    torch_version: str,
    torchvision_version: str | None,
    python_tag: str,
    expected_torch: str,
    expected_torchvision: str | None,
    nunchaku_version: str | None,
) -> list[str]:
    """What is inconsistent between the wheel, what is installed and what the image installed first."""
    problems = []
    if torch_version != expected_torch:
        problems.append(
            f"torch is {torch_version}, but the image installed {expected_torch} before Nunchaku and the "
            "worker extra: a later pip install replaced it (pin it with a constraints file)"
        )
    if expected_torchvision is not None and torchvision_version != expected_torchvision:
        problems.append(
            f"torchvision is {torchvision_version or 'not installed'}, but the image installed "
            f"{expected_torchvision}"
        )
    if wheel.torch != major_minor(torch_version):
        problems.append(
            f"the Nunchaku wheel is built for torch {wheel.torch} (+torch{wheel.torch}), but torch "
            f"{torch_version} is installed: its extension will not load"
        )
    if wheel.python != python_tag:
        problems.append(f"the Nunchaku wheel is for {wheel.python}, but this Python is {python_tag}")
    if nunchaku_version != wheel.local_version:
        installed = nunchaku_version or "missing"
        problems.append(f"the installed nunchaku is {installed}, not the wheel's {wheel.local_version}")
    return problems


def import_problems() -> list[str]:
    """`import nunchaku` and its compiled extension, judged as the Nunchaku backend judges them."""
    from qwen_edit.nunchaku_backend import status

    found = status()
    if not found.ok:
        return [found.problem()]
    try:
        from nunchaku._C import ops  # noqa: F401  (the kernels; nunchaku.ops imports them too)
    except Exception as exc:  # ImportError, OSError: undefined symbol, missing libcudart, ...
        return [f"nunchaku._C fails to import: {type(exc).__name__}: {exc}"]
    return []


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check_image", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--torch", required=True, help="torch.__version__ the image installed, e.g. 2.9.0+cu128"
    )
    parser.add_argument("--torchvision", help="torchvision.__version__ the image installed")
    parser.add_argument("--wheel", required=True, help="the Nunchaku wheel's file name or URL")
    args = parser.parse_args(argv)

    import torch

    try:
        wheel = parse_wheel(args.wheel)
    except ValueError as exc:
        print(f"check_image: {exc}", file=sys.stderr)
        return 1
    try:
        import torchvision

        torchvision_version = torchvision.__version__
    except Exception:  # not installed, or built for another torch
        torchvision_version = None
    python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    problems = version_problems(
        wheel,
        torch_version=torch.__version__,
        torchvision_version=torchvision_version,
        python_tag=python_tag,
        expected_torch=args.torch,
        expected_torchvision=args.torchvision,
        nunchaku_version=_installed("nunchaku"),
    )
    problems += import_problems()
    for problem in problems:
        print(f"check_image: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(
        f"check_image: torch {torch.__version__}, torchvision {torchvision_version}, nunchaku "
        f"{wheel.local_version} ({python_tag}): consistent, extension imports"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
