"""FFA-LoRA: freeze A, federate B only (Sun et al. 2024, arXiv 2403.12313).

Every client starts from the same seeded ``A`` and keeps it frozen, so
``ΔW`` is linear in the trained factor and averaging B is exact::

    A = A_1 = … = A_K                 # (r, n), checked equal within frozen_rtol
    B̄ = Σ_k p_k (s_k / s_g) B_k       # (m, r)
    ΔW_global = s_g · B̄ A = Σ_k p_k s_k B_k A_k = ΔW*

Clients send A as well (unchanged); a client whose A differs is rejected
with ``FROZEN_FACTOR_MISMATCH``. All clients must share one rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.registry import register
from fedlora.aggregation.result import AggregationResult, same_rank_result
from fedlora.aggregation.validation import check_shared_factor, check_tolerance
from fedlora.aggregation.weighting import folded_weights, weighted_sum


@register("ffa", equal_ranks=True, exact=True, linear=True, modifies_base=False)
def ffa(
    updates: Sequence[ClientUpdate], context: RoundContext, *, frozen_rtol: float = 1e-6
) -> AggregationResult:
    """Average B under a shared frozen A (see module docstring).

    Parameters
    ----------
    frozen_rtol
        Allowed relative deviation of a client's A from the first client's.
    """
    global_factors = {
        module: LoraFactors(a=a, b=b, scale=scale).astype(context.dtype)
        for module, (a, b, scale) in mean_b_under_shared_a(updates, context, "ffa",
                                                           frozen_rtol).items()
    }
    return same_rank_result("ffa", global_factors, context, frozen=frozenset("a"))


def mean_b_under_shared_a(updates: Sequence[ClientUpdate], context: RoundContext, rule: str,
                          frozen_rtol: float) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per module ``(A, B̄, s)``: every client's A checked equal to the first's (within
    ``frozen_rtol``), ``B̄ = Σ p_k (s_k/s) B_k`` at the round's scale ``s`` (FFA, FedSVD)."""
    check_tolerance("frozen_rtol", frozen_rtol)
    client_ids = [u.client_id for u in updates]
    out = {}
    for module in context.modules:
        factors = context.factors_of(updates, module)
        check_shared_factor(
            factors, "a", module=module, client_ids=client_ids, rule=rule, rtol=frozen_rtol
        )
        scale = context.scale(factors[0].rank, module)
        fold = folded_weights(factors, context.weights, scale)
        out[module] = (factors[0].a, weighted_sum([f.b for f in factors], fold), scale)
    return out
