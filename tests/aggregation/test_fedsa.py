"""FedSA-LoRA: shared mean A, reference mean B."""

from __future__ import annotations

import numpy as np

from fedlora.aggregation import aggregate

from .helpers import SHAPES, random_update


def test_fedsa_shares_mean_a_and_uses_mean_b_as_reference(rng: np.random.Generator) -> None:
    # Prepare
    updates = [random_update(rng, 4, 1), random_update(rng, 4, 3)]

    # Execute
    result = aggregate("fedsa", updates)
    sent = result.for_client(4)

    # Assert
    for module in SHAPES:
        a_bar = 0.25 * updates[0].factors[module].a + 0.75 * updates[1].factors[module].a
        b_bar = 0.25 * updates[0].factors[module].b + 0.75 * updates[1].factors[module].b
        np.testing.assert_allclose(result.global_factors[module].a, a_bar, rtol=1e-6)
        np.testing.assert_allclose(result.effective_delta(module), 4.0 * b_bar @ a_bar, rtol=1e-6)
        np.testing.assert_array_equal(sent[module].a, result.global_factors[module].a)
        np.testing.assert_array_equal(sent[module].b, result.global_factors[module].b)
