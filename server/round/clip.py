"""Stage "clip": bound each accepted update's change (``max-update-norm``, ``clip-update-norm``,
or the adaptive bound tracking the ``clip-quantile`` of the round's update norms)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.aggregation import ClientUpdate, LoraFactors
from fedlora.aggregation.clipping import AdaptiveClip
from fedlora.config import RunConfig
from fedlora.errors import ConfigError, PayloadError
from server.round.replies import Accepted
from server.round.validate import Decoded


def adaptive_clip(cfg: RunConfig, secure: bool) -> AdaptiveClip | None:
    """The adaptive clip bound of ``clip-quantile`` (``None`` when off); a ConfigError with
    secure aggregation, where the server never sees an individual update."""
    fl = cfg.fl
    if fl.clip_quantile <= 0:
        return None
    if secure:
        raise ConfigError("clip-quantile (adaptive clipping on the server) needs to see each "
                          "update; with secure-aggregation use a fixed clip-update-norm, "
                          "which the clients apply themselves")
    return AdaptiveClip(fl.clip_update_norm or 1.0, fl.clip_quantile, fl.clip_learning_rate)


class UpdateBound:
    """Rejects absurd moves and clips large ones, one update at a time; the round's norms
    feed the adaptive bound (:meth:`end_round`)."""

    def __init__(self, cfg: RunConfig, adaptive: AdaptiveClip | None) -> None:
        self.max_update_norm = cfg.fl.max_update_norm
        self.clip_update_norm = cfg.fl.clip_update_norm
        self.adaptive = adaptive
        self.norms: list[float] = []  # this round's update norms, in the order they came

    def accept(self, decoded: Decoded) -> Accepted:
        """A decoded reply within the bounds; it keeps its record only if left unchanged."""
        bounded, heads = self.apply(decoded.update, decoded.heads, decoded.sent_factors,
                                    decoded.sent_heads)
        return Accepted(decoded.node, bounded, heads, decoded.metrics,
                        decoded.record if bounded is decoded.update else None)

    def apply(self, update: ClientUpdate, heads: Mapping[str, np.ndarray],
              sent: Mapping[str, LoraFactors], sent_heads: Mapping[str, np.ndarray]
              ) -> tuple[ClientUpdate, dict[str, np.ndarray]]:
        """The update and heads within the bounds.

        The norm is the Frobenius norm of the whole upload's change: every LoRA factor and
        every head, bias and module to save (``x − x_received``, float64). Clipping moves all
        of them back towards what was received by one factor. Returns the very ``update``
        (and a copy of ``heads``) when neither bound acts.

        Raises PayloadError ``NORM_TOO_LARGE`` above ``max-update-norm``.
        """
        bound = self.adaptive.bound if self.adaptive else self.clip_update_norm
        if not self.max_update_norm and not bound:
            return update, dict(heads)
        squares = 0.0
        for module, f in update.factors.items():
            g = sent[module]
            squares += float(np.sum((f.a.astype(np.float64) - g.a) ** 2))
            squares += float(np.sum((f.b.astype(np.float64) - g.b) ** 2))
        for key, value in heads.items():
            squares += float(np.sum((value.astype(np.float64) - sent_heads[key]) ** 2))
        norm = float(np.sqrt(squares))
        if self.max_update_norm and not norm <= self.max_update_norm:
            raise PayloadError("NORM_TOO_LARGE", f"the upload (factors and heads) moved by "
                               f"{norm:.3g} (Frobenius); max-update-norm is "
                               f"{self.max_update_norm}")
        self.norms.append(norm)
        if not bound or norm <= bound:
            return update, dict(heads)
        keep = bound / norm
        clipped = {m: LoraFactors(a=(sent[m].a + keep * (f.a - sent[m].a)).astype(f.a.dtype),
                                  b=(sent[m].b + keep * (f.b - sent[m].b)).astype(f.b.dtype),
                                  scale=f.scale) for m, f in update.factors.items()}
        clipped_heads = {k: (sent_heads[k] + keep * (v - sent_heads[k])).astype(np.float32)
                         for k, v in heads.items()}
        return ClientUpdate(factors=clipped, num_examples=update.num_examples), clipped_heads

    def end_round(self) -> float | None:
        """The adaptive bound this round used (``None`` without one), which then adapts to
        the round's norms; the norms are cleared for the next round."""
        bound = None
        if self.adaptive is not None:
            bound = self.adaptive.bound
            self.adaptive.update(self.norms)
        self.norms = []
        return bound
