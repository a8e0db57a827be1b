"""FedEx-LoRA: FedIT average plus an exact residual in the base."""

from __future__ import annotations

import numpy as np

from fedlora.aggregation import aggregate

from .helpers import SHAPES, exact_target, random_update, relative_error


def test_fedex_is_exact_and_keeps_the_fedit_adapter(rng: np.random.Generator) -> None:
    # Prepare
    updates = [random_update(rng, 4, n) for n in (2, 3, 9)]

    # Execute
    result = aggregate("fedex", updates)
    fedit = aggregate("fedit", updates)

    # Assert
    for module in SHAPES:
        target = exact_target(updates, module)
        assert relative_error(result.effective_delta(module), target) < 1e-10
        correction = result.base_correction[module]
        assert correction.scale == 1.0 and correction.rank == 4 * 4
        np.testing.assert_allclose(
            correction.delta(), target - fedit.effective_delta(module), rtol=1e-8, atol=1e-12
        )
        np.testing.assert_array_equal(
            result.global_factors[module].a, fedit.global_factors[module].a
        )
        np.testing.assert_array_equal(
            result.for_client(4)[module].b, fedit.global_factors[module].b
        )
