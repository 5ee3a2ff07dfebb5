"""Shared test fixtures: where `../shared` lives, the diffusers line CI asked for, deterministic torch,
the demo model's files written once per session, and how long a CLI subprocess may take here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# One CPU thread for torch, here and in the CLI processes tests start (QWEN_EDIT_TEST_THREADS to change).
# The models under test are tiny, so a second thread gains little, and on a busy machine it costs a lot:
# torch's OpenMP threads wait for each other at every parallel region, and when another process holds
# one of the cores they wait a scheduler slice each time; on a loaded 2-core machine the CLI tests ran
# 5x slower with 2 threads than with 1 (single edits up to 40x).
TEST_THREADS = os.environ.get("QWEN_EDIT_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = TEST_THREADS
torch.set_num_threads(int(TEST_THREADS))
# The reference data sits beside the checkout (`../shared`); QWEN_EDIT_SHARED overrides it.
SHARED = Path(os.environ.get("QWEN_EDIT_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference data not found at {SHARED}; set QWEN_EDIT_SHARED to the shared/ folder")
    return SHARED


@pytest.fixture(scope="session", autouse=True)
def _expected_diffusers():
    """QWEN_EDIT_EXPECT_DIFFUSERS=0.36 (CI's side-installed line): fail unless that diffusers is imported."""
    expected = os.environ.get("QWEN_EDIT_EXPECT_DIFFUSERS")
    if expected:
        import diffusers

        version = diffusers.__version__
        if version != expected and not version.startswith(expected + "."):
            pytest.exit(
                f"QWEN_EDIT_EXPECT_DIFFUSERS={expected}, but diffusers {version} was imported from "
                f"{diffusers.__file__}",
                returncode=1,
            )


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def qwen_edit_cache(tmp_path_factory) -> Path:
    """A QWEN_EDIT_CACHE root holding the demo model's files, written once for the session: the CLI
    (QWEN_EDIT_CACHE=<this>) and the library (cache_dir=<this>/qwen-edit/demo-v<N>) find them there.
    Tests that write into the demo folder (LoRAs, copies) make their own instead."""
    from qwen_edit.testing.demo import default_cache_dir, demo_files

    root = tmp_path_factory.mktemp("qwen-edit-cache")
    saved = os.environ.get("QWEN_EDIT_CACHE")
    os.environ["QWEN_EDIT_CACHE"] = str(root)
    try:
        demo_files(default_cache_dir())
    finally:
        if saved is None:
            del os.environ["QWEN_EDIT_CACHE"]
        else:
            os.environ["QWEN_EDIT_CACHE"] = saved
    return root


@pytest.fixture(scope="session")
def demo_dir(qwen_edit_cache) -> Path:
    """The demo model's folder (written once per session, see qwen_edit_cache), for `cache_dir=`.
    Read only: a test that writes into a demo folder copies this one first."""
    from qwen_edit.testing.demo import DEMO_VERSION

    return qwen_edit_cache / "qwen-edit" / f"demo-v{DEMO_VERSION}"


@pytest.fixture(scope="session")
def subprocess_timeout() -> float:
    """A hang guard for CLI subprocesses, derived from this machine now rather than fixed: 60 times what
    a Python importing the CLI and the library takes here (the bulk of any CLI subprocess's time), so a
    busy machine that makes every start slower gets a proportionally longer limit."""
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", "import runners.cli.edit, qwen_edit.pipeline"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
        check=True,
        capture_output=True,
    )
    return 60 * (time.monotonic() - start) + 60
