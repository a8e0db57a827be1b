"""RoLoRA: alternating optimisation of LoRA factors (Chen et al. 2025, arXiv 2502.01755).

Rounds alternate between training B with A frozen (``phase="b"``) and
training A with B frozen (``phase="a"``). The frozen factor is identical on
all clients, so each round's average is exact::

    phase "b":  A = A_1 = … = A_K,   B̄ = Σ_k p_k (s_k / s_g) B_k     # (r, n), (m, r)
    phase "a":  B = B_1 = … = B_K,   Ā = Σ_k p_k (s_k / s_g) A_k
    ΔW_global = s_g · B̄ A  (or s_g · B Ā) = ΔW*

The caller chooses the phase per round (e.g. ``"b"`` on odd rounds); a
client whose frozen factor differs is rejected with
``FROZEN_FACTOR_MISMATCH``, which also catches a wrong phase. All clients
must share one rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.registry import register
from fedlora.aggregation.result import AggregationResult, same_rank_result
from fedlora.aggregation.validation import check_shared_factor, check_tolerance
from fedlora.aggregation.weighting import folded_weights, weighted_sum


@register("rolora", equal_ranks=True, exact=True, linear=True, modifies_base=False)
def rolora(
    updates: Sequence[ClientUpdate],
    context: RoundContext,
    *,
    phase: Literal["a", "b"] = "b",
    frozen_rtol: float = 1e-6,
) -> AggregationResult:
    """Average the factor trained this round (see module docstring).

    Parameters
    ----------
    phase
        ``"b"``: B was trained and A frozen; ``"a"``: the reverse.
    frozen_rtol
        Allowed relative deviation of a client's frozen factor from the first client's.
    """
    if phase not in ("a", "b"):
        raise ValueError(f"rolora phase must be 'a' or 'b' (the factor trained), got {phase!r}")
    check_tolerance("frozen_rtol", frozen_rtol)
    frozen: Literal["a", "b"] = "a" if phase == "b" else "b"
    client_ids = [u.client_id for u in updates]
    global_factors = {}
    for module in context.modules:
        factors = context.factors_of(updates, module)
        check_shared_factor(
            factors, frozen, module=module, client_ids=client_ids, rule="rolora", rtol=frozen_rtol
        )
        scale = context.scale(factors[0].rank, module)
        fold = folded_weights(factors, context.weights, scale)
        if phase == "b":
            mean = LoraFactors(
                a=factors[0].a, b=weighted_sum([f.b for f in factors], fold), scale=scale
            )
        else:
            mean = LoraFactors(
                a=weighted_sum([f.a for f in factors], fold), b=factors[0].b, scale=scale
            )
        global_factors[module] = mean.astype(context.dtype)
    return same_rank_result("rolora", global_factors, context, frozen=frozenset(frozen))
