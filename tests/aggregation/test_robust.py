"""Robust aggregation: coordinate-wise median / trimmed mean of ΔW, norm clipping."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import ClientUpdate, LoraFactors, aggregate
from fedlora.aggregation.robust import clip_norms, reduce

from .helpers import random_update

SHAPES = {"q": (12, 10), "v": (8, 9)}


def rank_one(value: float, examples: int = 10) -> ClientUpdate:
    """ΔW = [[value, 0], [0, 0]] with scale 1 (alpha = r = 1)."""
    return ClientUpdate({"m": LoraFactors(a=np.array([[1.0, 0.0]]),
                                          b=np.array([[value], [0.0]]), scale=1.0)}, examples)


def test_median_ignores_one_wild_client_that_dominates_the_mean():
    updates = [rank_one(1.0), rank_one(1.2), rank_one(1000.0, examples=10**6)]
    median = aggregate("robust", updates, lora_alpha=1.0).effective_delta("m")
    np.testing.assert_allclose(median, [[1.2, 0.0], [0.0, 0.0]], atol=1e-9)
    mean = aggregate("fedit", updates, lora_alpha=1.0).effective_delta("m")
    assert mean[0, 0] > 900  # the example-weighted factor mean follows the wild client


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    stack = np.array([[1.0, -5.0], [2.0, 0.0], [3.0, 1.0], [100.0, 2.0]])
    np.testing.assert_allclose(reduce(stack, "trimmed-mean", 0.25), [2.5, 0.5])
    np.testing.assert_allclose(reduce(stack, "median", 0.0), [2.5, 0.5])
    np.testing.assert_allclose(reduce(stack, "mean", 0.0), [26.5, -0.5])
    with pytest.raises(ValueError, match="removes every one"):
        reduce(stack, "trimmed-mean", 0.5)
    with pytest.raises(ValueError, match="needs at least 3 clients"):
        reduce(stack[:2], "trimmed-mean", 0.25)


def test_clipping_bounds_each_update_by_a_multiple_of_the_median_norm():
    factors = clip_norms(np.array([1.0, 1.2, 1000.0]), multiplier=2.0)
    np.testing.assert_allclose(factors, [1.0, 1.0, 2.4 / 1000.0])
    assert np.all(clip_norms(np.array([1.0, 5.0]), 0.0) == 1.0)
    updates = [rank_one(1.0), rank_one(1.2), rank_one(1000.0)]
    nothing = {"m": LoraFactors(a=np.zeros((1, 2)), b=np.zeros((2, 1)), scale=1.0)}
    clipped_mean = aggregate("robust", updates, lora_alpha=1.0, reducer="mean",
                             clip_multiplier=2.0, received=[nothing] * 3).effective_delta("m")
    assert clipped_mean[0, 0] == pytest.approx((1.0 + 1.2 + 2.4) / 3)


def test_mixed_ranks_get_the_best_approximation_of_the_robust_delta(rng):
    updates = [random_update(rng, r, n, shapes=SHAPES) for r, n in ((2, 5), (4, 8), (8, 3))]
    result = aggregate("robust", updates, reducer="mean")
    dense = {m: np.mean([u.factors[m].scale * u.factors[m].b @ u.factors[m].a for u in updates],
                        axis=0) for m in SHAPES}
    for module in SHAPES:  # the unweighted mean of ΔW, exactly
        np.testing.assert_allclose(result.effective_delta(module), dense[module], atol=1e-5)
    for rank in (2, 4, 8):
        sent = result.for_client(rank)
        for module, f in sent.items():
            assert f.a.shape == (rank, SHAPES[module][1]) and f.b.shape == (SHAPES[module][0],
                                                                            rank)
            u, s, vt = np.linalg.svd(dense[module])
            best = (u[:, :rank] * s[:rank]) @ vt[:rank]
            np.testing.assert_allclose(f.scale * f.b @ f.a, best, atol=1e-4)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="reducer must be one of"):
        aggregate("robust", [rank_one(1.0)], lora_alpha=1.0, reducer="mode")
    with pytest.raises(ValueError, match="trim must be in"):
        aggregate("robust", [rank_one(1.0)], lora_alpha=1.0, trim=0.5)
