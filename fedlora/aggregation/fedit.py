"""FedIT: federated instruction tuning with LoRA (Zhang et al. 2024, arXiv 2305.05644).

Rule (FedAvg on each factor separately)::

    Ā = Σ_k p_k A_k                   # (r, n)
    B̄ = Σ_k p_k (s_k / s_g) B_k       # (m, r); s_k / s_g = 1 when clients share alpha
    ΔW_global = s_g · B̄ Ā

Not exact: ``s_g B̄ Ā = s Σ_j Σ_k p_j p_k B_j A_k`` contains products
``B_j A_k`` (``j ≠ k``) of different clients' factors, so it differs from
``ΔW* = Σ_k p_k s_k B_k A_k``. All clients must share one rank ``r``; the
global adapter has rank ``r`` and scale ``s_g = scale_for_rank(r, lora_alpha)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.registry import register
from fedlora.aggregation.result import AggregationResult, same_rank_result
from fedlora.aggregation.weighting import mean_factors


@register("fedit", equal_ranks=True, exact=False, linear=True, modifies_base=False)
def fedit(updates: Sequence[ClientUpdate], context: RoundContext) -> AggregationResult:
    """Average A and B separately (see module docstring)."""
    return same_rank_result("fedit", factorwise_mean(updates, context), context)


def factorwise_mean(
    updates: Sequence[ClientUpdate], context: RoundContext
) -> dict[str, LoraFactors]:
    """``(Ā, B̄, s_g)`` per module: the weighted mean of each factor at the global scale."""
    global_factors = {}
    for module in context.modules:
        factors = context.factors_of(updates, module)
        mean = mean_factors(factors, context.weights, context.scale(factors[0].rank, module))
        global_factors[module] = mean.astype(context.dtype)
    return global_factors
