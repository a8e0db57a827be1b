"""FFA-LoRA: shared frozen A, averaged B, exact."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import UpdateRejected, aggregate

from .helpers import SHAPES, exact_target, random_update, relative_error, shared_a


def test_ffa_is_exact_with_a_shared_a(rng: np.random.Generator) -> None:
    # Prepare
    a = shared_a(rng, 4)
    updates = [random_update(rng, 4, n, a=a) for n in (2, 7, 11)]

    # Execute
    result = aggregate("ffa", updates)

    # Assert
    for module in SHAPES:
        assert relative_error(result.effective_delta(module), exact_target(updates, module)) < 1e-10
        np.testing.assert_array_equal(result.global_factors[module].a, a[module])


def test_ffa_rejects_a_client_whose_a_moved(rng: np.random.Generator) -> None:
    # Prepare
    a = shared_a(rng, 4)
    moved = {m: x + 1e-3 for m, x in a.items()}
    updates = [random_update(rng, 4, a=a), random_update(rng, 4, a=moved, client_id="c2")]

    # Execute / Assert
    with pytest.raises(UpdateRejected, match="c2") as info:
        aggregate("ffa", updates)
    assert info.value.reason == "FROZEN_FACTOR_MISMATCH"


def test_ffa_tolerance_is_an_option(rng: np.random.Generator) -> None:
    a = shared_a(rng, 4)
    nudged = {m: x * (1 + 1e-4) for m, x in a.items()}
    updates = [random_update(rng, 4, a=a), random_update(rng, 4, a=nudged)]

    aggregate("ffa", updates, frozen_rtol=1e-3)
    with pytest.raises(ValueError, match="frozen_rtol"):
        aggregate("ffa", updates, frozen_rtol=-1.0)
