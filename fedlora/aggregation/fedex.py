"""FedEx-LoRA: exact aggregation via a residual in the base (Singhal et al., arXiv 2410.09432).

The adapter is averaged as in FedIT and the averaging error is merged into
the frozen base weights, which makes the round exact::

    Ā = Σ_k p_k A_k,  B̄ = Σ_k p_k (s_k / s_g) B_k                 # (r, n), (m, r)
    residual = Σ_k p_k s_k B_k A_k − s_g B̄ Ā
             = [p_1 s_1 B_1, …, p_K s_K B_K, −s_g B̄] @ [A_1; …; A_K; Ā]
               # (m, (K+1) r) @ ((K+1) r, n)
    effective_delta = residual + s_g B̄ Ā = ΔW*

The residual is kept factored as the ``base_correction`` (``scale=1.0``,
rank ``(K + 1) r``) and built from the cast ``Ā``, ``B̄`` that clients
receive, so exactness holds for the arrays actually sent. Every client
merges it into its base and loads ``(Ā, B̄)``; clients that skipped the
round must still apply it. All clients must share one rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.linalg import stack_factors
from fedlora.aggregation.registry import register
from fedlora.aggregation.result import AggregationResult, same_rank_result
from fedlora.aggregation.weighting import mean_factors


@register("fedex", equal_ranks=True, exact=True, linear=False, modifies_base=True)
def fedex(updates: Sequence[ClientUpdate], context: RoundContext) -> AggregationResult:
    """FedIT average plus the exact residual as a base correction (see module docstring)."""
    global_factors = {}
    base_correction = {}
    for module in context.modules:
        factors = context.factors_of(updates, module)
        mean = mean_factors(factors, context.weights, context.scale(factors[0].rank, module))
        sent = mean.astype(context.dtype)
        b_st, a_st = stack_factors(factors, context.weights)  # (m, K r), (K r, n)
        b = np.concatenate([b_st, -sent.scale * sent.b.astype(np.float64)], axis=1)  # (m, (K+1) r)
        a = np.concatenate([a_st, sent.a.astype(np.float64)], axis=0)  # ((K+1) r, n)
        global_factors[module] = sent
        base_correction[module] = LoraFactors(a=a, b=b, scale=1.0).astype(context.dtype)
    return same_rank_result("fedex", global_factors, context, base_correction)
