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

``global_factors`` keep the full factored aggregate at rank ``min(m, n, R)``
with ``scale=1.0``, singular values descending, so ``effective_delta = ΔW*``
(exact before truncation) and ``for_client(r)`` is a prefix slice. How Σ and
the client scale are split between the factors (option ``split``):

* ``"balanced"`` (the paper's ``B = U Σ^{1/2}``, ``A = Σ^{1/2} Vᵀ``, client
  scale split evenly): received A rows have norm ``sqrt(σ_j / s_r)``, far
  below a PEFT-initialised row's ``1/sqrt(3) ≈ 0.58`` once ``σ`` is small,
  and ``∂L/∂B ∝ A`` makes B learn that much slower in the next round.
* ``"init-a"``: global ``A = Vᵀ`` (orthonormal rows, as FedSVD), ``B = U Σ``;
  a client receives ``A = Vᵀ_r / sqrt(3)`` — every row at the PEFT-init
  norm — and ``B = sqrt(3) U_r Σ_r / s_r``. Same product ``U_r Σ_r V_rᵀ``.
  Deviation from the paper, which does not say how to split Σ.

Components past ``R`` (a rank-16 client after a round of ranks {4, 4, 4}) and
components of zero singular value under ``"balanced"`` are **re-initialised**
for the client (``A`` row drawn as PEFT does from the round's seed, ``B = 0``;
see :class:`~fedlora.aggregation.views.PrefixView`), not kept from the
previous global: ``ΔW*`` already contains everything the clients carried, so
previous components would count twice. The paper's zero padding leaves them
at ``A = B = 0`` with exactly zero gradients for that client's round.
Mixed ranks allowed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.linalg import factored_svd, stack_factors
from fedlora.aggregation.registry import register
from fedlora.aggregation.result import AggregationResult, prefix_result

SPLITS = ("balanced", "init-a")


@register("flexlora", equal_ranks=False, exact=True, linear=False, modifies_base=False)
def flexlora(
    updates: Sequence[ClientUpdate], context: RoundContext, *, split: str = "balanced"
) -> AggregationResult:
    """Factored SVD of the exact aggregate (see module docstring).

    Parameters
    ----------
    split
        ``"balanced"`` (Σ^{1/2} in each factor) or ``"init-a"`` (A rows at PEFT-init norm).
    """
    if split not in SPLITS:
        raise ValueError(f"flexlora split must be one of {', '.join(SPLITS)}; got {split!r}")
    global_factors = {}
    for module in context.modules:
        b_st, a_st = stack_factors(context.factors_of(updates, module), context.weights)
        u, sigma, vt = factored_svd(b_st, a_st)  # (m, k), (k,), (k, n)
        if split == "init-a":
            a, b = vt, u * sigma[None, :]
        else:
            root = np.sqrt(sigma)
            a, b = root[:, None] * vt, u * root[None, :]
        global_factors[module] = LoraFactors(a=a, b=b, scale=1.0).astype(context.dtype)
    return prefix_result("flexlora", global_factors, context, split=split, fixed_rank=False)
