"""FLoRA: stacked factors as an exact base correction, fresh adapter afterwards."""

from __future__ import annotations

import math

import numpy as np

from fedlora.aggregation import aggregate

from .helpers import SHAPES, exact_target, random_update, relative_error


def test_flora_correction_is_exact_for_mixed_ranks(rng: np.random.Generator) -> None:
    # Prepare
    updates = [random_update(rng, r, n) for r, n in ((2, 3), (4, 8), (8, 5))]

    # Execute
    result = aggregate("flora", updates)

    # Assert
    for module in SHAPES:
        target = exact_target(updates, module)
        correction = result.base_correction[module]
        assert correction.scale == 1.0 and correction.rank == 14
        assert relative_error(correction.delta(), target) < 1e-10
        assert relative_error(result.effective_delta(module), target) < 1e-10


def test_flora_restarts_the_adapter_like_peft(rng: np.random.Generator) -> None:
    updates = [random_update(rng, 2), random_update(rng, 8)]
    result = aggregate("flora", updates, seed=7)

    sent = result.for_client(4)

    for module, (out_features, in_features) in SHAPES.items():
        factors = sent[module]
        assert factors.a.shape == (4, in_features) and factors.b.shape == (out_features, 4)
        assert factors.scale == 4.0
        assert not factors.b.any()
        assert np.abs(factors.a).max() <= 1 / math.sqrt(in_features)
        np.testing.assert_array_equal(factors.a, result.global_factors[module].a[:4])


def test_flora_fresh_init_depends_on_the_seed_and_the_module(rng: np.random.Generator) -> None:
    updates = [random_update(rng, 4)]

    first = aggregate("flora", updates, seed=1).for_client(4)
    again = aggregate("flora", updates, seed=1).for_client(4)
    other = aggregate("flora", updates, seed=2).for_client(4)

    np.testing.assert_array_equal(first["layer.0.query"].a, again["layer.0.query"].a)
    assert not np.array_equal(first["layer.0.query"].a, other["layer.0.query"].a)
    assert not np.array_equal(first["layer.0.query"].a[:, :5], first["layer.0.value"].a[:, :5])
