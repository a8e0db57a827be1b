"""Robust aggregation of the *effective* updates ``ΔW_k = s_k B_k A_k`` (mixed ranks allowed).

A poisoned or broken client can pass every validation check with a finite but large, or
simply wrong, adapter. Averaging factors lets it move the global model arbitrarily; robust
statistics on what the clients' adapters *do* bound its influence:

1. **Norm clipping** (``clip_multiplier > 0``): each ``ΔW_k`` is scaled down to at most
   ``clip_multiplier × median_k ‖ΔW_k‖_F`` (norms computed from the factors, never densely).
2. **Reducer**, coordinate-wise over clients, unweighted (robust statistics ignore the
   example counts a client claims): ``median``, ``trimmed-mean`` (drop the ``trim`` fraction
   of largest and smallest values per coordinate, then average) or ``mean``.
3. The robust ``ΔW`` is factored by SVD (singular values descending) and each client gets its
   best rank-``r`` approximation, as in FlexLoRA.

The reducer needs the dense ``ΔW_k`` of every client for one module at a time
(``K × m × n`` floats: 8 clients × 4096² × 8 bytes ≈ 1 GB for a 7B model's projection), so it
suits cross-silo rounds with few clients per round. Rule options: ``reducer``, ``trim``,
``clip_multiplier``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.linalg import factored_frobenius_norm
from fedlora.aggregation.registry import register
from fedlora.aggregation.result import AggregationResult
from fedlora.aggregation.views import PrefixView

REDUCERS = ("median", "trimmed-mean", "mean")


def clip_norms(norms: np.ndarray, multiplier: float) -> np.ndarray:
    """Per-client factors ``min(1, multiplier · median / norm)`` (1 where clipping is off)."""
    if multiplier <= 0 or not len(norms):
        return np.ones_like(norms)
    bound = multiplier * float(np.median(norms))
    with np.errstate(divide="ignore", invalid="ignore"):
        factors = np.where(norms > bound, bound / norms, 1.0)
    return np.nan_to_num(factors, nan=1.0)


def reduce(stack: np.ndarray, reducer: str, trim: float) -> np.ndarray:
    """Coordinate-wise reduction over axis 0 (clients)."""
    if reducer == "median":
        return np.median(stack, axis=0)
    if reducer == "mean":
        return stack.mean(axis=0)
    k = stack.shape[0]
    cut = int(np.floor(trim * k))
    if 2 * cut >= k:
        raise ValueError(f"trim={trim} removes every one of the {k} clients; use a trim below "
                         f"{0.5:.1f} with enough clients, or the median")
    ordered = np.sort(stack, axis=0)
    return ordered[cut:k - cut].mean(axis=0)


@register("robust", equal_ranks=False, exact=False, linear=False, modifies_base=False)
def robust(updates: Sequence[ClientUpdate], context: RoundContext, *,
           reducer: str = "median", trim: float = 0.1,
           clip_multiplier: float = 0.0) -> AggregationResult:
    """Clip, reduce coordinate-wise and re-project ΔW (see module docstring)."""
    if reducer not in REDUCERS:
        raise ValueError(f"reducer must be one of {', '.join(REDUCERS)}; got {reducer!r}")
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5); got {trim}")
    global_factors = {}
    for module in context.modules:
        parts = context.factors_of(updates, module)
        norms = np.array([factored_frobenius_norm(f.scale * f.b.astype(np.float64),
                                                  f.a.astype(np.float64)) for f in parts])
        keep = clip_norms(norms, clip_multiplier)
        stack = np.stack([c * f.scale * (f.b.astype(np.float64) @ f.a.astype(np.float64))
                          for c, f in zip(keep, parts, strict=True)])
        delta = reduce(stack, reducer, trim)
        u, sigma, vt = np.linalg.svd(delta, full_matrices=False)
        rank = max(1, int((sigma > 1e-12 * (sigma[0] if sigma.size else 0)).sum()))
        root = np.sqrt(sigma[:rank])
        global_factors[module] = LoraFactors(
            a=root[:, None] * vt[:rank], b=u[:, :rank] * root[None, :], scale=1.0
        ).astype(context.dtype)
    return AggregationResult(
        strategy="robust",
        global_factors=global_factors,
        base_correction={},
        lora_alpha=context.lora_alpha,
        rslora=context.rslora,
        client_view=PrefixView(factors=global_factors, lora_alpha=context.lora_alpha,
                               rslora=context.rslora, split="balanced", fixed_rank=False,
                               strategy="robust", seed=context.seed),
    )
