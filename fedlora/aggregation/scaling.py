"""LoRA scaling factors.

Standard LoRA (Hu et al. 2021) scales the update by ``alpha / r``; rsLoRA
(Kalajdzievski 2023, arXiv 2312.03732) by ``alpha / sqrt(r)``. Rules that mix
ranks must fold these scales into the factors, because ``B_k`` of a rank-4
client and of a rank-16 client are multiplied by different numbers.
"""

from __future__ import annotations

import math
import numbers


def scale_for_rank(rank: int, alpha: float, rslora: bool = False) -> float:
    """Return the LoRA scaling of a module of rank ``rank``.

    Parameters
    ----------
    rank
        LoRA rank, a positive integer.
    alpha
        ``lora_alpha``, positive and finite.
    rslora
        Use ``alpha / sqrt(rank)`` instead of ``alpha / rank``.

    Returns
    -------
    float
        The factor ``s`` in ``ΔW = s · B @ A``.
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora_alpha must be positive and finite, got {alpha!r}")
    return float(alpha) / (math.sqrt(rank) if rslora else int(rank))


def alpha_from_scale(scale: float, rank: int, rslora: bool = False) -> float:
    """Invert :func:`scale_for_rank`: the ``lora_alpha`` implied by a scale.

    Parameters
    ----------
    scale
        Observed scaling of a module.
    rank
        Its LoRA rank.
    rslora
        Whether the scale follows rsLoRA.

    Returns
    -------
    float
        ``scale · rank`` (or ``scale · sqrt(rank)`` under rsLoRA).
    """
    return float(scale) * (math.sqrt(rank) if rslora else rank)
