"""HetLoRA's local rank self-pruning (Cho et al. 2024, arXiv 2401.06432, §3 "local rank
self-pruning"), the client-side half of ``strategy = hetlora`` with ``hetlora-prune = true``.

The rule, for a client of current rank ``r`` and decay factor ``γ < 1``:

* **tail**: the last components ``j ∈ [⌊γ r⌋, r)`` of every LoRA module (at least one: the
  tail of rank ``r`` starts at ``min(⌊γ r⌋, r - 1)``); a rank-1 client has no tail (it is
  neither penalised nor pruned);
* **local objective**: ``f_k(W) + λ · Σ_modules ‖B[:, tail] A[tail]‖_F``: the paper's
  regulariser on the norm of the tail's reconstruction, which pushes the tail to zero when the
  client's data does not need it;
* **pruning decision**, after local training: with ``N_t`` the tail norm (the regulariser's
  value, without ``λ``) at the end of this round and ``N_{t-1}`` the client's value at the end
  of its previous round *at the same rank*, the client prunes iff ``N_t < N_{t-1}``: its rank
  becomes ``max(1, ⌊γ r⌋)`` and it sends only ``A[:r']`` and ``B[:, :r']``. A client never
  grows back; the server sends it the global truncated to ``r'`` from then on (HetLoRA's
  truncation), and aggregates its pruned upload zero-padded like any smaller rank.

Defaults: ``γ = 0.99`` (the paper's decay factor in its experiments) and ``λ = 1e-3`` (ours).
Deviations, and what could not be checked:

* the paper's formula is written for one ``(B, A)`` pair; with many adapted modules the
  regulariser is the sum of the per-module tail norms and the decision uses that sum (one
  rank per client, as in the paper);
* ``‖B_t A_t‖_F`` is computed from the factors, ``sqrt(Σ (B_tᵀB_t) ⊙ (A_t A_tᵀ))`` (no dense
  matrix), with the square root's argument clamped at 1e-24, so the penalty's gradient is 0
  (not NaN) while ``B = 0`` (PEFT's init);
* the LoRA scale ``s_r`` is left out of the norm, as in the paper's formula;
* the first round a client takes part in (no ``N_{t-1}``) and the first round after a prune
  (a different tail) never prune;
* the previous norm lives in the node's ``context.state``: a node process that restarts
  forgets it and waits one more round before it can prune; its rank is the server's
  (the rank of the adapter the server sends), so it is never lost;
* not available with secure aggregation (the server could not see a pruned rank in a
  masked sum) or with differential privacy (the update's sensitivity is defined on the
  received shapes): :mod:`fedlora.config` refuses those combinations;
* **what could not be checked** (branch papers): the paper's §3 could not be retrieved
  with this project's tools (arXiv 2401.06432 and its EMNLP 2024 version: abstract and
  first page only). Its Figure 2 caption, quoted by a third-party review, covers only the
  server side (:mod:`fedlora.aggregation.hetlora`). Public third-party implementations of
  the pruning read §3 differently from this module in two points, which are therefore
  open: (1) the regulariser as the product of the tail factors' norms,
  ``λ Σ_modules ‖B[:, tail]‖_F ‖A[tail]‖_F`` (an upper bound of the norm used here), and
  (2) the decision as "the tail score after local training is below the tail score of the
  adapter the client received this round" rather than below its value at the end of the
  client's previous round (PabloE-KAIST/FedLoRA-public, ``2_yamls/hetlora/README.md``:
  both points, ``γ = 0.99``, weight 0.01; several copies of a ``self_pruning_regularisation``
  helper: point 1). This module was left as it is, with ``γ = 0.99`` and ``λ = 1e-3``
  (ours); neither reading is confirmed by the paper's text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

LORA_A, LORA_B = "lora_A", "lora_B"


def tail_start(rank: int, gamma: float) -> int:
    """First index of the tail of a rank-``rank`` adapter: ``min(⌊γ r⌋, r - 1)``."""
    if rank < 1 or not 0 < gamma < 1:
        raise ValueError(f"tail_start needs rank >= 1 and 0 < gamma < 1; got {rank}, {gamma}")
    return min(math.floor(gamma * rank), rank - 1)


def pruned_rank(rank: int, gamma: float) -> int:
    """The rank a client of ``rank`` prunes to: ``max(1, ⌊γ r⌋)`` (a rank-1 client keeps 1)."""
    return max(1, tail_start(rank, gamma))


def _pairs(arrays: Mapping[str, object]) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA module in a peft state dict (or named parameters)."""
    pairs = []
    for key in sorted(arrays):
        if LORA_A in key:
            other = key.replace(LORA_A, LORA_B)
            if other not in arrays:
                raise KeyError(f"{key} has no {LORA_B} partner ({other})")
            pairs.append((key, other))
    return pairs


def tail_norm(arrays: Mapping[str, np.ndarray], gamma: float) -> float:
    """``Σ_modules ‖B[:, tail] A[tail]‖_F`` of a peft adapter (numpy, float64)."""
    total = 0.0
    for ka, kb in _pairs(arrays):
        a, b = np.asarray(arrays[ka], np.float64), np.asarray(arrays[kb], np.float64)
        if a.shape[0] <= 1:  # a rank-1 adapter is never pruned
            continue
        t = tail_start(a.shape[0], gamma)
        at, bt = a[t:], b[:, t:]
        total += math.sqrt(max(float(np.sum((bt.T @ bt) * (at @ at.T))), 0.0))
    return total


def tail_penalty(params: Mapping[str, object], gamma: float):
    """The regulariser ``Σ_modules ‖B[:, tail] A[tail]‖_F`` on trainable torch parameters,
    differentiable; ``None`` when ``params`` holds no LoRA pair (nothing to regularise)."""
    import torch

    total = None
    for ka, kb in _pairs(params):
        a, b = params[ka], params[kb]
        if a.shape[0] <= 1:  # a rank-1 adapter is never pruned: nothing to push down
            continue
        t = tail_start(a.shape[0], gamma)
        at, bt = a[t:], b[:, t:]
        norm = torch.sqrt(torch.clamp_min(((bt.T @ bt) * (at @ at.T)).sum(), 1e-24))
        total = norm if total is None else total + norm
    return total


def decide(rank: int, norm: float, previous: Mapping[str, float] | None, gamma: float) -> int:
    """The client's rank for the next round: ``pruned_rank`` iff its tail norm fell since its
    previous round at this very rank (``previous = {"rank": r, "norm": N}``), else ``rank``."""
    if rank <= 1 or previous is None or int(previous["rank"]) != rank:
        return rank
    return pruned_rank(rank, gamma) if norm < float(previous["norm"]) else rank


def truncate(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The adapter's first ``rank`` components: ``A[:rank]``, ``B[:, :rank]``; heads as they are."""
    out = dict(arrays)
    for ka, kb in _pairs(arrays):
        out[ka] = np.ascontiguousarray(np.asarray(arrays[ka])[:rank])
        out[kb] = np.ascontiguousarray(np.asarray(arrays[kb])[:, :rank])
    return out


def adapter_rank(arrays: Mapping[str, np.ndarray]) -> int:
    """The rank of a peft adapter's LoRA factors; ``ValueError`` if the modules disagree."""
    ranks = {int(np.shape(arrays[ka])[0]) for ka, kb in _pairs(arrays)}
    ranks |= {int(np.shape(arrays[kb])[1]) for ka, kb in _pairs(arrays)}
    if len(ranks) != 1:
        raise ValueError(f"the adapter's modules have ranks {sorted(ranks)}; one rank expected")
    return ranks.pop()
