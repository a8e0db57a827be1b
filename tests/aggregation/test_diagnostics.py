"""Factored diagnostics agree with dense computations."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import (
    AggregationResult,
    ClientUpdate,
    LoraFactors,
    aggregate,
    aggregation_error,
    effective_rank,
)

from .helpers import SHAPES, exact_target, random_update, relative_error


@pytest.mark.parametrize(
    ("name", "ranks"), [("fedit", (4, 4, 4)), ("hetlora", (2, 4, 8)), ("flexlora", (2, 4, 8))]
)
def test_factored_error_equals_dense_and_gram_formulas(
    rng: np.random.Generator, name: str, ranks: tuple[int, ...]
) -> None:
    # Prepare
    updates = [random_update(rng, r, n) for r, n in zip(ranks, (2, 5, 3), strict=True)]
    result = aggregate(name, updates)

    for module in SHAPES:
        # Execute
        error = aggregation_error(updates, result, module)

        # Assert
        target = exact_target(updates, module)
        dense = np.linalg.norm(target - result.effective_delta(module)) / np.linalg.norm(target)
        p = np.array([2, 5, 3]) / 10
        b_st = np.hstack(
            [
                pk * u.factors[module].scale * u.factors[module].b
                for pk, u in zip(p, updates, strict=True)
            ]
        )
        a_st = np.vstack([u.factors[module].a for u in updates])
        b_eff, a_eff = result.effective_factors(module)
        d_b, d_a = np.hstack([b_st, -b_eff]), np.vstack([a_st, a_eff])
        # The Gram identity squares the error: for exact rules it cancels to ±1e-16 · ‖ΔW*‖².
        squared = max(float(np.trace((d_b.T @ d_b) @ (d_a @ d_a.T))), 0.0)
        gram = np.sqrt(squared) / np.linalg.norm(target)
        assert error == pytest.approx(dense, rel=1e-8, abs=1e-12)
        assert error == pytest.approx(gram, rel=1e-6, abs=1e-7)


def test_round_diagnostics_summarise_every_module(rng: np.random.Generator) -> None:
    updates = [random_update(rng, 4, n) for n in (1, 2)]
    result = aggregate("fedit", updates)

    report = result.diagnostics(updates)

    assert set(report["agg_error"]) == set(SHAPES) == set(report["effective_rank"])
    assert report["agg_error_max"] == max(report["agg_error"].values())
    assert report["agg_error_mean"] == pytest.approx(np.mean(list(report["agg_error"].values())))
    for module in SHAPES:
        assert report["agg_error"][module] == pytest.approx(
            relative_error(result.effective_delta(module), exact_target(updates, module))
        )
    assert 1.0 <= report["effective_rank_mean"] <= 4.0


def test_effective_rank_of_rank_one_and_orthogonal_updates(rng: np.random.Generator) -> None:
    u, v = rng.normal(size=(30, 1)), rng.normal(size=(1, 20))
    q_b = np.linalg.qr(rng.normal(size=(30, 6)))[0]
    q_a = np.linalg.qr(rng.normal(size=(20, 6)))[0].T

    assert effective_rank(u, v) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(np.hstack([u, 2 * u]), np.vstack([v, v])) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(3.0 * q_b, q_a) == pytest.approx(6.0, rel=1e-9)
    assert effective_rank(np.zeros((30, 2)), q_a[:2]) == 0.0


def test_zero_target_gives_zero_error_or_infinity() -> None:
    zero = LoraFactors(a=np.ones((2, 3)), b=np.zeros((4, 2)), scale=2.0)
    some = LoraFactors(a=np.ones((2, 3)), b=np.ones((4, 2)), scale=2.0)
    updates = [ClientUpdate({"q": zero}, 1), ClientUpdate({"q": zero}, 2)]

    assert aggregation_error(updates, aggregate("fedit", updates), "q") == 0.0
    moved = AggregationResult("x", {"q": some}, {}, 4.0, False, lambda rank: {})
    assert aggregation_error(updates, moved, "q") == float("inf")
