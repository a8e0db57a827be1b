"""LoRA-FAIR: FedIT's means plus a server-side correction of B
(Bian, Wang, Zhang and Xu, ICCV 2025, arXiv 2411.14961).

FedIT's ``s_g B̄ Ā`` misses the ideal update ``ΔW* = Σ_k p_k s_k B_k A_k`` (the cross terms
``B_j A_k``). LoRA-FAIR keeps ``Ā`` and ``B̄`` and adds a residual correction ``ΔB`` found on
the server, so that the corrected ``(B̄ + ΔB) Ā`` is as close to ``ΔW*`` as a rank-r
product with the averaged ``Ā`` can be, while ``ΔB`` stays small; clients then start the next
round from ``(Ā, B̄ + ΔB)`` (the paper's "Avg-Initial": the global adapter, not a fresh one).
Nothing extra travels: clients send and receive one rank-r pair, as in FedIT::

    Ā = Σ_k p_k A_k,   B̄ = Σ_k p_k (s_k / s_g) B_k                  # (r, n), (m, r)
    ΔB = argmin_X  ‖s_g (B̄ + X) Ā − ΔW*‖_F² + λ ‖s_g X‖_F²
       = (T − B̄ G) (G + λ I)⁻¹                                       # (m, r)
         G = Ā Āᵀ                                                    # (r, r)
         T = ΔW* Āᵀ / s_g = Σ_k p_k (s_k / s_g) B_k (A_k Āᵀ)          # (m, r), no dense ΔW*
    global = (Ā, B̄ + ΔB, s_g)

``T`` and ``G`` are built from the factors at cost ``O(K r n + K m r²)``; the solve is
``r × r``. With ``λ > 0`` the system is positive definite; with ``λ = 0`` it is solved in the
least-squares sense (``ΔB = (T − B̄G) G⁺``), the projection of ``ΔW*`` onto the row space of
``Ā``. Because ``X = 0`` is feasible, the corrected error never exceeds FedIT's; it is zero
only when ``ΔW*`` lies in the row space of ``Ā`` and ``λ = 0`` (not exact in general). All
clients must share one rank.

Deviations from the paper. Its method section could not be retrieved with this project's
tools (arXiv 2411.14961: only the abstract and the first page). What follows is from a
third-party summary of the full paper (en.papernotes.org, "LoRA-FAIR", ICCV 2025), which
states the paper's objective as ``argmin_ΔB S(ΔW*, (B̄ + ΔB) Ā) + λ ‖ΔB‖`` with ``S`` the
cosine similarity, solved on the server by SGD ("Eq. 8"), ``λ = 0.01`` by default, and an
ablation in which ``λ = 0`` is worse (73.22 against 77.07 on DomainNet) although it aligns
the product best:

* **the similarity**: the paper (so summarised) matches the *direction* of ``ΔW*``
  (cosine, scale-free); this rule matches ``ΔW*`` itself (squared Frobenius distance,
  with the squared penalty ``λ ‖s_g ΔB‖²``), which has the closed form above: no SGD, no
  step size or iteration count to choose (the paper's are not known here). The issue that
  asked for this rule (#20) specified the Frobenius objective. A cosine variant was not
  implemented because its SGD settings could not be checked;
* **λ**: ``lambda_`` defaults to 0.01 (config ``lora-fair-lambda``) like the paper's, but
  it weighs a different penalty (squared, on ``s_g ΔB``, relative to ``Ā Āᵀ``, whose
  diagonal is about 1/3 for PEFT's default init), so the two 0.01 are not the same
  strength;
* not available under secure aggregation or DP: ``T`` needs each client's ``A_k`` next to
  its own ``B_k``, which a sum of uploads hides.

What the summary states and this rule follows: ``Ā`` and ``B̄`` are FedIT's weighted
means; only B is corrected (the paper's ablation: correcting A, or both, is worse); clients
start the next round from ``(Ā, B̄ + ΔB)`` ("Avg-Initial"); nothing extra is communicated;
all clients share one rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.registry import register
from fedlora.aggregation.result import AggregationResult, same_rank_result
from fedlora.aggregation.validation import check_tolerance
from fedlora.aggregation.weighting import folded_weights, mean_factors


@register("lora-fair", equal_ranks=True, exact=False, linear=False, modifies_base=False)
def lora_fair(
    updates: Sequence[ClientUpdate], context: RoundContext, *, lambda_: float = 0.01
) -> AggregationResult:
    """FedIT's ``(Ā, B̄)`` with ``B̄ ← B̄ + ΔB`` (see module docstring).

    Parameters
    ----------
    lambda_
        Weight ``λ ≥ 0`` of the penalty ``‖s_g ΔB‖²`` (0 = the least-squares correction).
    """
    check_tolerance("lambda_", lambda_)
    global_factors = {}
    for module in context.modules:
        factors = context.factors_of(updates, module)
        scale = context.scale(factors[0].rank, module)
        mean = mean_factors(factors, context.weights, scale)  # float64 (Ā, B̄)
        delta_b = correction(factors, context.weights, scale, mean, lambda_)
        global_factors[module] = LoraFactors(a=mean.a, b=mean.b + delta_b, scale=scale).astype(
            context.dtype
        )
    return same_rank_result("lora-fair", global_factors, context)


def correction(
    factors: Sequence[LoraFactors],
    weights: np.ndarray,
    scale: float,
    mean: LoraFactors,
    lambda_: float,
) -> np.ndarray:
    """``ΔB = (T − B̄ G)(G + λ I)⁻¹`` of one module, float64 ``(m, r)`` (module docstring)."""
    a_bar = mean.a  # (r, n)
    gram = a_bar @ a_bar.T  # (r, r)
    fold = folded_weights(factors, weights, scale)
    target = sum(
        w * f.b.astype(np.float64) @ (f.a.astype(np.float64) @ a_bar.T)
        for w, f in zip(fold, factors, strict=True)
    )  # (m, r)
    rhs = target - mean.b @ gram  # (m, r): the residual's projection, R Āᵀ
    if lambda_ > 0:
        return np.linalg.solve(gram + lambda_ * np.eye(gram.shape[0]), rhs.T).T
    return np.linalg.lstsq(gram, rhs.T, rcond=None)[0].T  # G symmetric: X G = rhs
