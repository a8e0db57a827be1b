"""Robust aggregation of the *effective* updates ``ΔW_k = s_k B_k A_k`` (mixed ranks allowed).

A poisoned or broken client can pass every validation check with a finite but large, or
simply wrong, adapter. Averaging factors lets it move the global model arbitrarily; robust
statistics on what the clients' adapters *do* bound its influence:

1. **Norm clipping** (``clip_multiplier > 0``) of each client's *change this round*,
   ``D_k = s_k B_k A_k − R_k`` with ``R_k`` the adapter it received (``received``): the
   change is scaled down to at most ``clip_multiplier × median_k ‖D_k‖_F`` and the client's
   adapter becomes ``R_k + c_k D_k`` (on the dense ``ΔW_k`` the reducer needs anyway). This is the
   update clipping of Andrew et al. 2021 (arXiv 1905.03871) and of norm-bounding defences
   (Sun et al. 2019, arXiv 1911.07963), with the median as the bound's reference. Clipping
   whole adapters instead would let an attacker's large change pass under the bound once
   the shared global dominates every adapter.
2. **Reducer**, coordinate-wise over clients, unweighted (robust statistics ignore the
   example counts a client claims): ``median``, ``trimmed-mean`` (drop the
   ``max(1, ⌊trim · K⌋)`` largest and smallest values per coordinate, then average; it needs
   ``K ≥ 3`` when ``trim > 0``, ``trim = 0`` is the plain mean) or ``mean``. Deviation
   from the textbook ``β``-trimmed mean (Yin et al. 2018, arXiv 1803.01498), which drops
   ``⌊βK⌋`` per side: that is zero below ``K = 1/β`` clients (9 at the default 0.1), so a
   ×100 outlier would stay in every cross-silo round.
3. The robust ``ΔW`` is factored by SVD (singular values descending) and each client gets its
   best rank-``r`` approximation, as in FlexLoRA.

The declared tensors outside LoRA (classifier head, bias, modules to save) go through the same
two steps in :func:`robust_heads`: each tensor ``H_k``'s change ``H_k − H_received`` is clipped
to ``clip_multiplier × median_k ‖H_k − H_received‖_F`` (one bound per tensor, as per module
above), then reduced coordinate-wise, unweighted, by the same reducer. A plain mean of heads
would let one client move the head arbitrarily while the factors stay robust. Heads have no
rank, so step 3 does not apply to them.

The reducer needs the dense ``ΔW_k`` of every client for one module at a time
(``K × m × n`` floats: 8 clients × 4096² × 8 bytes ≈ 1 GB for a 7B model's projection), so it
suits cross-silo rounds with few clients per round. Rule options: ``reducer``, ``trim``,
``clip_multiplier``, ``received`` (required with clipping: one ``module -> factors`` per
update, in the updates' order — what each client was sent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
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
    if trim == 0:
        return stack.mean(axis=0)
    if k < 3:
        raise ValueError(f"trimmed-mean with trim={trim} drops at least one value per side and "
                         f"needs at least 3 clients, got {k}; require 3 accepted updates "
                         "(min-accepted = 3), use trim = 0 (the mean) or the median")
    cut = max(1, int(np.floor(trim * k)))
    if 2 * cut >= k:
        raise ValueError(f"trim={trim} removes every one of the {k} clients; use a trim below "
                         f"{0.5:.1f} with enough clients, or the median")
    ordered = np.sort(stack, axis=0)
    return ordered[cut:k - cut].mean(axis=0)


def robust_heads(heads: Sequence[Mapping[str, np.ndarray]],
                 received: Sequence[Mapping[str, np.ndarray]], *, reducer: str = "median",
                 trim: float = 0.1, clip_multiplier: float = 0.0) -> dict[str, np.ndarray]:
    """The declared heads of one round, aggregated like the factors (see module docstring).

    Parameters
    ----------
    heads
        One ``name -> array`` per accepted update (same names and shapes in each).
    received
        What each update's client was sent, in the same order (the clipping reference).
    reducer, trim, clip_multiplier
        As for :func:`robust`.

    Returns
    -------
    dict
        ``name -> float32 array``: clipped, then reduced coordinate-wise over the clients.
    """
    if reducer not in REDUCERS:
        raise ValueError(f"reducer must be one of {', '.join(REDUCERS)}; got {reducer!r}")
    if len(received) != len(heads):
        raise ValueError(f"robust_heads needs what each of the {len(heads)} clients was sent; "
                         f"got {len(received)} received head sets")
    if not heads or not heads[0]:
        return {}
    names = sorted(heads[0])
    for k, (h, r) in enumerate(zip(heads, received, strict=True)):
        if sorted(h) != names or not set(names) <= set(r):
            raise ValueError(f"update {k} has heads {sorted(h)[:3]}… (received "
                             f"{sorted(r)[:3]}…); every update needs the heads {names[:3]}…")
    out = {}
    for name in names:
        base = [np.asarray(r[name], dtype=np.float64) for r in received]
        values = [np.asarray(h[name], dtype=np.float64) for h in heads]
        if any(v.shape != b.shape for v, b in zip(values, base, strict=True)):
            raise ValueError(f"head {name!r}: an update's shape differs from what it was sent")
        if clip_multiplier > 0:
            changes = [v - b for v, b in zip(values, base, strict=True)]
            keep = clip_norms(np.array([np.linalg.norm(c) for c in changes]), clip_multiplier)
            values = [b + c * d for b, c, d in zip(base, keep, changes, strict=True)]
        out[name] = reduce(np.stack(values), reducer, trim).astype(np.float32)
    return out


@register("robust", equal_ranks=False, exact=False, linear=False, modifies_base=False)
def robust(updates: Sequence[ClientUpdate], context: RoundContext, *,
           reducer: str = "median", trim: float = 0.1,
           clip_multiplier: float = 0.0,
           received: Sequence[Mapping[str, LoraFactors]] | None = None) -> AggregationResult:
    """Clip the round's changes, reduce coordinate-wise and re-project ΔW (see module
    docstring). ``received[k]`` is what client ``k`` was sent (required when clipping)."""
    if reducer not in REDUCERS:
        raise ValueError(f"reducer must be one of {', '.join(REDUCERS)}; got {reducer!r}")
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5); got {trim}")
    if clip_multiplier > 0:
        if received is None or len(received) != len(updates):
            raise ValueError(
                f"robust clipping acts on each client's change this round and needs "
                f"received= (one module -> factors per update, what it was sent); got "
                f"{'none' if received is None else len(received)} for {len(updates)} updates")
        for k, sent in enumerate(received):
            if set(sent) != set(context.modules):
                raise ValueError(f"received[{k}] has modules {sorted(sent)[:3]}…, the updates "
                                 f"{list(context.modules)[:3]}…; pass what that client was sent")
    global_factors = {}
    for module in context.modules:
        parts = context.factors_of(updates, module)
        dense = [f.scale * (f.b.astype(np.float64) @ f.a.astype(np.float64)) for f in parts]
        if clip_multiplier > 0:
            assert received is not None
            base = [r[module].scale * (r[module].b.astype(np.float64)
                                       @ r[module].a.astype(np.float64)) for r in received]
            if any(x.shape != y.shape for x, y in zip(base, dense, strict=True)):
                raise ValueError(f"received factors of {module!r} do not match the update shapes")
            changes = [d - r for d, r in zip(dense, base, strict=True)]
            keep = clip_norms(np.array([np.linalg.norm(c) for c in changes]), clip_multiplier)
            dense = [r + c * d for r, c, d in zip(base, keep, changes, strict=True)]
        stack = np.stack(dense)
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
                               strategy="robust", seed=context.seed,
                               pattern=context.pattern),
    )
