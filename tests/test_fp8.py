"""fp8.fast_accumulation: the one process-wide switch of the fp8 GEMMs, always put back (the GEMM side is
checked on a GPU in test_gpu.py)."""

from __future__ import annotations

import pytest

from qwen_edit import fp8


def test_fast_accumulation_is_restored_on_leaving_whatever_happens():
    assert fp8._FAST_ACCUMULATION is True  # the default
    with fp8.fast_accumulation(False):
        assert fp8._FAST_ACCUMULATION is False
        with fp8.fast_accumulation(True):
            assert fp8._FAST_ACCUMULATION is True
        assert fp8._FAST_ACCUMULATION is False
    assert fp8._FAST_ACCUMULATION is True
    with pytest.raises(RuntimeError, match="inside"), fp8.fast_accumulation(False):
        raise RuntimeError("inside")
    assert fp8._FAST_ACCUMULATION is True
