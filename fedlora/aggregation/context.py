"""Per-round facts shared by every aggregation rule.

:class:`RoundContext` is built once by :func:`fedlora.aggregation.aggregate`
from the validated updates and the common options, so rules receive plain,
checked values: example weights, resolved ``lora_alpha``, module shapes and
the output dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.patterns import ModulePattern, module_scale
from fedlora.aggregation.scaling import alpha_from_scale
from fedlora.aggregation.weighting import example_weights, output_dtype


@dataclass(frozen=True)
class RoundContext:
    """Checked inputs of one aggregation round.

    Parameters
    ----------
    lora_alpha
        ``lora_alpha`` defining the global scale ``s_g = scale_for_rank(r, alpha)``.
    rslora
        Scales follow rsLoRA (``alpha / sqrt(r)``).
    seed
        Seed for any fresh random initialisation (pass a per-round value).
    max_rank
        Largest rank accepted from or given to clients, or ``None``.
    weights
        ``p_k = n_k / Σ n``, shape ``(K,)``, float64.
    shapes
        ``module -> (out_features, in_features)``.
    dtype
        Floating dtype of the outputs.
    pattern
        Per-module ranks and alphas (:class:`~fedlora.aggregation.patterns.ModulePattern`),
        or ``None``; rules read a module's alpha through :meth:`scale`.
    """

    lora_alpha: float
    rslora: bool
    seed: int
    max_rank: int | None
    weights: np.ndarray
    shapes: Mapping[str, tuple[int, int]]
    dtype: np.dtype
    pattern: ModulePattern | None = None

    @property
    def modules(self) -> tuple[str, ...]:
        """Module names, sorted."""
        return tuple(sorted(self.shapes))

    def scale(self, rank: int, module: str | None = None) -> float:
        """Global LoRA scale of a rank-``rank`` adapter of ``module`` (its alpha-pattern
        alpha, else ``lora_alpha``; ``module=None``: ``lora_alpha``)."""
        pattern = self.pattern if module is not None else None
        return module_scale(pattern, module or "", rank, self.lora_alpha, self.rslora)

    @staticmethod
    def factors_of(updates: Sequence[ClientUpdate], module: str) -> list[LoraFactors]:
        """One module's factors across clients, in aggregation order."""
        return [u.factors[module] for u in updates]


def build_context(
    updates: Sequence[ClientUpdate],
    shapes: Mapping[str, tuple[int, int]],
    *,
    lora_alpha: float | None,
    rslora: bool,
    seed: int,
    max_rank: int | None,
    pattern: ModulePattern | None = None,
) -> RoundContext:
    """Resolve the common options against validated updates.

    Parameters
    ----------
    updates
        Validated updates, in aggregation order.
    shapes
        ``module -> (out_features, in_features)`` from validation.
    lora_alpha
        Explicit ``lora_alpha``, or ``None`` to infer ``s·r`` (``s·sqrt(r)``
        under rsLoRA) from the first update's first module (sorted).
    rslora
        Whether scales follow rsLoRA.
    seed
        Non-negative integer seed.
    max_rank
        Positive integer or ``None``.
    pattern
        Per-module ranks and alphas, or ``None``.

    Returns
    -------
    RoundContext
    """
    check_common_options(lora_alpha=lora_alpha, rslora=rslora, seed=seed, max_rank=max_rank)
    if lora_alpha is None and pattern is not None and pattern.alphas:
        raise ValueError("lora_alpha=None infers alpha from one module's scale, which an alpha "
                         "pattern makes ambiguous; pass lora_alpha (the unpatterned modules')")
    if lora_alpha is None:
        first = updates[0].factors[min(updates[0].factors)]
        lora_alpha = alpha_from_scale(first.scale, first.rank, rslora)
    arrays = [x for u in updates for f in u.factors.values() for x in (f.a, f.b)]
    return RoundContext(
        lora_alpha=float(lora_alpha),
        rslora=rslora,
        seed=int(seed),
        max_rank=None if max_rank is None else int(max_rank),
        weights=example_weights(updates),
        shapes=dict(shapes),
        dtype=output_dtype(arrays),
        pattern=pattern,
    )


def check_common_options(
    *, lora_alpha: float | None, rslora: bool, seed: int, max_rank: int | None,
    pattern: ModulePattern | None = None,
) -> None:
    """Reject ill-typed or out-of-range common options before any update is inspected.

    Raises
    ------
    TypeError
        ``rslora`` is not a bool.
    ValueError
        ``lora_alpha`` not positive and finite, ``seed`` not a non-negative
        integer, or ``max_rank`` not a positive integer.
    """
    if not isinstance(rslora, bool):
        raise TypeError(f"rslora must be a bool, got {rslora!r}")
    if pattern is not None and not isinstance(pattern, ModulePattern):
        raise TypeError(f"pattern must be a ModulePattern or None, got {type(pattern).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if max_rank is not None and (
        isinstance(max_rank, bool) or not isinstance(max_rank, numbers.Integral) or max_rank < 1
    ):
        raise ValueError(f"max_rank must be a positive integer or None, got {max_rank!r}")
    if lora_alpha is not None and (
        isinstance(lora_alpha, bool)
        or not isinstance(lora_alpha, numbers.Real)
        or not math.isfinite(lora_alpha)
        or lora_alpha <= 0
    ):
        raise ValueError(f"lora_alpha must be a positive finite number or None, got {lora_alpha!r}")
