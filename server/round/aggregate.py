"""Stages "weights", "aggregate" and "adopt": the round's rule over the accepted updates.

Where the rule is a weighted mean of same-shape arrays (fedit, ffa, fedsa, rolora: the linear
equal-rank rules) and the server left every accepted update as it arrived (no clipping, no
central DP noise), the mean is taken on the replies' records themselves
(:func:`fedlora.federation.fastagg.weighted_mean_records`, zero-copy) and adopted like one
update of the total weight, as a secure round's sum is; only validated replies ever reach it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedlora.aggregation import (
    AggregationResult,
    ClientUpdate,
    ServerOptimizer,
    aggregate,
    strategy_info,
)
from fedlora.aggregation.robust import robust_heads
from fedlora.aggregation.weighting import cap_weights
from fedlora.config import RunConfig
from fedlora.federation.fastagg import weighted_mean_records
from fedlora.federation.global_adapter import GlobalAdapter, aggregate_heads, split_arrays
from fedlora.federation.transport import unpack
from server.nodes import NodeInfo
from server.round.plan import RoundPlan
from server.round.replies import Accepted


def capped(cfg: RunConfig, accepted: list[Accepted], record: dict[str, Any]) -> list[Accepted]:
    """Stage "weights": no reply carries more than ``max-weight-fraction`` of the round's
    total weight (:func:`~fedlora.aggregation.weighting.cap_weights`); the number of
    capped replies goes into the metrics line ``record``."""
    counts = [item.update.num_examples for item in accepted]
    weights = cap_weights(counts, cfg.fl.max_weight_fraction)
    if weights == counts:
        return accepted
    limit = cfg.fl.max_weight_fraction * sum(counts)
    record["weight_capped"] = sum(c > limit for c in counts)
    return [dataclasses.replace(item, update=dataclasses.replace(item.update, num_examples=w))
            for item, w in zip(accepted, weights, strict=True)]


def records_to_average(cfg: RunConfig, accepted: list[Accepted]) -> list[ArrayRecord] | None:
    """The accepted replies' records when the round's aggregate is their weighted mean:
    a linear equal-rank rule, and every update as it arrived. ``None`` otherwise."""
    info = strategy_info(cfg.fl.strategy)
    records = [item.record for item in accepted]
    if info.linear and info.equal_ranks and None not in records:
        return [record for record in records if record is not None]
    return None


def apply_rule(cfg: RunConfig, glob: GlobalAdapter, updates: list[ClientUpdate],
               plan: RoundPlan, server_round: int) -> AggregationResult:
    """The round's rule over ``updates`` (its randomness seeded by run seed and round).

    Rules that declare a ``previous`` option get the global adapter before the round
    (HetLoRA keeps the components nobody trained from it), and a ``received`` option
    what each update's client was sent (robust clips the round's change)."""
    info = strategy_info(cfg.fl.strategy)
    options = dict(plan.options)
    if glob.base_init:  # a lower-rank node's upload + the components it holds frozen
        updates = [dataclasses.replace(u, factors=glob.fill_tail(u.factors)) for u in updates]
    if "previous" in info.options:
        options["previous"] = glob.adapter
    if "received" in info.options:  # what each client was sent (the global before)
        options["received"] = [glob.view({m: f.rank for m, f in u.factors.items()})
                               for u in updates]
    return aggregate(cfg.fl.strategy, updates, lora_alpha=glob.lora_alpha,
                     rslora=glob.rslora, max_rank=cfg.fl.max_rank, pattern=glob.pattern,
                     seed=cfg.fl.seed * 100_003 + server_round, **options)


def adopt_mean(cfg: RunConfig, glob: GlobalAdapter, mean: Mapping[str, np.ndarray],
               sent: Mapping[str, np.ndarray], node: NodeInfo, weight: int, plan: RoundPlan,
               server_round: int) -> tuple[AggregationResult, dict[str, np.ndarray], ClientUpdate]:
    """The aggregate of a round whose weighted mean of the uploaded arrays is known.

    The factors that were not sent are filled in from what was sent (as the decoder does
    for one reply), and the whole is a single update of weight ``weight``; every linear
    rule returns such an update unchanged, so ``aggregate`` builds the same kind of result
    (and view) as from the individual replies, and server optimizers apply as usual.
    Returns the result, the mean heads and that update.
    """
    # each module's scale from the rank it arrived at (secure hetlora: every upload was
    # padded to one rank) and its alpha (lora.alpha-pattern)
    factors, heads = split_arrays({**sent, **mean}, glob.scale_of)
    update = ClientUpdate(factors=factors, num_examples=weight)
    return apply_rule(cfg, glob, [update], plan, server_round), heads, update


def aggregate_accepted(cfg: RunConfig, glob: GlobalAdapter, accepted: list[Accepted],
                       sent: Mapping[int, Mapping[str, np.ndarray]], plan: RoundPlan,
                       server_round: int) -> tuple[AggregationResult, dict[str, np.ndarray]]:
    """Stage "aggregate": the rule over the accepted updates (the zero-copy weighted mean
    of their records where that is the rule) and the example-weighted mean heads — under
    ``robust`` the heads go through the rule's own clipping and reducer instead
    (:func:`fedlora.aggregation.robust.robust_heads`), against what each node was sent."""
    updates = [item.update for item in accepted]
    weights = [u.num_examples for u in updates]
    node = accepted[0].node
    records = records_to_average(cfg, accepted)
    if records is not None:
        mean = unpack(weighted_mean_records(records, weights))  # what arrived, as it is
        result, heads, _ = adopt_mean(cfg, glob, mean, sent[node.node_id], node,
                                      sum(weights), plan, server_round)
        return result, heads
    if cfg.fl.strategy == "robust":
        received = [{k: v for k, v in sent[item.node.node_id].items() if k in item.heads}
                    for item in accepted]
        heads = robust_heads([item.heads for item in accepted], received, **plan.options)
    else:
        heads = aggregate_heads([item.heads for item in accepted], weights)
    return apply_rule(cfg, glob, updates, plan, server_round), heads


def adopt(glob: GlobalAdapter, result: AggregationResult, heads: Mapping[str, np.ndarray],
          optimizer: ServerOptimizer | None, rank: int, plan: RoundPlan) -> None:
    """Stage "adopt": the round's result becomes the global adapter (through the server
    optimizer, if any); the factors nobody sent stay as they were."""
    glob.apply(result, heads, optimizer, rank=rank, frozen=plan.frozen)
