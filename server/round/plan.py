"""Stage "plan": what one round asks of the clients, and what a round needs to count."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedlora.aggregation import ServerOptimizer, strategy_info
from fedlora.config import RunConfig
from fedlora.errors import ConfigError


@dataclass
class RoundPlan:
    """What one round asks of the clients (by rule and round)."""

    trainable: str = "ab"
    send: str = "ab"
    personal: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def frozen(self) -> str:
        """The factors nobody sent back this round (``"ab"`` minus ``send``)."""
        return "".join(sorted(set("ab") - set(self.send)))


def round_plan(cfg: RunConfig, server_round: int) -> RoundPlan:
    """The factors trained, sent and kept personal in ``server_round``, and the rule's options."""
    name = cfg.fl.strategy
    if name in ("ffa", "fedsvd"):  # A frozen at what the node received, only B trained
        return RoundPlan(trainable="b", send="b")
    if name == "fedsa":
        return RoundPlan(send="a", personal="b")
    if name == "rolora":
        first = cfg.fl.rolora_first_phase
        phase = first if server_round % 2 == 1 else ("a" if first == "b" else "b")
        return RoundPlan(trainable=phase, send=phase, options={"phase": phase})
    if name == "hetlora":
        return RoundPlan(options={"weight_by_examples": cfg.fl.hetlora_weight_by_examples})
    if name == "lora-fair":
        return RoundPlan(options={"lambda_": cfg.fl.lora_fair_lambda})
    if name == "flexlora":
        return RoundPlan(options={"split": cfg.fl.flexlora_split})
    if name == "robust":
        return RoundPlan(options={"reducer": cfg.fl.robust_reducer, "trim": cfg.fl.robust_trim,
                                  "clip_multiplier": cfg.fl.robust_clip_multiplier})
    return RoundPlan()


def build_optimizer(cfg: RunConfig) -> ServerOptimizer | None:
    """The server optimizer of ``server-optimizer``, or ``None``; a ConfigError for a rule
    whose aggregate is no weighted mean of equal-rank factors."""
    fl = cfg.fl
    if fl.server_optimizer == "none":
        return None
    info = strategy_info(fl.strategy)
    if not info.linear or not info.equal_ranks or info.refactors:
        raise ConfigError(
            f"server-optimizer {fl.server_optimizer!r} works on the weighted mean of equal-rank "
            f"factors; strategy {fl.strategy!r} is not such a rule (use fedit, ffa, fedsa or "
            f"rolora, or server-optimizer = 'none')"
            + (" — fedsvd replaces A by a rotation every round, so new − previous is no "
               "pseudo-gradient" if info.refactors else "")
        )
    return ServerOptimizer(
        fl.server_optimizer, lr=fl.server_lr or None,
        momentum=fl.server_momentum if fl.server_optimizer == "fedavgm" else 0.0,
        beta_1=fl.server_beta_1, beta_2=fl.server_beta_2, tau=fl.server_tau,
    )


def needed(cfg: RunConfig, sampled: int) -> int:
    """Accepted updates a round of ``sampled`` nodes needs (min-accepted[-fraction])."""
    return max(cfg.fl.min_accepted, math.ceil(cfg.fl.min_accepted_fraction * sampled))
