"""Linear algebra on factored matrices ``M = B @ A`` without forming ``M``.

With ``B ∈ R^{m×R}`` and ``A ∈ R^{R×n}``, thin QR factorisations
``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` give ``M = Q_b (R_b R_aᵀ) Q_aᵀ`` with
orthonormal ``Q_b``, ``Q_a``. Everything about ``M`` that is invariant under
orthogonal transforms (Frobenius norm, singular values) is read off the small
core ``R_b R_aᵀ`` at cost ``O((m + n) R² + R³)`` instead of ``O(m n R)``
memory and ``O(m n min(m, n))`` time for a dense SVD.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.aggregation.factors import LoraFactors


def stack_factors(
    factors: Sequence[LoraFactors], weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Stack client factors so that their product is ``Σ_k w_k s_k B_k A_k``.

    Parameters
    ----------
    factors
        One module's factors, one per client; ranks may differ.
    weights
        ``w_k``, shape ``(K,)``.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``B = [w_1 s_1 B_1, …, w_K s_K B_K]`` of shape ``(m, R)`` and
        ``A = [A_1; …; A_K]`` of shape ``(R, n)``, ``R = Σ r_k``, float64.
    """
    b = np.concatenate(
        [w * f.scale * f.b.astype(np.float64) for w, f in zip(weights, factors, strict=True)],
        axis=1,
    )  # (m, R)
    a = np.concatenate([f.a.astype(np.float64) for f in factors], axis=0)  # (R, n)
    return b, a


def factored_core(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal bases and core of ``b @ a``.

    Parameters
    ----------
    b
        Shape ``(m, R)``.
    a
        Shape ``(R, n)``.

    Returns
    -------
    tuple[np.ndarray, np.ndarray, np.ndarray]
        ``q_b`` ``(m, k_b)``, ``core`` ``(k_b, k_a)`` and ``q_a`` ``(n, k_a)``
        with ``b @ a == q_b @ core @ q_a.T``, ``k_b = min(m, R)``,
        ``k_a = min(n, R)``.
    """
    q_b, r_b = np.linalg.qr(b)  # (m, k_b), (k_b, R)
    q_a, r_a = np.linalg.qr(a.T)  # (n, k_a), (k_a, R)
    return q_b, r_b @ r_a.T, q_a


def factored_svd(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of ``b @ a`` computed from the factors.

    Parameters
    ----------
    b
        Shape ``(m, R)``.
    a
        Shape ``(R, n)``.

    Returns
    -------
    tuple[np.ndarray, np.ndarray, np.ndarray]
        ``u`` ``(m, k)``, ``s`` ``(k,)`` descending, ``vt`` ``(k, n)`` with
        ``k = min(m, n, R)`` and ``b @ a == u @ diag(s) @ vt``.
    """
    q_b, core, q_a = factored_core(b, a)
    u_core, s, vt_core = np.linalg.svd(core, full_matrices=False)  # k × k core
    return q_b @ u_core, s, vt_core @ q_a.T


def factored_singular_values(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Singular values of ``b @ a`` (descending), shape ``(min(m, n, R),)``."""
    r_b = np.linalg.qr(b, mode="r")  # (k_b, R)
    r_a = np.linalg.qr(a.T, mode="r")  # (k_a, R)
    return np.linalg.svd(r_b @ r_a.T, compute_uv=False)


def factored_frobenius_norm(b: np.ndarray, a: np.ndarray) -> float:
    """``‖b @ a‖_F`` from the factors.

    Equal to ``sqrt(trace((bᵀb)(a aᵀ)))`` — the Gram-matrix identity — but
    evaluated as ``‖R_b R_aᵀ‖_F`` so that a nearly cancelling difference
    (e.g. an exact rule's error) is not swamped by squaring.
    """
    r_b = np.linalg.qr(b, mode="r")  # (k_b, R)
    r_a = np.linalg.qr(a.T, mode="r")  # (k_a, R)
    return float(np.linalg.norm(r_b @ r_a.T))
