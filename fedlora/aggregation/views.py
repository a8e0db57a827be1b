"""What a client of a given rank receives from an aggregation result.

A rule picks one view when it builds its
:class:`~fedlora.aggregation.result.AggregationResult`:

* :class:`PrefixView` — slice (or zero-pad) the global factors to the
  client's rank and refold the scale. Equal-rank rules use it with
  ``fixed_rank=True``; HetLoRA slices ``A[:r]``, ``B[:, :r]`` and folds the
  scale change into B; FlexLoRA's global factors are ordered by singular
  value, so the slice is the best rank-``r`` approximation, and the scale is
  split evenly between A and B.
* :class:`FreshInitView` — a fresh PEFT-style adapter (FLoRA, after the
  aggregate was merged into the base).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from fedlora.aggregation.factors import LoraFactors
from fedlora.aggregation.scaling import scale_for_rank


class ClientView(Protocol):
    """Maps a client's LoRA rank to the factors it should load."""

    def __call__(self, rank: int) -> dict[str, LoraFactors]:
        """Return ``module -> factors`` for a client of rank ``rank``."""
        ...


@dataclass(frozen=True)
class PrefixView:
    """Rank-``r`` prefix of the global factors, refolded to the client's scale.

    For a client of rank ``r`` with scale ``s_r`` and global factors
    ``(A_g, B_g, s_g)``, the client receives ``A = A_g[:r]``,
    ``B = B_g[:, :r]`` (zero-padded when ``r`` exceeds the global rank —
    such extra components start at zero in both factors and stay inactive
    until the next aggregation) with ``s_r · B @ A = s_g · B_g[:, :r] @ A_g[:r]``:
    the ratio ``c = s_g / s_r`` multiplies B (``split="b"``) or ``sqrt(c)``
    multiplies both (``split="balanced"``).

    Parameters
    ----------
    factors
        Global factors per module.
    lora_alpha
        Clients' ``lora_alpha``.
    rslora
        Clients use rsLoRA scaling.
    split
        Where the scale ratio goes.
    fixed_rank
        Refuse any rank other than the global one (equal-rank rules).
    strategy
        Rule name, for error messages.
    """

    factors: Mapping[str, LoraFactors]
    lora_alpha: float
    rslora: bool
    split: Literal["b", "balanced"]
    fixed_rank: bool
    strategy: str

    def __call__(self, rank: int) -> dict[str, LoraFactors]:
        """Return ``module -> factors`` for a client of rank ``rank``."""
        scale = scale_for_rank(rank, self.lora_alpha, self.rslora)
        out: dict[str, LoraFactors] = {}
        for module in sorted(self.factors):
            g = self.factors[module]
            if self.fixed_rank and rank != g.rank:
                raise ValueError(
                    f"{self.strategy} keeps one rank for all clients: module {module!r} has "
                    f"rank {g.rank}, a client of rank {rank} cannot load it; configure every "
                    f"client with r={g.rank} or use a rule that accepts mixed ranks"
                )
            ratio = g.scale / scale
            a = _fit(g.a, rank, axis=0)  # (rank, n)
            b = _fit(g.b, rank, axis=1)  # (m, rank)
            if self.split == "b":
                b = b * ratio
            else:
                root = math.sqrt(ratio)
                a, b = a * root, b * root
            out[module] = LoraFactors(a=a.astype(g.a.dtype), b=b.astype(g.b.dtype), scale=scale)
        return out


@dataclass(frozen=True)
class FreshInitView:
    """A fresh adapter initialised like PEFT's default LoRA.

    ``A ~ U(-1/sqrt(n), 1/sqrt(n))`` — the bound of PEFT's
    ``kaiming_uniform_(a=sqrt(5))`` on a ``(r, n)`` weight — and ``B = 0``,
    so the adapter starts at ``ΔW = 0``. Each module draws from
    ``np.random.default_rng([seed, crc32(module)])``; rows are drawn in
    order, so a rank-``r`` adapter is the prefix of any larger one.

    Parameters
    ----------
    shapes
        ``module -> (out_features, in_features)``.
    lora_alpha
        Clients' ``lora_alpha``.
    rslora
        Clients use rsLoRA scaling.
    seed
        Per-round seed shared by all clients.
    dtype
        Output dtype.
    """

    shapes: Mapping[str, tuple[int, int]]
    lora_alpha: float
    rslora: bool
    seed: int
    dtype: np.dtype

    def __call__(self, rank: int) -> dict[str, LoraFactors]:
        """Return ``module -> factors`` for a client of rank ``rank``."""
        scale = scale_for_rank(rank, self.lora_alpha, self.rslora)
        out: dict[str, LoraFactors] = {}
        for module in sorted(self.shapes):
            out_features, in_features = self.shapes[module]
            rng = np.random.default_rng([self.seed, zlib.crc32(module.encode("utf-8"))])
            bound = 1.0 / math.sqrt(in_features)
            a = rng.uniform(-bound, bound, size=(rank, in_features))  # (r, n)
            b = np.zeros((out_features, rank))  # (m, r)
            out[module] = LoraFactors(a=a.astype(self.dtype), b=b.astype(self.dtype), scale=scale)
        return out


def _fit(x: np.ndarray, rank: int, *, axis: int) -> np.ndarray:
    """First ``rank`` entries of ``x`` along ``axis``, zero-padded if ``x`` is shorter."""
    have = x.shape[axis]
    if rank <= have:
        return np.take(x, np.arange(rank), axis=axis).astype(np.float64)
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, rank - have)
    return np.pad(x.astype(np.float64), pad)
