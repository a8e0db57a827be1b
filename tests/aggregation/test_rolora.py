"""RoLoRA: alternating phases, exact per round."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import UpdateRejected, aggregate

from .helpers import SHAPES, exact_target, random_update, relative_error, shared_a


def test_rolora_phase_b_averages_b_under_a_frozen_a(rng: np.random.Generator) -> None:
    a = shared_a(rng, 4)
    updates = [random_update(rng, 4, n, a=a) for n in (4, 6)]

    result = aggregate("rolora", updates, phase="b")

    for module in SHAPES:
        np.testing.assert_array_equal(result.global_factors[module].a, a[module])
        assert relative_error(result.effective_delta(module), exact_target(updates, module)) < 1e-10


def test_rolora_phase_a_averages_a_under_a_frozen_b(rng: np.random.Generator) -> None:
    b = {m: rng.normal(size=(out, 4)) for m, (out, _) in SHAPES.items()}
    updates = [random_update(rng, 4, n, b=b) for n in (4, 6)]

    result = aggregate("rolora", updates, phase="a")

    for module in SHAPES:
        np.testing.assert_array_equal(result.global_factors[module].b, b[module])
        assert relative_error(result.effective_delta(module), exact_target(updates, module)) < 1e-10


def test_rolora_wrong_phase_is_caught_by_the_frozen_check(rng: np.random.Generator) -> None:
    a = shared_a(rng, 4)
    updates = [random_update(rng, 4, a=a), random_update(rng, 4, a=a)]

    with pytest.raises(UpdateRejected) as info:
        aggregate("rolora", updates, phase="a")
    assert info.value.reason == "FROZEN_FACTOR_MISMATCH"


def test_rolora_rejects_unknown_phase(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="'a' or 'b'"):
        aggregate("rolora", [random_update(rng, 4)], phase="ab")
