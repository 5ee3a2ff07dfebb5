"""Nunchaku SVDQuant checkpoints: layouts (layout.py), files (checkpoint.py), layers (layers.py), writer
(quantize.py)."""

from .checkpoint import SVDQCheckpoint, expected_tensors, read_checkpoint
from .layers import AWQLinear, DequantizedLinear, SVDQLinear, awq_dense, svdq_dense
from .quantize import quantize_awq_linear, quantize_svdq_linear, quantize_transformer, write_random_checkpoint

__all__ = [
    "AWQLinear",
    "DequantizedLinear",
    "SVDQCheckpoint",
    "SVDQLinear",
    "awq_dense",
    "expected_tensors",
    "quantize_awq_linear",
    "quantize_svdq_linear",
    "quantize_transformer",
    "read_checkpoint",
    "svdq_dense",
    "write_random_checkpoint",
]
