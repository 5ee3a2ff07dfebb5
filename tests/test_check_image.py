"""The worker image's build-time check (runners/check_image.py) on fake wheel names and versions."""

from __future__ import annotations

import sys

import pytest
import torch

from runners import check_image
from runners.check_image import Wheel, major_minor, parse_wheel, version_problems

URL = (
    "https://github.com/nunchaku-tech/nunchaku/releases/download/v1.0.2/"
    "nunchaku-1.0.2+torch2.9-cp312-cp312-linux_x86_64.whl"
)
GOOD = dict(
    torch_version="2.9.0+cu128",
    torchvision_version="0.24.0+cu128",
    python_tag="cp312",
    expected_torch="2.9.0+cu128",
    expected_torchvision="0.24.0+cu128",
    nunchaku_version="1.0.2+torch2.9",
)


def test_wheel_names_parse():
    assert parse_wheel(URL) == Wheel("1.0.2", "2.9", "cp312", "linux_x86_64")
    assert parse_wheel(URL.replace("+", "%2B")) == parse_wheel(URL)  # as browsers and HF links spell it
    assert parse_wheel("nunchaku-1.0.1+torch2.10-cp313-cp313-win_amd64.whl").torch == "2.10"
    assert parse_wheel(URL).local_version == "1.0.2+torch2.9"
    for bad in ("nunchaku-1.0.2-cp312-cp312-linux_x86_64.whl", "nunchaku-0.1.0-py3-none-any.whl", "x.whl"):
        with pytest.raises(ValueError, match="not a Nunchaku release wheel name"):
            parse_wheel(bad)
    assert major_minor("2.9.0+cu128") == "2.9" and major_minor("2.10.1") == "2.10"


def test_the_pinned_set_passes():
    assert version_problems(parse_wheel(URL), **GOOD) == []


def test_torch_replaced_after_the_nunchaku_install_fails():
    # What the old Dockerfile did: torchvision>=0.20 pulled a newer torch over the pinned one.
    problems = version_problems(parse_wheel(URL), **{**GOOD, "torch_version": "2.10.0+cu128"})
    assert any("torch is 2.10.0+cu128, but the image installed 2.9.0+cu128" in p for p in problems)
    assert any("built for torch 2.9" in p for p in problems)
    # Same major.minor but another build (a PyPI/CPU wheel over the cu128 one) is a change too.
    problems = version_problems(parse_wheel(URL), **{**GOOD, "torch_version": "2.9.0"})
    assert len(problems) == 1 and "torch is 2.9.0," in problems[0]


def test_wheel_tag_not_matching_torch_fails():
    wheel = parse_wheel(URL.replace("+torch2.9", "+torch2.8"))
    problems = version_problems(wheel, **{**GOOD, "nunchaku_version": "1.0.2+torch2.8"})
    assert problems == [
        "the Nunchaku wheel is built for torch 2.8 (+torch2.8), but torch 2.9.0+cu128 is installed: "
        "its extension will not load"
    ]


def _problems_with(**changes) -> str:
    return "\n".join(version_problems(parse_wheel(URL), **{**GOOD, **changes}))


def test_other_mismatches_fail():
    assert "torchvision is not installed" in _problems_with(torchvision_version=None)
    assert "torchvision is 0.25.0, but the image installed 0.24.0+cu128" in _problems_with(
        torchvision_version="0.25.0"
    )
    assert "this Python is cp311" in _problems_with(python_tag="cp311")
    assert "installed nunchaku is missing" in _problems_with(nunchaku_version=None)
    assert "installed nunchaku is 1.0.1+torch2.9" in _problems_with(nunchaku_version="1.0.1+torch2.9")


def test_main_fails_when_the_extension_does_not_import(monkeypatch, capsys):
    # The installed torch and Python, so only the import can fail; an unimportable nunchaku stands in for
    # a wheel whose extension does not load.
    from qwen_edit.nunchaku_backend import status

    monkeypatch.setitem(sys.modules, "nunchaku", None)
    monkeypatch.setattr(check_image, "_installed", lambda name: {"nunchaku": "1.0.2+torch9.9"}.get(name))
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    name = f"nunchaku-1.0.2+torch9.9-{python}-{python}-linux_x86_64.whl"
    args = ["--torch", torch.__version__, "--wheel", name]
    status.cache_clear()
    try:
        assert check_image.main(args) == 1
    finally:
        status.cache_clear()
    err = capsys.readouterr().err
    assert "built for torch 9.9" in err and "nunchaku is not installed" in err
    assert "torch is" not in err  # torch itself is the one expected


def test_main_passes_a_consistent_image(monkeypatch, capsys):
    built_for = major_minor(torch.__version__)
    monkeypatch.setattr(check_image, "import_problems", lambda: [])
    monkeypatch.setattr(check_image, "_installed", lambda name: f"1.0.2+torch{built_for}")
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    name = f"nunchaku-1.0.2+torch{built_for}-{python}-{python}-linux_x86_64.whl"
    assert check_image.main(["--torch", torch.__version__, "--wheel", name]) == 0
    assert "consistent, extension imports" in capsys.readouterr().out
    assert check_image.main(["--torch", "0.0.1", "--wheel", name]) == 1


def test_import_problems_are_the_backends_own_verdict(monkeypatch, tmp_path):
    """A broken wheel fails the image check with the same words the library would log at run time."""
    from qwen_edit.nunchaku_backend import status

    package = tmp_path / "nunchaku"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "nunchaku", raising=False)
    status.cache_clear()
    try:
        problems = check_image.import_problems()
    finally:
        status.cache_clear()
    assert len(problems) == 1 and "undefined symbol" in problems[0] and "+torchX.Y" in problems[0]
