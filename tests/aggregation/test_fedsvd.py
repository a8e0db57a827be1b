"""FedSVD: B averaged under the shared A, then A ← Vᵀ, B ← UΣ of B̄·A_prev (exact)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import UpdateRejected, aggregate, strategy_info

from .helpers import SHAPES, exact_target, random_update, relative_error, shared_a


def dense_reference(updates, module, rank):
    """B̄ A_prev and its rank-r SVD by a dense numpy SVD (independent of the rule's QR path)."""
    total = sum(u.num_examples for u in updates)
    s_g = updates[0].factors[module].scale  # equal ranks, shared alpha: s_k = s_g
    b_mean = sum(u.num_examples / total * u.factors[module].b for u in updates)
    product = b_mean @ updates[0].factors[module].a
    u, s, vt = np.linalg.svd(product)
    return s_g, product, u[:, :rank], s[:rank], vt[:rank]


def test_fedsvd_matches_a_dense_svd_of_the_mean_b_times_the_previous_a(rng):
    a = shared_a(rng, 3)
    updates = [random_update(rng, 3, n, a=a) for n in (4, 9, 2, 6)]

    result = aggregate("fedsvd", updates)

    for module in SHAPES:
        s_g, product, u, s, vt = dense_reference(updates, module, 3)
        g = result.global_factors[module]
        assert g.scale == s_g and g.rank == 3
        # A = Vᵀ: orthonormal rows spanning the top right singular directions
        np.testing.assert_allclose(g.a @ g.a.T, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(np.abs(g.a @ vt.T), np.eye(3), atol=1e-10)  # up to signs
        # B = UΣ: its column norms are the singular values, descending
        np.testing.assert_allclose(np.linalg.norm(g.b, axis=0), s, rtol=1e-10)
        np.testing.assert_allclose(g.b @ g.a, product, atol=1e-12)
        # exact: s_g B_new A_new = Σ p_k s_k B_k A_prev
        assert relative_error(result.effective_delta(module), exact_target(updates, module)) < 1e-12


def test_fedsvd_each_client_gets_the_refactored_pair_and_a_never_has_a_zero_row(rng):
    a = shared_a(rng, 4)
    zero_b = {m: np.zeros((out, 4)) for m, (out, _) in SHAPES.items()}
    updates = [random_update(rng, 4, 5, a=a, b=zero_b) for _ in range(3)]  # B̄ = 0

    result = aggregate("fedsvd", updates)

    for module, f in result.for_client(4).items():
        np.testing.assert_allclose(f.a @ f.a.T, np.eye(4), atol=1e-12)
        np.testing.assert_array_equal(f.b, 0.0)
        # the new rows stay in the row space of the A the clients held
        coef, *_ = np.linalg.lstsq(a[module].T, f.a.T, rcond=None)
        np.testing.assert_allclose(a[module].T @ coef, f.a.T, atol=1e-10)


def test_fedsvd_refuses_a_client_whose_a_moved(rng):
    a = shared_a(rng, 3)
    moved = {m: x + 1e-3 for m, x in a.items()}
    updates = [random_update(rng, 3, a=a), random_update(rng, 3, a=moved, client_id="c2")]
    with pytest.raises(UpdateRejected, match="c2") as info:
        aggregate("fedsvd", updates)
    assert info.value.reason == "FROZEN_FACTOR_MISMATCH"


def test_fedsvd_refuses_mixed_ranks_and_a_rank_above_the_layer(rng):
    updates = [random_update(rng, 2, a=shared_a(rng, 2)), random_update(rng, 3)]
    with pytest.raises(ValueError, match="same LoRA rank"):
        aggregate("fedsvd", updates)
    big = shared_a(rng, 6)  # layer.0.query is 6×5: at most 5 orthonormal rows of length 5
    with pytest.raises(ValueError, match="orthonormal rows"):
        aggregate("fedsvd", [random_update(rng, 6, a=big)])


def test_fedsvd_on_one_update_of_the_mean_is_the_rule_on_the_clients():
    """The secure / DP path hands the rule a single update holding the decoded mean of B:
    the result must be the rule's own result on the individual updates."""
    rng = np.random.default_rng(7)
    a = shared_a(rng, 3)
    updates = [random_update(rng, 3, n, a=a) for n in (3, 5, 8)]
    total = sum(u.num_examples for u in updates)
    mean = random_update(rng, 3, total, a=a, b={
        m: sum(u.num_examples / total * u.factors[m].b for u in updates) for m in SHAPES})

    one, many = aggregate("fedsvd", [mean]), aggregate("fedsvd", updates)

    for module in SHAPES:
        np.testing.assert_allclose(one.effective_delta(module), many.effective_delta(module),
                                   atol=1e-12)
        np.testing.assert_allclose(np.abs(one.global_factors[module].a),
                                   np.abs(many.global_factors[module].a), atol=1e-10)


def test_fedsvd_is_declared_secure_and_dp_compatible_but_not_for_server_optimizers():
    from fedlora.privacy import dp as privacy
    from fedlora.privacy.secagg import secagg_compatible

    info = strategy_info("fedsvd")
    assert info.linear and info.refactors and info.equal_ranks and info.exact
    assert secagg_compatible("fedsvd")[0]
    assert "fedsvd" in privacy.DP_STRATEGIES
