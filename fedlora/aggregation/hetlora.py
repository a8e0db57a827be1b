"""HetLoRA: heterogeneous-rank LoRA (Cho et al. 2024, arXiv 2401.06432).

Per module, with ``r_max = max_k r_k`` and global scale ``s_g = scale_for_rank(r_max)``,
each client is zero-padded to ``r_max`` in the global parametrisation::

    A_k' = [A_k; 0]                   # (r_max, n)
    B_k' = (s_k / s_g) [B_k, 0]       # (m, r_max)

and weighted by the Frobenius norm of its update (sparsity-weighted
aggregation, the paper's rule; optionally times ``n_k``)::

    w_k ∝ ‖s_k B_k A_k‖_F  (× n_k if weight_by_examples), Σ w_k = 1
    Ā = Σ_k w_k A_k',  B̄ = Σ_k w_k B_k',   ΔW_global = s_g · B̄ Ā

Norms are computed from the factors (no dense matrix). If every norm is
zero (e.g. all B still at their zero init) the weights fall back to uniform
(or ``p_k`` with ``weight_by_examples``). A client of rank ``r`` receives
``Ā[:r]`` and ``B̄[:, :r] · s_g / s_r`` with its own scale ``s_r`` (the paper's
truncation). Mixed ranks allowed; not exact. The paper's client-side rank
self-pruning (a training-time feature, not part of aggregation) is
:mod:`fedlora.learning.hetlora_prune`, on with ``hetlora-prune = true`` (off: every
client trains its full rank every round): a pruned client uploads rank
``max(1, ⌊γ r⌋)`` and is aggregated here like any client of that rank; the
server checks that rank (``RANK_MISMATCH`` otherwise) and sends it that rank
from then on.

Components no participant trained this round (index ``j >= max{r_k : w_k > 0}``,
e.g. a round without a top-rank client) are **kept from the previous global**
when the server passes it (``previous``, its global adapter before the round):
``A_j``, ``B_j`` (refolded to the new global scale) are carried over up to the
previous global's last component with a non-zero ``B`` column (those past it
were never trained: ``B_j = 0`` gives ``A_j`` zero gradient), the global's rank
is ``max(r_max, that rank)``, and its scale is that rank's.
Without ``previous`` (pure API) the global has rank ``r_max`` and a client of
a larger rank receives those components re-initialised as PEFT does (``A``
from the round's seed, ``B = 0``; see :class:`~fedlora.aggregation.views.PrefixView`).
Deviation from the paper: the paper's zero-padded average leaves such
components at ``A = B = 0``, where LoRA's gradients are exactly zero, so a
rank-``r`` tier loses them for good after one round without it.

Paper check (branch papers): the paper's method section could not be retrieved with this
project's tools; its Figure 2 caption, quoted by a third-party review, could: zero-pad the
smaller-rank modules to ``r_max``, weight each client by ``‖S_k‖ / Z`` computed from its
reconstructed ``ΔW_k = B_k A_k``, average the padded modules, truncate for the next
client's rank. That is the rule above. Two readings are ours: the norm is taken per LoRA
module (the caption writes one module), and of ``s_k B_k A_k``, the client's effective
update (the paper's notation has no LoRA scale), with B refolded to the global scale
before averaging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.linalg import factored_frobenius_norm
from fedlora.aggregation.registry import register
from fedlora.aggregation.result import AggregationResult, prefix_result


@register("hetlora", equal_ranks=False, exact=False, linear=False, modifies_base=False)
def hetlora(
    updates: Sequence[ClientUpdate],
    context: RoundContext,
    *,
    weight_by_examples: bool = False,
    previous: Mapping[str, LoraFactors] | None = None,
) -> AggregationResult:
    """Zero-pad to the largest rank and average with norm weights (see module docstring).

    Parameters
    ----------
    weight_by_examples
        Multiply each client's norm weight by its ``n_k`` before normalising.
    previous
        The global adapter before this round (``module -> factors`` at the global scale), or
        ``None``. Components that no client with a positive weight holds are taken from it.
    """
    if not isinstance(weight_by_examples, bool):
        raise TypeError(f"weight_by_examples must be a bool, got {weight_by_examples!r}")
    check_previous(previous, context, "hetlora")
    prior = context.weights if weight_by_examples else np.full(len(updates), 1.0 / len(updates))
    global_factors = {}
    for module in context.modules:
        factors = context.factors_of(updates, module)
        out_features, in_features = context.shapes[module]
        prev = previous.get(module) if previous is not None else None
        trained = np.flatnonzero(prev.b.any(axis=0)) if prev is not None else np.array([])
        kept_rank = int(trained[-1]) + 1 if trained.size else 0  # beyond: B = 0, never trained
        r_max = max([f.rank for f in factors] + [kept_rank])
        scale = context.scale(r_max, module)
        norms = np.array(
            [
                factored_frobenius_norm(f.scale * f.b.astype(np.float64), f.a.astype(np.float64))
                for f in factors
            ]
        )
        raw = norms * prior
        weights = raw / raw.sum() if raw.sum() > 0 else prior
        a = np.zeros((r_max, in_features))  # (r_max, n)
        b = np.zeros((out_features, r_max))  # (m, r_max)
        for w, f in zip(weights, factors, strict=True):
            a[: f.rank] += w * f.a.astype(np.float64)
            b[:, : f.rank] += (w * f.scale / scale) * f.b.astype(np.float64)
        covered = max(f.rank for w, f in zip(weights, factors, strict=True) if w > 0)
        if prev is not None and kept_rank > covered:  # untrained this round: keep them
            a[covered:kept_rank] = prev.a[covered:kept_rank].astype(np.float64)
            b[:, covered:kept_rank] = (prev.scale / scale) * prev.b[:, covered:kept_rank].astype(
                np.float64
            )
        global_factors[module] = LoraFactors(a=a, b=b, scale=scale).astype(context.dtype)
    return prefix_result("hetlora", global_factors, context, split="b", fixed_rank=False)


def check_previous(
    previous: Mapping[str, LoraFactors] | None, context: RoundContext, strategy: str
) -> None:
    """Reject a ``previous`` global adapter that does not match the round's modules and shapes."""
    if previous is None:
        return
    if not isinstance(previous, Mapping):
        raise TypeError(f"{strategy}: previous must map module -> LoraFactors or be None, "
                        f"got {type(previous).__name__}")
    if sorted(previous) != list(context.modules):
        raise ValueError(f"{strategy}: previous global has modules {sorted(previous)[:3]}…, the "
                         f"round's updates have {list(context.modules)[:3]}…; pass the global "
                         "adapter of the same model")
    for module, (out_features, in_features) in context.shapes.items():
        f = previous[module]
        if (f.a.ndim != 2 or f.b.ndim != 2 or f.a.shape[1] != in_features
                or f.b.shape != (out_features, f.a.shape[0])):
            raise ValueError(f"{strategy}: previous global {module!r} has A {f.a.shape}, B "
                             f"{f.b.shape}; the module is ({out_features}, {in_features}), "
                             "so A must be (r, in_features) and B (out_features, r)")
