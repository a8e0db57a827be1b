"""FlexLoRA: SVD redistribution for heterogeneous ranks (Bai et al. 2024, arXiv 2402.11505).

The server forms the exact aggregate and gives each client its best
rank-``r`` approximation (Eckart–Young)::

    ΔW* = Σ_k p_k s_k B_k A_k = U Σ Vᵀ
    client of rank r:  B = U_r Σ_r^{1/2} / sqrt(s_r),  A = Σ_r^{1/2} V_rᵀ / sqrt(s_r)
                       so that s_r · B A = U_r Σ_r V_rᵀ

``ΔW*`` is never formed densely: with ``B_st = [p_k s_k B_k]`` ``(m, R)`` and
``A_st = [A_k]`` ``(R, n)``, thin QRs ``B_st = Q_b R_b``, ``A_stᵀ = Q_a R_a``
and the SVD of the ``R × R`` core ``R_b R_aᵀ = U_c Σ V_cᵀ`` give
``U = Q_b U_c``, ``V = Q_a V_c`` at cost ``O((m + n) R² + R³)``.

``global_factors`` keep the full factored aggregate ``B = U Σ^{1/2}``,
``A = Σ^{1/2} Vᵀ`` with ``scale=1.0`` at rank ``min(m, n, R)``, singular
values descending, so ``effective_delta = ΔW*`` (exact before truncation)
and ``for_client(r)`` is a prefix slice with the client scale split evenly
between the factors. Mixed ranks allowed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.linalg import factored_svd, stack_factors
from fedlora.aggregation.registry import register
from fedlora.aggregation.result import AggregationResult, prefix_result


@register("flexlora", equal_ranks=False, exact=True, linear=False, modifies_base=False)
def flexlora(updates: Sequence[ClientUpdate], context: RoundContext) -> AggregationResult:
    """Factored SVD of the exact aggregate (see module docstring)."""
    global_factors = {}
    for module in context.modules:
        b_st, a_st = stack_factors(context.factors_of(updates, module), context.weights)
        u, sigma, vt = factored_svd(b_st, a_st)  # (m, k), (k,), (k, n)
        root = np.sqrt(sigma)
        global_factors[module] = LoraFactors(
            a=root[:, None] * vt, b=u * root[None, :], scale=1.0
        ).astype(context.dtype)
    return prefix_result("flexlora", global_factors, context, split="balanced", fixed_rank=False)
