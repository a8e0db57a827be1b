"""Client weights and weighted means (FedAvg, McMahan et al. 2017).

Sums accumulate in float64 in the order given, so results depend only on the
caller's (sorted) order, not on arrival order; outputs are cast back to the
inputs' floating dtype (at least float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.aggregation.factors import ClientUpdate, LoraFactors


def example_weights(updates: Sequence[ClientUpdate]) -> np.ndarray:
    """``p_k = n_k / Σ n``, shape ``(K,)``, float64.

    Integer counts are divided exactly once, so scaling every ``n_k`` by the
    same integer yields bit-identical weights.
    """
    counts = [int(u.num_examples) for u in updates]
    total = sum(counts)
    return np.array([n / total for n in counts], dtype=np.float64)


def output_dtype(arrays: Sequence[np.ndarray]) -> np.dtype:
    """Floating dtype of aggregated outputs: the inputs' promoted dtype, at least float32."""
    return np.result_type(*(x.dtype for x in arrays), np.float32)


def weighted_sum(arrays: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``Σ_k w_k x_k`` in float64, accumulated in the given order (weights not normalised)."""
    total = np.zeros(arrays[0].shape, dtype=np.float64)
    for w, x in zip(weights, arrays, strict=True):
        total += w * x.astype(np.float64)
    return total


def weighted_mean(
    arrays: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Weighted mean of same-shape arrays, e.g. a classifier head kept out of LoRA.

    Parameters
    ----------
    arrays
        Floating arrays of identical shape (never broadcast).
    weights
        Non-negative finite weights (e.g. ``num_examples``), not all zero;
        normalised to sum 1.

    Returns
    -------
    np.ndarray
        ``Σ w_k x_k / Σ w_k`` with the inputs' dtype (at least float32).
    """
    if len(arrays) == 0:
        raise ValueError("weighted_mean needs at least one array, got none")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(arrays),):
        raise ValueError(
            f"expected one weight per array ({len(arrays)}), got weights of shape {w.shape}"
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    shape = arrays[0].shape
    for i, x in enumerate(arrays):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"array {i} must be floating, got {x.dtype}; cast it to float32")
        if x.shape != shape:
            raise ValueError(
                f"array {i} has shape {x.shape}, expected {shape} like array 0; "
                "arrays are never broadcast"
            )
    return (weighted_sum(arrays, w / w.sum())).astype(output_dtype(arrays))


def mean_factors(factors: Sequence[LoraFactors], weights: np.ndarray, scale: float) -> LoraFactors:
    """Separate weighted means of A and B, with scales folded into B.

    ``Ā = Σ w_k A_k`` and ``B̄ = Σ w_k (s_k / scale) B_k`` so that
    ``scale · B̄`` is the weighted mean of the clients' ``s_k B_k``. All ranks
    must be equal.

    Parameters
    ----------
    factors
        One module's factors, one per client.
    weights
        ``w_k``, shape ``(K,)``, summing to 1.
    scale
        Scale of the returned factors (the global scale for this rank).

    Returns
    -------
    LoraFactors
        float64 factors of the common rank with the given ``scale``.
    """
    a = weighted_sum([f.a for f in factors], weights)  # (r, n)
    b = weighted_sum([f.b for f in factors], folded_weights(factors, weights, scale))  # (m, r)
    return LoraFactors(a=a, b=b, scale=scale)


def folded_weights(factors: Sequence[LoraFactors], weights: np.ndarray, scale: float) -> np.ndarray:
    """``w_k s_k / scale``: weights that move each client's scale into the averaged factor.

    With these, ``scale · Σ_k (w_k s_k / scale) X_k = Σ_k w_k s_k X_k`` for the
    trained factor ``X``; the ratio is exactly 1 when a client's scale equals
    the global one.
    """
    return np.array([w * f.scale / scale for w, f in zip(weights, factors, strict=True)])


def cap_weights(counts: Sequence[int], fraction: float, resolution: int = 10**9) -> list[int]:
    """Example counts with no client's share of the total above ``fraction``.

    Water-filling: the largest counts are lowered to one common cap ``c`` with
    ``c = fraction · Σ_{uncapped} n / (1 − k · fraction)`` for the ``k`` capped clients, the
    least change to the counts that gives every capped client the share ``fraction`` exactly
    and leaves the others' ratios as they were. Deviations: when ``fraction < 1/K`` no such
    cap exists and every client gets the same weight (share ``1/K``, the nearest); and as
    :class:`ClientUpdate` weights are integers, capped counts are rescaled to integers of
    about ``resolution`` (shares exact to ~1/``resolution``). Counts already within the cap
    are returned unchanged (the same list of ints).
    """
    n = [int(c) for c in counts]
    if not n or fraction >= 1 or max(n) <= fraction * sum(n):
        return n
    order = sorted(n, reverse=True)
    capped: list[float] | None = None
    for k in range(1, len(order)):
        if k * fraction >= 1:
            break
        cap = fraction * sum(order[k:]) / (1 - k * fraction)
        if order[k] <= cap:
            capped = [min(float(c), cap) for c in n]
            break
    if capped is None:  # fraction < 1/K: equal weights are as close as the cap allows
        return [1] * len(n)
    unit = max(capped) / resolution
    return [max(1, round(c / unit)) for c in capped]
