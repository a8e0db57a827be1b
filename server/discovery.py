"""Discovery, once per run: wait for the nodes, ask each for its partition and LoRA rank,
admit the ones a run can use (and, with ``sign-updates``, learn their signing keys).

The capability query is the only message every node receives; rounds then address sampled
nodes only.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedlora.aggregation import mixed_rank_strategies, strategy_info
from fedlora.config import BASE_INIT_MIXED_RANKS, RunConfig
from fedlora.errors import ConfigError, PayloadError
from fedlora.privacy import signed_wire
from fedlora.privacy.secagg.signing import UpdateVerifier
from server.nodes import NodeInfo
from server.round.replies import last_line

# capability queries in flight at once: Flower's in-memory SuperLink scans its whole message
# store for every node it polls, so one query per node at once costs O(nodes^2) per poll
DISCOVERY_BATCH = 100


def wait_for_nodes(cfg: RunConfig, grid: Grid) -> list[int]:
    """The connected node ids once ``min-available-nodes`` are there (or at round-timeout)."""
    deadline = time.monotonic() + cfg.fl.round_timeout
    node_ids: list[int] = []
    while time.monotonic() < deadline:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= cfg.fl.min_available_nodes:
            break
        log(INFO, "Waiting for nodes: %d of %d connected", len(node_ids),
            cfg.fl.min_available_nodes)
        time.sleep(2.0)
    if not node_ids:
        raise RuntimeError("no node connected before round-timeout")
    return node_ids


def query_capabilities(cfg: RunConfig, grid: Grid, node_ids: list[int]
                       ) -> tuple[list[NodeInfo], dict[int, dict[str, Any]], list[str]]:
    """Ask every node, ``DISCOVERY_BATCH`` at a time, for its capabilities. Returns the nodes
    that answered well, what each announced (by node id), and one line per failed node
    (logged: one boundary per answer, a bad one drops its node, never the run)."""
    by_size = cfg.fl.sampling == "data-size"
    nodes, errors, announced = [], [], {}
    for start in range(0, len(node_ids), DISCOVERY_BATCH):
        msgs = [Message(RecordDict({"q": ConfigRecord({"num-examples": by_size})}),
                        dst_node_id=n, message_type="query.capabilities")
                for n in node_ids[start:start + DISCOVERY_BATCH]]
        for reply in grid.send_and_receive(msgs, timeout=cfg.fl.round_timeout):
            try:
                node, caps = capabilities(cfg, reply, by_size)
            except Exception as exc:  # noqa: BLE001
                reason = exc.reason if isinstance(exc, PayloadError) else "MALFORMED"
                errors.append(f"node {reply.metadata.src_node_id}: [{reason}] "
                              f"{last_line(str(exc))[:300]}")
                continue
            nodes.append(node)
            announced[node.node_id] = caps
    for err in errors:
        log(WARNING, "Capability query failed on %s; the node takes no part in the run", err)
    return nodes, announced, errors


def capabilities(cfg: RunConfig, reply: Message, by_size: bool
                 ) -> tuple[NodeInfo, dict[str, Any]]:
    """One node's answer to the capability query, every field type- and range-checked.

    Raises
    ------
    PayloadError
        ``CLIENT_ERROR`` (the node failed), ``MALFORMED`` (no ``caps`` ConfigRecord),
        ``BAD_CAPS`` (a partition id, rank or example count that is not an int in range).
    """
    if reply.has_error():
        raise PayloadError("CLIENT_ERROR", str(reply.error.reason))
    caps = reply.content.get("caps")
    if not isinstance(caps, ConfigRecord):
        raise PayloadError("MALFORMED", f"the answer carries no 'caps' ConfigRecord "
                           f"(got {type(caps).__name__})")
    caps = dict(caps)
    fields = {"partition-id": (0, 1 << 31), "lora-rank": (1, cfg.fl.max_rank)}
    if by_size:
        fields["num-examples"] = (1, cfg.fl.max_examples)
    for key, (low, high) in fields.items():
        value = caps.get(key)
        if type(value) is not int or not low <= value <= high:
            raise PayloadError("BAD_CAPS", f"{key} must be an int in {low}..{high} "
                               f"(max-rank / max-examples), got {str(value)[:40]!r}")
    node = NodeInfo(reply.metadata.src_node_id, caps["partition-id"], caps["lora-rank"],
                    caps.get("num-examples", 0) if by_size else 0)
    return node, caps


def admit(cfg: RunConfig, nodes: Iterable[NodeInfo]) -> list[NodeInfo]:
    """The nodes a run can use, in partition order; the others are dropped, logged.

    One node per partition (the first by node id). A run config whose rank-by-partition
    mixes ranks under a rule that needs equal ranks is a ConfigError. Otherwise, under such
    a rule, the rank most nodes announced (ties: the run config's ``lora.r``, then the smaller):
    a node announcing another is dropped, not the run.
    """
    kept: list[NodeInfo] = []
    for node in sorted(nodes, key=lambda n: (n.partition_id, n.node_id)):
        if kept and kept[-1].partition_id == node.partition_id:
            log(WARNING, "Node %d announces partition %d, already taken by node %d: "
                "dropped (DUPLICATE_PARTITION)", node.node_id, node.partition_id,
                kept[-1].node_id)
            continue
        kept.append(node)
    equal_ranks = strategy_info(cfg.fl.strategy).equal_ranks
    configured = sorted({cfg.rank_for_partition(n.partition_id) for n in kept})
    if len(configured) > 1 and equal_ranks:  # the run config itself, not a node
        raise ConfigError(
            f"strategy {cfg.fl.strategy!r} needs every client at the same LoRA rank, "
            f"but rank-by-partition gives the nodes ranks {configured}; use one rank or a "
            f"rule that accepts mixed ranks: {', '.join(mixed_rank_strategies())}")
    ranks = Counter(n.rank for n in kept)
    if len(ranks) <= 1 or not equal_ranks:
        return kept
    rank = max(ranks, key=lambda r: (ranks[r], r == cfg.lora.r, -r))
    for node in kept:
        if node.rank != rank:
            log(WARNING, "Partition %d (node %d) announces LoRA rank %d; strategy %r "
                "needs every client at one rank (%d here, or use a rule that accepts "
                "mixed ranks: %s): dropped (RANK_MISMATCH)", node.partition_id,
                node.node_id, node.rank, cfg.fl.strategy, rank,
                ", ".join(mixed_rank_strategies()))
    return [n for n in kept if n.rank == rank]


def base_init_nodes(cfg: RunConfig, nodes: list[NodeInfo], init_rank: int) -> list[NodeInfo]:
    """Under a base-dependent init: nodes above the init's rank are dropped (RANK_MISMATCH:
    no residual for them), and mixed declared ranks need a rule that completes their uploads
    (the run config's own ranks were checked at start-up)."""
    for node in nodes:
        if node.rank > init_rank:
            log(WARNING, "Partition %d (node %d) announces LoRA rank %d; lora.init = %s was "
                "computed at rank %d (lora.r / rank-by-partition): dropped (RANK_MISMATCH)",
                node.partition_id, node.node_id, node.rank, cfg.lora.init, init_rank)
    nodes = [n for n in nodes if n.rank <= init_rank]
    ranks = sorted({n.rank for n in nodes})
    if len(ranks) > 1 and (cfg.fl.strategy not in BASE_INIT_MIXED_RANKS
                           or cfg.fl.secure_aggregation):
        raise ConfigError(f"lora.init = {cfg.lora.init}: the nodes announce ranks {ranks}; "
                          f"mixed ranks run with {', '.join(BASE_INIT_MIXED_RANKS)} without "
                          f"secure-aggregation (strategy {cfg.fl.strategy!r}); give every node "
                          f"one lora-rank or set lora.init = default")
    return nodes


def signature_verifier(run_id: int, nodes: list[NodeInfo],
                       announced: Mapping[int, Mapping[str, Any]],
                       registered: Collection[bytes] | None
                       ) -> tuple[UpdateVerifier, dict[int, bytes]]:
    """Verifier of this run's signed updates, with the key each node announced and proved
    (only ``registered`` keys when ``signing-keys`` names a directory), and those keys."""
    keys, problems = signed_wire.node_keys(run_id, announced, registered)
    for node in nodes:
        if node.node_id in problems:
            log(WARNING, "Partition %d (node %d) has no signing key: %s; each of its "
                "updates will be rejected (UNKNOWN_NODE)", node.partition_id, node.node_id,
                problems[node.node_id])
    trust = "registered keys" if registered is not None else "trust on first use"
    log(INFO, "fedlora: signed updates, %d of %d node keys (%s)", len(keys), len(nodes), trust)
    return UpdateVerifier(str(run_id), keys), keys
