"""Quantile-tracking adaptive clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.aggregation.clipping import AdaptiveClip


def test_one_update_step_is_the_geometric_rule():
    clip = AdaptiveClip(bound=1.0, quantile=0.5, learning_rate=0.2)
    clip.update([0.5, 0.8, 3.0, 4.0])  # half fit: the bound stays
    assert clip.bound == pytest.approx(1.0)
    clip.update([0.1, 0.2, 0.3, 5.0])  # 3 of 4 fit: shrink by exp(-0.2 · 0.25)
    assert clip.bound == pytest.approx(math.exp(-0.05))


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.9])
def test_the_bound_converges_to_the_target_quantile_of_the_norms(quantile):
    rng = np.random.default_rng(0)
    clip = AdaptiveClip(bound=100.0, quantile=quantile, learning_rate=0.2)
    for _ in range(400):
        clip.update(list(rng.lognormal(0.0, 0.5, size=20)))
    true = float(np.quantile(rng.lognormal(0.0, 0.5, size=200_000), quantile))
    assert clip.bound == pytest.approx(true, rel=0.15)


def test_updates_above_the_bound_are_scaled_to_it():
    clip = AdaptiveClip(bound=2.0)
    assert clip.factors([1.0, 2.0, 8.0]) == [1.0, 1.0, 0.25]


@pytest.mark.parametrize(("kwargs", "message"), [({"bound": 0.0}, "clip bound"),
                                                 ({"bound": 1.0, "quantile": 1.0}, "quantile"),
                                                 ({"bound": 1.0, "learning_rate": 0.0},
                                                  "learning rate")])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveClip(**kwargs)
