"""HetLoRA: zero-padding to the largest rank with norm-proportional weights."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import ClientUpdate, aggregate

from .helpers import SHAPES, random_update

RANKS = (2, 4, 8)
COUNTS = (5, 1, 3)


def hand_hetlora(
    updates: list[ClientUpdate], module: str, weight_by_examples: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's rule, written out with explicit loops over entries."""
    out_features, in_features = SHAPES[module]
    r_max, s_g = 8, 16.0 / 8
    raw = []
    for u, n in zip(updates, COUNTS, strict=True):
        f = u.factors[module]
        norm = np.sqrt(np.sum((f.scale * f.b @ f.a) ** 2))
        raw.append(norm * (n if weight_by_examples else 1.0))
    weights = [w / sum(raw) for w in raw]
    a = np.zeros((r_max, in_features))
    b = np.zeros((out_features, r_max))
    for w, u in zip(weights, updates, strict=True):
        f = u.factors[module]
        for i in range(f.rank):
            a[i, :] += w * f.a[i, :]
            b[:, i] += w * (f.scale / s_g) * f.b[:, i]
    return a, b


@pytest.mark.parametrize("weight_by_examples", [False, True])
def test_hetlora_matches_the_hand_computed_rule(
    rng: np.random.Generator, weight_by_examples: bool
) -> None:
    # Prepare
    updates = [random_update(rng, r, n) for r, n in zip(RANKS, COUNTS, strict=True)]

    # Execute
    result = aggregate("hetlora", updates, weight_by_examples=weight_by_examples)

    # Assert
    for module in SHAPES:
        a, b = hand_hetlora(updates, module, weight_by_examples)
        factors = result.global_factors[module]
        assert factors.scale == 2.0
        np.testing.assert_allclose(factors.a, a, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(factors.b, b, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(result.effective_delta(module), 2.0 * b @ a, rtol=1e-10)


def test_hetlora_client_receives_the_prefix_refolded_to_its_scale(rng: np.random.Generator) -> None:
    updates = [random_update(rng, r, n) for r, n in zip(RANKS, COUNTS, strict=True)]
    result = aggregate("hetlora", updates)

    sent = result.for_client(2)

    for module in SHAPES:
        g = result.global_factors[module]
        assert sent[module].scale == 8.0
        np.testing.assert_array_equal(sent[module].a, g.a[:2])
        np.testing.assert_allclose(sent[module].b, g.b[:, :2] * 2.0 / 8.0, rtol=1e-12)


def test_hetlora_falls_back_to_uniform_weights_when_all_updates_are_zero(
    rng: np.random.Generator,
) -> None:
    zero_b = {m: np.zeros((out, 2)) for m, (out, _) in SHAPES.items()}
    updates = [random_update(rng, 2, 1, b=zero_b), random_update(rng, 2, 3, b=zero_b)]

    result = aggregate("hetlora", updates)

    module = "layer.0.query"
    expected = 0.5 * (updates[0].factors[module].a + updates[1].factors[module].a)
    np.testing.assert_allclose(result.global_factors[module].a, expected, rtol=1e-12)
