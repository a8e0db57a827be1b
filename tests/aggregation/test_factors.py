"""LoraFactors helpers."""

from __future__ import annotations

import numpy as np

from fedlora.aggregation import LoraFactors


def test_rank_delta_and_astype() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.ones((4, 2), dtype=np.float32)
    factors = LoraFactors(a=a, b=b, scale=0.5)

    converted = factors.astype(np.float64)

    assert factors.rank == 2
    np.testing.assert_array_equal(factors.delta(), 0.5 * b.astype(np.float64) @ a)
    assert factors.delta().dtype == np.float64
    assert converted.a.dtype == np.float64 and converted.a is not a
