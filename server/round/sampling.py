"""Stage "sample": the nodes of one round, and the rank each trains at."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping

import numpy as np

from fedlora.config import RunConfig
from server.nodes import NodeInfo


def sample(cfg: RunConfig, nodes: list[NodeInfo], server_round: int, dp_enabled: bool,
           dp_samples: dict[int, list[int]]) -> list[NodeInfo]:
    """The nodes of one round: ``clients_per_round`` of them without replacement over
    nodes in partition order, uniformly or ∝ their example counts.

    Without DP the draw is seeded by (seed, round): reproducible. Under DP the ε reported
    is amplified by subsampling, which holds only if nobody can predict the sample, so it
    is drawn from OS entropy (``secrets``) and recorded (partition ids, by round) in
    ``dp_samples`` (updated here), which checkpoints keep: a round asked again, or restored,
    gets the very sample it drew.
    """
    k = cfg.fl.clients_per_round(len(nodes))
    if k == len(nodes):
        return nodes
    if dp_enabled and server_round in dp_samples:
        chosen = set(dp_samples[server_round])
        return [n for n in nodes if n.partition_id in chosen]
    seed = secrets.randbits(128) if dp_enabled else [cfg.fl.seed, server_round]
    rng = np.random.default_rng(seed)
    p = None
    if cfg.fl.sampling == "data-size":
        sizes = np.array([n.num_examples for n in nodes], dtype=np.float64)
        p = sizes / sizes.sum()
    picked = [nodes[i] for i in sorted(rng.choice(len(nodes), size=k, replace=False,
                                                  p=p).tolist())]
    if dp_enabled:
        dp_samples[server_round] = [n.partition_id for n in picked]
    return picked


def current_rank(node: NodeInfo, pruned_ranks: Mapping[int, int]) -> NodeInfo:
    """``node`` at the rank it pruned to (hetlora-prune), else as it announced itself."""
    rank = pruned_ranks.get(node.partition_id, node.rank)
    return node if rank == node.rank else dataclasses.replace(node, rank=rank)


def evaluation_sample(cfg: RunConfig, nodes: list[NodeInfo], server_round: int, k: int
                      ) -> list[NodeInfo]:
    """``k`` of ``nodes`` for federated evaluation, seeded by (seed, round, 1)."""
    if k == len(nodes):
        return nodes[:k]
    rng = np.random.default_rng([cfg.fl.seed, server_round, 1])
    return [nodes[i] for i in sorted(rng.choice(len(nodes), size=k, replace=False).tolist())]


def pruned_ranks(sampled: list[NodeInfo], accepted: list[NodeInfo]) -> dict[int, int]:
    """hetlora-prune: partition → rank of each accepted node whose reply came at a lower rank
    than it was sampled at (``accepted`` at the rank of its reply)."""
    was = {n.node_id: n.rank for n in sampled}
    return {n.partition_id: n.rank for n in accepted if n.rank < was[n.node_id]}
