"""What a client of a given rank receives from an aggregation result.

A rule picks one view when it builds its
:class:`~fedlora.aggregation.result.AggregationResult`:

* :class:`PrefixView` — slice the global factors to the client's rank and
  refold the scale. Equal-rank rules use it with ``fixed_rank=True``; HetLoRA
  slices ``A[:r]``, ``B[:, :r]`` and folds the scale change into B;
  FlexLoRA's global factors are ordered by singular value, so the slice is
  the best rank-``r`` approximation. Components the global does not carry
  (``r`` above its rank) or carries dead (``A`` row and ``B`` column both
  zero) are handed out re-initialised as PEFT does: ``A`` row drawn from
  :func:`init_rows` with the view's seed, ``B`` column zero. So no client
  ever receives a component whose gradients are exactly zero
  (``∂L/∂B_j ∝ A_j``, ``∂L/∂A_j ∝ B_j``), and ``s · B @ A`` is unchanged.
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
from fedlora.aggregation.patterns import ModulePattern, module_rank, module_scale


class ClientView(Protocol):
    """Maps a client's LoRA rank to the factors it should load.

    The rank is the client's rank (an int; with a :class:`ModulePattern` each module's rank
    follows from it) or the client's rank per module (``module -> rank``)."""

    def __call__(self, rank: int | Mapping[str, int]) -> dict[str, LoraFactors]:
        """Return ``module -> factors`` for a client of rank ``rank``."""
        ...


@dataclass(frozen=True)
class PrefixView:
    """Rank-``r`` prefix of the global factors, refolded to the client's scale.

    For a client of rank ``r`` with scale ``s_r`` and global factors
    ``(A_g, B_g, s_g)``, the client receives ``A = A_g[:r]``,
    ``B = B_g[:, :r]`` with ``s_r · B @ A = s_g · B_g[:, :r] @ A_g[:r]``:
    the ratio ``c = s_g / s_r`` multiplies B (``split="b"``), ``sqrt(c)``
    multiplies both (``split="balanced"``), or A is set to ``INIT_ROW_NORM ·
    A_g[:r]`` and B takes the rest, ``c / INIT_ROW_NORM`` (``split="init-a"``,
    for global A with orthonormal rows: every received A row then has the
    norm of a PEFT-initialised row).

    Components past the global rank, and components whose global A row and
    B column are both exactly zero, are not zero-padded: the client gets a
    fresh ``A`` row (row ``j`` of :func:`init_rows` at ``seed``) and a zero
    ``B`` column, so the component trains (its product is still zero). Rules
    that can keep such components from the previous global do so before the
    view sees them (HetLoRA); the view's re-initialisation is the fallback.

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
    seed
        Seed of the re-initialised rows (the round's aggregation seed).
    pattern
        Per-module ranks and alphas (:mod:`fedlora.aggregation.patterns`), or ``None``: every
        module at the client's rank and ``lora_alpha``.
    """

    factors: Mapping[str, LoraFactors]
    lora_alpha: float
    rslora: bool
    split: Literal["b", "balanced", "init-a"]
    fixed_rank: bool
    strategy: str
    seed: int = 0
    pattern: ModulePattern | None = None

    def __call__(self, rank: int | Mapping[str, int]) -> dict[str, LoraFactors]:
        """Return ``module -> factors`` for a client of rank ``rank``."""
        client_rank = rank
        out: dict[str, LoraFactors] = {}
        for module in sorted(self.factors):
            g = self.factors[module]
            rank = module_rank(self.pattern, module, client_rank)
            scale = module_scale(self.pattern, module, rank, self.lora_alpha, self.rslora)
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
            elif self.split == "init-a":
                a, b = a * INIT_ROW_NORM, b * (ratio / INIT_ROW_NORM)
            else:
                root = math.sqrt(ratio)
                a, b = a * root, b * root
            dead = ~(a.any(axis=1) | b.any(axis=0))  # (rank,): padded or zero in both factors
            if dead.any():
                a[dead] = init_rows(module, rank, a.shape[1], self.seed)[dead]
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
    pattern
        Per-module ranks and alphas, or ``None``.
    """

    shapes: Mapping[str, tuple[int, int]]
    lora_alpha: float
    rslora: bool
    seed: int
    dtype: np.dtype
    pattern: ModulePattern | None = None

    def __call__(self, rank: int | Mapping[str, int]) -> dict[str, LoraFactors]:
        """Return ``module -> factors`` for a client of rank ``rank``."""
        client_rank = rank
        out: dict[str, LoraFactors] = {}
        for module in sorted(self.shapes):
            out_features, in_features = self.shapes[module]
            rank = module_rank(self.pattern, module, client_rank)
            scale = module_scale(self.pattern, module, rank, self.lora_alpha, self.rslora)
            a = init_rows(module, rank, in_features, self.seed)  # (r, n)
            b = np.zeros((out_features, rank))  # (m, r)
            out[module] = LoraFactors(a=a.astype(self.dtype), b=b.astype(self.dtype), scale=scale)
        return out


INIT_ROW_NORM = 1.0 / math.sqrt(3.0)
"""Expected norm of a PEFT-initialised A row: ``n`` entries of ``U(-1/sqrt(n), 1/sqrt(n))``
have ``E‖a‖² = n · 1/(3n) = 1/3``, whatever ``n``."""


def init_rows(module: str, rank: int, in_features: int, seed: int) -> np.ndarray:
    """PEFT-style ``A`` rows ``U(-1/sqrt(n), 1/sqrt(n))``, shape ``(rank, n)``, float64.

    Drawn from ``np.random.default_rng([seed, crc32(module)])`` row by row, so rank ``r``
    is the prefix of any larger draw.
    """
    rng = np.random.default_rng([seed, zlib.crc32(module.encode("utf-8"))])
    bound = 1.0 / math.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(rank, in_features))


def _fit(x: np.ndarray, rank: int, *, axis: int) -> np.ndarray:
    """First ``rank`` entries of ``x`` along ``axis``, zero-padded if ``x`` is shorter."""
    have = x.shape[axis]
    if rank <= have:
        return np.take(x, np.arange(rank), axis=axis).astype(np.float64)
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, rank - have)
    return np.pad(x.astype(np.float64), pad)
