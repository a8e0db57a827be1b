"""Example weights and weighted means."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import ClientUpdate, weighted_mean
from fedlora.aggregation.weighting import example_weights


def test_weighted_mean_normalises_the_weights_and_keeps_float32() -> None:
    arrays = [np.full((2, 3), 1.0, np.float32), np.full((2, 3), 4.0, np.float32)]

    mean = weighted_mean(arrays, [2, 1])

    assert mean.dtype == np.float32
    np.testing.assert_array_equal(mean, np.full((2, 3), 2.0, np.float32))


@pytest.mark.parametrize(
    ("arrays", "weights", "match"),
    [
        ([], [], "at least one"),
        ([np.zeros(3), np.zeros(3)], [1.0], "one weight per array"),
        ([np.zeros(3), np.zeros(3)], [0.0, 0.0], "not all zero"),
        ([np.zeros(3), np.zeros(3)], [1.0, -1.0], "non-negative"),
        ([np.zeros(3), np.zeros(3)], [1.0, np.nan], "finite"),
        ([np.zeros(3), np.zeros((1, 3))], [1.0, 1.0], "never broadcast"),
        ([np.zeros(3, dtype=int)], [1.0], "floating"),
    ],
)
def test_weighted_mean_rejects_bad_input(
    arrays: list[np.ndarray], weights: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_mean(arrays, weights)


def test_example_weights_are_bit_identical_under_integer_scaling() -> None:
    counts = [3, 7, 11, 1000003]
    updates = [ClientUpdate({}, n) for n in counts]
    scaled = [ClientUpdate({}, 7 * n) for n in counts]

    np.testing.assert_array_equal(example_weights(updates), example_weights(scaled))
    assert example_weights(updates).sum() == pytest.approx(1.0)
