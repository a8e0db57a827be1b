"""Per-round exactness and rank diagnostics, computed from factors only.

* Relative aggregation error ``‖ΔW* − ΔW_global‖_F / ‖ΔW*‖_F`` with
  ``ΔW* = Σ_k p_k s_k B_k A_k``. The difference is itself a factored matrix,
  ``D = [B_st, −B_eff] @ [A_st; A_eff]``, whose norm satisfies
  ``‖D‖_F² = trace((D_bᵀ D_b)(D_a D_aᵀ))`` (small Gram matrices); it is
  evaluated as the norm of the QR core ``R_b R_aᵀ`` (``D_bᵀD_b = R_bᵀR_b``),
  which gives the same value without squaring away the precision of
  near-zero errors. No ``m × n`` matrix is formed.
* Effective rank (Roy & Vetterli 2007): ``exp(H(σ / Σσ))`` with ``H`` the
  Shannon entropy of the normalised singular values of the module's update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.linalg import (
    factored_frobenius_norm,
    factored_singular_values,
    stack_factors,
)
from fedlora.aggregation.weighting import example_weights


class FactoredResult(Protocol):
    """What the diagnostics read of a :class:`fedlora.aggregation.result.AggregationResult`.

    Structural, so that this module does not import ``result`` (which calls
    :func:`round_diagnostics` from its ``diagnostics`` method).
    """

    @property
    def modules(self) -> Sequence[str]:
        """The adapted modules' names."""
        ...

    def effective_factors(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """``(B_eff (m, R'), A_eff (R', n))`` with ``B_eff @ A_eff`` the module's new update."""
        ...


def aggregation_error(
    updates: Sequence[ClientUpdate], result: FactoredResult, module: str
) -> float:
    """Relative error of the new global update against the exact target.

    Parameters
    ----------
    updates
        The round's updates (weights ``p_k`` come from their ``num_examples``).
    result
        The rule's output for those updates.
    module
        Module name.

    Returns
    -------
    float
        ``‖ΔW* − ΔW_eff‖_F / ‖ΔW*‖_F``; ``0.0`` when both are zero and
        ``inf`` when only ``ΔW*`` is zero.
    """
    weights = example_weights(updates)
    b_star, a_star = stack_factors([u.factors[module] for u in updates], weights)  # (m, R), (R, n)
    b_eff, a_eff = result.effective_factors(module)  # (m, R'), (R', n)
    target = factored_frobenius_norm(b_star, a_star)
    difference = factored_frobenius_norm(
        np.concatenate([b_star, -b_eff], axis=1), np.concatenate([a_star, a_eff], axis=0)
    )
    if target == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / target


def effective_rank(b: np.ndarray, a: np.ndarray) -> float:
    """Roy–Vetterli effective rank of ``b @ a``, from the factors.

    Parameters
    ----------
    b
        Shape ``(m, R)``.
    a
        Shape ``(R, n)``.

    Returns
    -------
    float
        ``exp(-Σ q_i log q_i)`` with ``q = σ / Σσ``; ``0.0`` for a zero matrix.
    """
    sigma = factored_singular_values(b.astype(np.float64), a.astype(np.float64))
    total = float(sigma.sum())
    if total == 0.0:
        return 0.0
    q = sigma[sigma > 0] / total
    return float(np.exp(-np.sum(q * np.log(q))))


def tier_diagnostics(
    view: Callable[[int], Mapping[str, LoraFactors]], ranks: Iterable[int]
) -> dict[str, dict[str, float]]:
    """What each rank tier receives from the global adapter next round.

    Parameters
    ----------
    view
        Maps a client's rank to the factors it loads (``AggregationResult.for_client`` or
        the server's current view).
    ranks
        The tiers (the clients' ranks).

    Returns
    -------
    dict[str, dict[str, float]]
        ``{"tier_effective_rank": {str(r): mean over modules of the effective rank of
        s · B @ A}, "tier_dead_components": {str(r): components, summed over modules, whose
        A row and B column are both zero}}``. A dead component has exactly zero gradients,
        so it is capacity the tier can never train.
    """
    effective: dict[str, float] = {}
    dead: dict[str, float] = {}
    for rank in sorted(set(ranks)):
        factors = view(rank)
        effective[str(rank)] = float(np.mean([
            effective_rank(f.scale * f.b.astype(np.float64), f.a) for f in factors.values()
        ]))
        dead[str(rank)] = float(sum(int((~(f.a.any(axis=1) | f.b.any(axis=0))).sum())
                                    for f in factors.values()))
    return {"tier_effective_rank": effective, "tier_dead_components": dead}


def round_diagnostics(updates: Sequence[ClientUpdate], result: FactoredResult) -> dict[str, Any]:
    """Aggregation error and effective rank of every module.

    Parameters
    ----------
    updates
        The round's updates.
    result
        The rule's output for those updates.

    Returns
    -------
    dict[str, Any]
        ``{"agg_error": {module: float}, "agg_error_mean": float,
        "agg_error_max": float, "effective_rank": {module: float},
        "effective_rank_mean": float}``.
    """
    errors = {m: aggregation_error(updates, result, m) for m in result.modules}
    ranks = {m: effective_rank(*result.effective_factors(m)) for m in result.modules}
    return {
        "agg_error": errors,
        "agg_error_mean": float(np.mean(list(errors.values()))),
        "agg_error_max": float(max(errors.values())),
        "effective_rank": ranks,
        "effective_rank_mean": float(np.mean(list(ranks.values()))),
    }
