"""LoRA and rsLoRA scales."""

from __future__ import annotations

import math

import pytest

from fedlora.aggregation import scale_for_rank
from fedlora.aggregation.scaling import alpha_from_scale


@pytest.mark.parametrize(
    ("rank", "alpha", "rslora", "expected"),
    [(8, 16.0, False, 2.0), (16, 16.0, False, 1.0), (16, 16.0, True, 4.0), (1, 3.0, True, 3.0)],
)
def test_scale_for_rank(rank: int, alpha: float, rslora: bool, expected: float) -> None:
    assert scale_for_rank(rank, alpha, rslora) == expected


@pytest.mark.parametrize("rslora", [False, True])
def test_alpha_from_scale_inverts_scale_for_rank(rslora: bool) -> None:
    assert math.isclose(alpha_from_scale(scale_for_rank(12, 24.0, rslora), 12, rslora), 24.0)


@pytest.mark.parametrize(
    ("rank", "alpha"), [(0, 16.0), (-1, 16.0), (2.0, 16.0), (True, 16.0), (4, 0.0), (4, math.inf)]
)
def test_scale_for_rank_rejects_bad_arguments(rank: int, alpha: float) -> None:
    with pytest.raises(ValueError):
        scale_for_rank(rank, alpha)
