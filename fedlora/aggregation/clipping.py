"""Adaptive clipping of client updates to a quantile of their norms (Andrew et al. 2021).

The clip bound ``C`` follows the ``γ``-quantile of the update norms without knowing their scale
in advance: after each round, with ``b`` the fraction of updates whose norm was at most ``C``,

    C ← C · exp(−η (b − γ))

so ``C`` shrinks while more than a ``γ`` fraction of the updates fit under it and grows while
fewer do (the geometric update of TensorFlow Federated's quantile-based adaptive clipping,
here without the noise that DP would add to ``b``). Updates above ``C`` are scaled down to
``C`` in the round they arrive; the new ``C`` applies from the next round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class AdaptiveClip:
    """State of the adaptive bound; ``bound`` is the clip norm of the coming round."""

    bound: float
    quantile: float = 0.5
    learning_rate: float = 0.2

    def __post_init__(self) -> None:
        if not self.bound > 0:
            raise ValueError(f"the initial clip bound must be > 0; got {self.bound}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"the target quantile must be in (0, 1); got {self.quantile}")
        if not self.learning_rate > 0:
            raise ValueError(f"the learning rate must be > 0; got {self.learning_rate}")

    def factors(self, norms: Sequence[float]) -> list[float]:
        """Scale factor per update: ``min(1, C / norm)``."""
        return [1.0 if n <= self.bound else self.bound / n for n in norms]

    def update(self, norms: Sequence[float]) -> float:
        """Move the bound toward the target quantile of this round's norms; returns it."""
        if norms:
            below = sum(n <= self.bound for n in norms) / len(norms)
            self.bound *= math.exp(-self.learning_rate * (below - self.quantile))
        return self.bound

    def state(self) -> dict[str, float]:
        """The clip state a checkpoint keeps (bound, quantile, learning rate), as plain floats."""
        return {"bound": self.bound, "quantile": self.quantile,
                "learning_rate": self.learning_rate}
