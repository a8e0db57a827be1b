"""FlexLoRA: exact factored aggregate, best rank-r approximation per client."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import aggregate, scale_for_rank

from .helpers import exact_target, random_update, relative_error

SHAPES = {"q": (40, 30), "v": (25, 50)}
MIXED = ((2, 3), (4, 8), (8, 5))


def best_rank_approximation(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_flexlora_global_is_exact_for_mixed_ranks(rng: np.random.Generator) -> None:
    updates = [random_update(rng, r, n, shapes=SHAPES) for r, n in MIXED]

    result = aggregate("flexlora", updates)

    for module in SHAPES:
        assert result.global_factors[module].rank == 14
        assert relative_error(result.effective_delta(module), exact_target(updates, module)) < 1e-5


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
@pytest.mark.parametrize("rslora", [False, True])
def test_flexlora_client_gets_the_best_rank_r_approximation(
    rng: np.random.Generator, rank: int, rslora: bool
) -> None:
    # Prepare
    updates = [random_update(rng, r, n, shapes=SHAPES, rslora=rslora) for r, n in MIXED]

    # Execute
    sent = aggregate("flexlora", updates, rslora=rslora).for_client(rank)

    # Assert
    for module in SHAPES:
        factors = sent[module]
        assert factors.scale == scale_for_rank(rank, 16.0, rslora)
        expected = best_rank_approximation(exact_target(updates, module), rank)
        assert relative_error(factors.delta(), expected) < 1e-5
        # The scale is split evenly, so both factors carry the same energy.
        np.testing.assert_allclose(np.linalg.norm(factors.a), np.linalg.norm(factors.b), rtol=1e-5)


def test_flexlora_pads_a_client_above_the_stacked_rank(rng: np.random.Generator) -> None:
    updates = [random_update(rng, 2, shapes=SHAPES)]

    sent = aggregate("flexlora", updates).for_client(8)

    for module in SHAPES:
        assert sent[module].rank == 8
        assert relative_error(sent[module].delta(), exact_target(updates, module)) < 1e-5
