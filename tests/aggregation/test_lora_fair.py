"""LoRA-FAIR: FedIT's (Ā, B̄) plus the server's ridge correction ΔB of B̄."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import aggregate, aggregation_error, strategy_info
from fedlora.privacy.secagg import secagg_compatible

from .helpers import SHAPES, exact_target, random_update


def dense_correction(updates, module, lambda_):
    """argmin_X ‖s(B̄+X)Ā − ΔW*‖² + λ‖sX‖², row by row as a stacked least-squares problem."""
    total = sum(u.num_examples for u in updates)
    p = [u.num_examples / total for u in updates]
    s = updates[0].factors[module].scale
    a_bar = sum(w * u.factors[module].a for w, u in zip(p, updates, strict=True))
    b_bar = sum(w * u.factors[module].b for w, u in zip(p, updates, strict=True))
    residual = exact_target(updates, module) / s - b_bar @ a_bar  # (m, n)
    r = a_bar.shape[0]
    design = np.vstack([a_bar.T, np.sqrt(lambda_) * np.eye(r)])  # (n + r, r)
    x = np.stack([np.linalg.lstsq(design, np.concatenate([row, np.zeros(r)]), rcond=None)[0]
                  for row in residual])  # (m, r)
    return a_bar, b_bar, x


@pytest.mark.parametrize("lambda_", [0.0, 0.01, 1.0])
def test_lora_fair_correction_matches_a_dense_least_squares_reference(rng, lambda_):
    updates = [random_update(rng, 3, n) for n in (5, 1, 8, 3)]

    result = aggregate("lora-fair", updates, lambda_=lambda_)

    for module in SHAPES:
        a_bar, b_bar, x = dense_correction(updates, module, lambda_)
        g = result.global_factors[module]
        np.testing.assert_allclose(g.a, a_bar, atol=1e-12)  # Ā kept as it is
        np.testing.assert_allclose(g.b, b_bar + x, atol=1e-9)
        # the clients receive exactly that pair (no extra communication: one rank-r pair)
        sent = result.for_client(3)[module]
        np.testing.assert_allclose(sent.b @ sent.a, (b_bar + x) @ a_bar, atol=1e-9)


def test_lora_fair_aggregation_error_is_below_fedits_on_the_same_inputs(rng):
    for trial in range(20):
        updates = [random_update(rng, 2, int(n)) for n in rng.integers(1, 20, size=5)]
        fair, fedit = aggregate("lora-fair", updates), aggregate("fedit", updates)
        for module in SHAPES:
            assert aggregation_error(updates, fair, module) < \
                aggregation_error(updates, fedit, module), (trial, module)


def test_lora_fair_without_penalty_is_exact_when_the_target_lies_in_the_row_space_of_a_bar(rng):
    # a shared A (up to client-specific invertible mixing): every B_k A_k has rows in span(Ā)
    base = {m: rng.normal(size=(3, n)) for m, (_, n) in SHAPES.items()}
    updates = []
    for n in (2, 6, 3):
        mix = rng.normal(size=(3, 3)) + 3 * np.eye(3)
        updates.append(random_update(rng, 3, n, a={m: mix @ a for m, a in base.items()}))

    result = aggregate("lora-fair", updates, lambda_=0.0)

    for module in SHAPES:
        np.testing.assert_allclose(result.effective_delta(module),
                                   exact_target(updates, module), atol=1e-9)
    fedit = aggregate("fedit", updates)
    assert all(aggregation_error(updates, fedit, m) > 1e-3 for m in SHAPES)  # FedIT is not


def test_lora_fair_refuses_a_negative_penalty_and_mixed_ranks(rng):
    with pytest.raises(ValueError, match="lambda_"):
        aggregate("lora-fair", [random_update(rng, 2)], lambda_=-0.1)
    with pytest.raises(ValueError, match="same LoRA rank"):
        aggregate("lora-fair", [random_update(rng, 2), random_update(rng, 4)])


def test_lora_fair_is_declared_outside_secure_aggregation_and_dp():
    from fedlora.privacy import dp as privacy

    info = strategy_info("lora-fair")
    assert info.equal_ranks and not info.linear and not info.exact
    ok, why = secagg_compatible("lora-fair")
    assert not ok and "A_k" in why
    assert "lora-fair" not in privacy.DP_STRATEGIES
