"""Nunchaku SVDQuant checkpoints: layouts (layout.py), files (checkpoint.py), layers (layers.py).

Writing such files (tests, benchmarks, the demo) is qwen_edit.testing.transformer's job.
"""

from .checkpoint import SVDQCheckpoint, expected_tensors, read_checkpoint
from .layers import AWQLinear, DequantizedLinear, SVDQLinear, awq_dense, svdq_dense

__all__ = [
    "AWQLinear",
    "DequantizedLinear",
    "SVDQCheckpoint",
    "SVDQLinear",
    "awq_dense",
    "expected_tensors",
    "read_checkpoint",
    "svdq_dense",
]
