"""FedIT: separate means of A and B, not exact."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import aggregate

from .helpers import SHAPES, exact_target, random_update, relative_error


def test_fedit_averages_each_factor_and_misses_the_cross_terms(rng: np.random.Generator) -> None:
    # Prepare
    counts = (3, 5, 9)
    updates = [random_update(rng, 4, n) for n in counts]
    p = np.array(counts) / sum(counts)

    # Execute
    result = aggregate("fedit", updates)

    # Assert
    for module in SHAPES:
        a_bar = sum(pk * u.factors[module].a for pk, u in zip(p, updates, strict=True))
        b_bar = sum(pk * u.factors[module].b for pk, u in zip(p, updates, strict=True))
        np.testing.assert_allclose(result.effective_delta(module), 4.0 * b_bar @ a_bar, rtol=1e-6)
        assert relative_error(result.effective_delta(module), exact_target(updates, module)) > 0.1
    assert result.base_correction == {}
    assert result.global_factors["layer.0.query"].scale == 4.0


def test_fedit_folds_client_scales_into_b(rng: np.random.Generator) -> None:
    # Prepare: same rank, different lora_alpha on the second client.
    updates = [random_update(rng, 4, alpha=16.0), random_update(rng, 4, alpha=32.0)]

    # Execute
    result = aggregate("fedit", updates, lora_alpha=16.0)

    # Assert: scale · B̄ is the mean of the clients' s_k B_k.
    module = "layer.0.value"
    factors = result.global_factors[module]
    expected = 0.5 * (4.0 * updates[0].factors[module].b + 8.0 * updates[1].factors[module].b)
    np.testing.assert_allclose(factors.scale * factors.b, expected, rtol=1e-6)


def test_fedit_rejects_mixed_ranks_and_names_the_mixed_rank_rules(rng: np.random.Generator) -> None:
    updates = [random_update(rng, 2), random_update(rng, 4)]

    with pytest.raises(ValueError, match="same LoRA rank") as info:
        aggregate("fedit", updates)

    for name in ("flexlora", "flora", "hetlora"):
        assert name in str(info.value)


def test_fedit_for_client_refuses_another_rank(rng: np.random.Generator) -> None:
    result = aggregate("fedit", [random_update(rng, 4), random_update(rng, 4)])

    with pytest.raises(ValueError, match="r=4"):
        result.for_client(8)
