"""AggregationResult: effective factors, client views, immutability."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import AggregationResult, LoraFactors, aggregate

from .helpers import random_update


def test_effective_factors_put_the_correction_first_and_fold_scales(
    rng: np.random.Generator,
) -> None:
    updates = [random_update(rng, 4), random_update(rng, 4)]
    result = aggregate("fedex", updates)
    module = "layer.0.query"

    b, a = result.effective_factors(module)

    correction, g = result.base_correction[module], result.global_factors[module]
    assert b.shape == (6, correction.rank + g.rank) and a.shape == (correction.rank + g.rank, 5)
    np.testing.assert_allclose(b[:, correction.rank :], g.scale * g.b, rtol=1e-12)
    np.testing.assert_allclose(b @ a, result.effective_delta(module))


def test_result_mappings_are_read_only(rng: np.random.Generator) -> None:
    result = aggregate("fedit", [random_update(rng, 4)])

    with pytest.raises(TypeError):
        result.global_factors["x"] = result.global_factors["layer.0.query"]  # type: ignore[index]


@pytest.mark.parametrize("rank", [0, -2, 2.5, True])
def test_for_client_rejects_non_positive_integer_ranks(
    rng: np.random.Generator, rank: object
) -> None:
    result = aggregate("flexlora", [random_update(rng, 4)])

    with pytest.raises(ValueError, match="positive integer"):
        result.for_client(rank)  # type: ignore[arg-type]


def test_unknown_module_lists_the_known_ones(rng: np.random.Generator) -> None:
    result = aggregate("flexlora", [random_update(rng, 4)])

    with pytest.raises(KeyError, match="layer.0.query"):
        result.effective_delta("nope")


def test_correction_must_name_known_modules() -> None:
    factors = LoraFactors(a=np.zeros((1, 2)), b=np.zeros((2, 1)), scale=1.0)

    with pytest.raises(ValueError, match="without global factors"):
        AggregationResult("x", {"q": factors}, {"k": factors}, 16.0, False, lambda rank: {})
