"""Shared test fixtures: where `../shared` lives, the diffusers line CI asked for, deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
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
