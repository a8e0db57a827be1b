"""Factored SVD and norms agree with dense numpy."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation.linalg import (
    factored_frobenius_norm,
    factored_singular_values,
    factored_svd,
)


@pytest.mark.parametrize(("m", "n", "r"), [(30, 20, 6), (5, 40, 9), (40, 4, 9)])
def test_factored_svd_matches_dense(rng: np.random.Generator, m: int, n: int, r: int) -> None:
    b, a = rng.normal(size=(m, r)), rng.normal(size=(r, n))
    dense = b @ a

    u, s, vt = factored_svd(b, a)

    k = min(m, n, r)
    assert u.shape == (m, k) and s.shape == (k,) and vt.shape == (k, n)
    np.testing.assert_allclose((u * s) @ vt, dense, atol=1e-10)
    np.testing.assert_allclose(s, np.linalg.svd(dense, compute_uv=False)[:k], rtol=1e-10)
    np.testing.assert_allclose(factored_singular_values(b, a), s, rtol=1e-10)
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-10)


def test_factored_norm_matches_dense_and_resolves_cancellation(rng: np.random.Generator) -> None:
    b, a = rng.normal(size=(50, 5)), rng.normal(size=(5, 60))
    assert factored_frobenius_norm(b, a) == pytest.approx(np.linalg.norm(b @ a), rel=1e-12)

    # b a − b a stacked: the exact answer is 0, the QR core gets to round-off level.
    stacked = factored_frobenius_norm(np.hstack([b, -b]), np.vstack([a, a]))
    assert stacked < 1e-12 * np.linalg.norm(b @ a)
