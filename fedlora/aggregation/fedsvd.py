"""FedSVD: B-only training with an SVD re-factorisation on the server
(Lee et al., NeurIPS 2025, arXiv 2505.12805).

Clients start from the global ``(A_prev, B_prev)``, keep ``A_prev`` frozen and train only
``B``; the server averages ``B``, forms the product with the ``A`` the round started from and
re-factorises it by its SVD, so the next round's ``A`` is orthonormal and points along the
principal directions of the aggregate::

    A_prev = A_1 = … = A_K              # (r, n), checked equal within frozen_rtol
    B̄ = Σ_k p_k (s_k / s_g) B_k         # (m, r), exactly FFA-LoRA's mean
    B̄ A_prev = U Σ Vᵀ                   # thin SVD, rank ≤ r, σ descending
    A_new = Vᵀ                           # (r, n), orthonormal rows
    B_new = U Σ                          # (m, r)
    ΔW_global = s_g B_new A_new = s_g B̄ A_prev = Σ_k p_k s_k B_k A_prev = ΔW*

The round is exact, as in FFA-LoRA, and the server step needs nothing but the weighted mean
``B̄`` and the ``A_prev`` it sent itself: a secure sum of the clients' ``B`` (secure
aggregation) and a noisy mean of clipped ``B`` updates (``dp-mode = central | local |
distributed``) are all it uses. When ``B̄ A_prev`` has rank below ``r`` (e.g. ``B̄ = 0``) the
trailing rows of ``Vᵀ`` are orthonormal directions inside the row space of ``A_prev``
(``ΔW`` gets nothing from them, and ``A`` never has a zero row). The SVD is taken from the
factors (:func:`~fedlora.aggregation.linalg.factored_svd`), never densely. All clients must
share one rank.

Deviations from the paper:

* the paper's privacy setting is DP-SGD on each client (example-level); here DP is
  fedlora's client-level DP on the uploaded ``B`` update, which the paper does not evaluate;
* the SVD is taken every round: the authors' code has a period
  (``--recalculate-svd-period``, default 1, and ``--svd-warmup-steps``, default 0) and both of
  its published scripts use period 1; no period option is offered here;
* the server optimizers (FedAdam …) are refused: ``A`` is replaced by a rotation each
  round, so ``new − previous`` is not a pseudo-gradient (``StrategyInfo.refactors``).

Code check (branch papers): the paper's text could not be retrieved with this project's
tools, but the authors' code could (github.com/seanie12/fed-svd, commit 36650e2). It matches
the rule above: clients train B only (``--model ffa``) and the server averages the B
updates with the clients' example-count weights (``B ← B + Σ_k p_k ΔB_k``, which is
``Σ_k p_k B_k`` since every client starts from the same B); then ``reinit_lora`` (in
``misc/utils.py``) takes ``torch.linalg.svd(B @ A)`` and sets ``A = V_rᵀ``,
``B = U_r diag(Σ_r)``, the LoRA scale unchanged. The first round trains on PEFT's random
``A``, as here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.ffa import mean_b_under_shared_a
from fedlora.aggregation.linalg import factored_svd
from fedlora.aggregation.registry import register
from fedlora.aggregation.result import AggregationResult, same_rank_result


@register("fedsvd", equal_ranks=True, exact=True, linear=True, modifies_base=False,
          refactors=True)
def fedsvd(
    updates: Sequence[ClientUpdate], context: RoundContext, *, frozen_rtol: float = 1e-6
) -> AggregationResult:
    """Average B under the shared A, then ``A ← Vᵀ``, ``B ← UΣ`` (see module docstring).

    Parameters
    ----------
    frozen_rtol
        Allowed relative deviation of a client's A from the first client's.
    """
    global_factors = {}
    for module, (a, b_mean, scale) in mean_b_under_shared_a(updates, context, "fedsvd",
                                                            frozen_rtol).items():
        u, sigma, vt = refactor(b_mean, a.astype(np.float64))
        global_factors[module] = LoraFactors(a=vt, b=u * sigma[None, :], scale=scale).astype(
            context.dtype
        )
    return same_rank_result("fedsvd", global_factors, context)


def refactor(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``b @ a = U diag(σ) Vᵀ`` at exactly ``r = a.shape[0]`` components.

    Parameters
    ----------
    b
        ``(m, r)``.
    a
        ``(r, n)`` with ``r ≤ min(m, n)``.

    Returns
    -------
    tuple[np.ndarray, np.ndarray, np.ndarray]
        ``U`` ``(m, r)``, ``σ`` ``(r,)`` descending and ``Vᵀ`` ``(r, n)`` with orthonormal rows.

    Raises
    ------
    ValueError
        ``r`` exceeds a side of the layer: ``Vᵀ`` could not have ``r`` orthonormal rows.
    """
    rank = a.shape[0]
    m, n = b.shape[0], a.shape[1]
    if rank > min(m, n):
        raise ValueError(
            f"fedsvd needs rank ≤ min(out_features, in_features) so that A can have orthonormal "
            f"rows; got rank {rank} on a {m}×{n} layer; lower lora.r"
        )
    u, sigma, vt = factored_svd(b, a)  # k = min(m, n, r) = r components
    return u, sigma, vt
