"""Thin Flower adapter around fedlora's pure aggregation rules.

One round: sample nodes (seeded) → one Message per node with the arrays of *its* rank and its own
config copy → ``grid.send_and_receive`` → verify each reply's signature (``sign-updates``), then
validate and decode it (a bad reply is rejected with a reason, never the run) →
``fedlora.aggregation.aggregate`` in partition order → adopt the result (optionally through a
server optimizer) → evaluate → one metrics line.

Where the rule is a weighted mean of same-shape arrays (fedit, ffa, fedsa, rolora: the linear
equal-rank rules) and the server left every accepted update as it arrived (no clipping, no
central DP noise), the mean is taken on the replies' records themselves
(:func:`fedlora.federation.fastagg.weighted_mean_records`, zero-copy) and adopted like one update
of the
total weight, as a secure round's sum is; only validated replies ever reach it.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedlora.aggregation import (
    AggregationResult,
    ClientUpdate,
    LoraFactors,
    ServerOptimizer,
    UpdateRejected,
    aggregate,
    mixed_rank_strategies,
    strategy_info,
    validate_update,
)
from fedlora.aggregation.clipping import AdaptiveClip
from fedlora.aggregation.diagnostics import tier_diagnostics
from fedlora.aggregation.robust import robust_heads
from fedlora.aggregation.weighting import cap_weights
from fedlora.config import BASE_INIT_MIXED_RANKS, RunConfig, to_flat
from fedlora.errors import ConfigError, PayloadError
from fedlora.federation import checkpoint, wire_schema
from fedlora.federation.fastagg import weighted_mean_records
from fedlora.federation.global_adapter import GlobalAdapter, aggregate_heads, split_arrays
from fedlora.federation.outputs import client_memory, rss_mb
from fedlora.federation.transport import nbytes, pack, pack_correction, unpack
from fedlora.federation.wire_schema import select_outgoing
from fedlora.learning import hetlora_prune
from fedlora.privacy import dp as privacy
from fedlora.privacy import secure_hetlora, signed_wire
from fedlora.privacy.secagg.signing import SignatureRejected, UpdateVerifier
from server.nodes import NodeInfo
from server.secure_round import SecureOutcome, SecureRound

# capability queries in flight at once: Flower's in-memory SuperLink scans its whole message
# store for every node it polls, so one query per node at once costs O(nodes^2) per poll
DISCOVERY_BATCH = 100

# keys that may differ between a run and its resumption
RESUMABLE_KEYS = ("num-server-rounds", "round-timeout", "resume", "output-dir")


def config_digest(cfg: RunConfig) -> str:
    return checkpoint.config_digest(to_flat(cfg), ignore=RESUMABLE_KEYS)


@dataclass(frozen=True)
class Accepted:
    """A validated reply, ready to be aggregated.

    ``record`` is the reply's ``arrays`` record when ``update`` and ``heads`` are exactly its
    values, and ``None`` once the server changed them (clipping, central DP noise).
    """

    node: NodeInfo
    update: ClientUpdate
    heads: dict[str, np.ndarray]
    metrics: dict[str, Any]
    record: ArrayRecord | None


@dataclass
class Outgoing:
    """A round's train messages, the arrays each node received (by node id), and their size."""

    start_version: int
    messages: list[Message] = field(default_factory=list)
    sent: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    bytes_down: int = 0


@dataclass
class Received:
    """What the per-reply boundary made of a round's replies."""

    accepted: list[Accepted] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    bytes_up: int = 0

    def reject(self, reason: str, server_round: int, reply: Message,
               by_id: Mapping[int, NodeInfo], why: object) -> None:
        """Count one rejected reply under ``reason`` and log why (the run goes on)."""
        self.rejected[reason] += 1
        node = by_id.get(reply.metadata.src_node_id)
        who = (f"partition {node.partition_id}" if node is not None
               else f"node {reply.metadata.src_node_id}")
        log(WARNING, "Round %d: rejected the update of %s (%s): %s", server_round, who, reason,
            why)


@dataclass
class RoundPlan:
    """What one round asks of the clients (by rule and round)."""

    trainable: str = "ab"
    send: str = "ab"
    personal: str = ""
    options: dict[str, Any] = field(default_factory=dict)


def round_plan(cfg: RunConfig, server_round: int) -> RoundPlan:
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


class FederatedLora:
    """Runs the federated rounds of one strategy on a Flower ``Grid``.

    Parameters
    ----------
    cfg
        The validated run configuration.
    glob
        The global adapter (initial state), updated in place round by round.
    evaluate_fn
        Central evaluation of the global model, or ``None`` when the server has no data.
    log_round
        Receives one metrics record per round (``metrics.jsonl``).
    after_round
        Called with the round and the global adapter after each round's metrics line.
    run_id
        Flower's run id, which signed updates are bound to (``sign-updates``).
    """

    def __init__(self, cfg: RunConfig, glob: GlobalAdapter,
                 evaluate_fn: Callable[[GlobalAdapter], dict[str, float] | None],
                 log_round: Callable[[dict[str, Any]], None], run_id: int = 0,
                 after_round: Callable[[int, GlobalAdapter], None] | None = None) -> None:
        self.cfg = cfg
        self.after_round = after_round  # per-round extras (samples.jsonl, eval.tasks)
        self.run_id = run_id
        self.glob = glob
        self.evaluate_fn = evaluate_fn
        self.log_round = log_round
        self.optimizer = build_optimizer(cfg)
        self.info = strategy_info(cfg.fl.strategy)
        self.personal_saved: int | None = None  # FedSA: nodes that saved a personal adapter
        self.base_version: dict[int, int] = {}  # partition -> corrections applied
        self.secure = SecureRound(cfg) if cfg.fl.secure_aggregation else None
        self.adaptive_clip = (AdaptiveClip(cfg.fl.clip_update_norm or 1.0, cfg.fl.clip_quantile,
                                           cfg.fl.clip_learning_rate)
                              if cfg.fl.clip_quantile > 0 else None)
        if self.adaptive_clip is not None and self.secure is not None:
            raise ConfigError("clip-quantile (adaptive clipping on the server) needs to see each "
                              "update; with secure-aggregation use a fixed clip-update-norm, "
                              "which the clients apply themselves")
        self._round_norms: list[float] = []
        self.dp = privacy.check_config(cfg)
        self.accountant: privacy.Accountant | None = None
        self.releases: privacy.ReleaseLog | None = None  # with DP and checkpoints
        # the registered signing keys (None: trust each node's announced key on first use)
        self.registered = (signed_wire.registered_keys(cfg.fl.signing_keys)
                           if cfg.fl.signing_keys else None)
        self.verifier: UpdateVerifier | None = None  # set by discover() with sign-updates
        self.signing_public_keys: dict[int, bytes] = {}  # node → Ed25519 key, ditto
        self.dp_samples: dict[int, list[int]] = {}  # DP: each round's drawn partitions
        self.pruned_ranks: dict[int, int] = {}  # hetlora-prune: partition -> its current rank

    # ------------------------------------------------------------------ discovery

    def discover(self, grid: Grid) -> list[NodeInfo]:
        """Wait for the nodes and ask each, once per run, for its partition and LoRA rank
        (and its number of training examples when sampling by data size).

        The only message every node receives; rounds then address sampled nodes only.
        """
        deadline = time.monotonic() + self.cfg.fl.round_timeout
        node_ids: list[int] = []
        while time.monotonic() < deadline:
            node_ids = sorted(grid.get_node_ids())
            if len(node_ids) >= self.cfg.fl.min_available_nodes:
                break
            log(INFO, "Waiting for nodes: %d of %d connected", len(node_ids),
                self.cfg.fl.min_available_nodes)
            time.sleep(2.0)
        if not node_ids:
            raise RuntimeError("no node connected before round-timeout")
        by_size = self.cfg.fl.sampling == "data-size"
        nodes, errors, announced = [], [], {}
        for start in range(0, len(node_ids), DISCOVERY_BATCH):
            msgs = [Message(RecordDict({"q": ConfigRecord({"num-examples": by_size})}),
                            dst_node_id=n, message_type="query.capabilities")
                    for n in node_ids[start:start + DISCOVERY_BATCH]]
            for reply in grid.send_and_receive(msgs, timeout=self.cfg.fl.round_timeout):
                try:  # one boundary per answer: a bad one drops its node, never the run
                    node, caps = self._capabilities(reply, by_size)
                except Exception as exc:  # noqa: BLE001
                    reason = exc.reason if isinstance(exc, PayloadError) else "MALFORMED"
                    errors.append(f"node {reply.metadata.src_node_id}: [{reason}] "
                                  f"{_last_line(str(exc))[:300]}")
                    continue
                nodes.append(node)
                announced[node.node_id] = caps
        for err in errors:
            log(WARNING, "Capability query failed on %s; the node takes no part in the run", err)
        nodes = self.admit(nodes)
        if not nodes:
            raise RuntimeError(f"no node answered the capability query: {errors}")
        if self.cfg.fl.sign_updates:
            self.verifier = self._signature_verifier(nodes, announced)
        return nodes

    def _signature_verifier(self, nodes: list[NodeInfo],
                            announced: Mapping[int, Mapping[str, Any]]) -> UpdateVerifier:
        """Verifier of this run's signed updates, with the key each node announced and proved
        (only registered keys when ``signing-keys`` names a directory)."""
        keys, problems = signed_wire.node_keys(self.run_id, announced, self.registered)
        self.signing_public_keys = keys  # secure aggregation: vouches for each node's keys
        for node in nodes:
            if node.node_id in problems:
                log(WARNING, "Partition %d (node %d) has no signing key: %s; each of its "
                    "updates will be rejected (UNKNOWN_NODE)", node.partition_id, node.node_id,
                    problems[node.node_id])
        trust = "registered keys" if self.registered is not None else "trust on first use"
        log(INFO, "fedlora: signed updates, %d of %d node keys (%s)", len(keys), len(nodes),
            trust)
        return UpdateVerifier(str(self.run_id), keys)

    def verify_signature(self, content: RecordDict, node_id: int, server_round: int) -> None:
        """Check a signed reply before anything is decoded (no-op without sign-updates).

        Raises :class:`~fedlora.privacy.secagg.signing.SignatureRejected` with a reason code.
        """
        if self.verifier is not None:
            signed_wire.verify_reply(self.verifier, content, node_id, server_round)

    def _capabilities(self, reply: Message, by_size: bool) -> tuple[NodeInfo, dict[str, Any]]:
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
        fields = {"partition-id": (0, 1 << 31), "lora-rank": (1, self.cfg.fl.max_rank)}
        if by_size:
            fields["num-examples"] = (1, self.cfg.fl.max_examples)
        for key, (low, high) in fields.items():
            value = caps.get(key)
            if type(value) is not int or not low <= value <= high:
                raise PayloadError("BAD_CAPS", f"{key} must be an int in {low}..{high} "
                                   f"(max-rank / max-examples), got {str(value)[:40]!r}")
        node = NodeInfo(reply.metadata.src_node_id, caps["partition-id"], caps["lora-rank"],
                        caps.get("num-examples", 0) if by_size else 0)
        return node, caps

    def admit(self, nodes: Iterable[NodeInfo]) -> list[NodeInfo]:
        """The nodes a run can use, in partition order; the others are dropped, logged.

        One node per partition (the first by node id). A run config whose rank-by-partition
        mixes ranks under a rule that needs equal ranks is a ConfigError. Otherwise, under such
        a rule, the rank most nodes announced (ties: the run config's ``lora.r``, then the smaller):
        a node announcing another is dropped, not the run.
        """
        ordered = sorted(nodes, key=lambda n: (n.partition_id, n.node_id))
        kept: list[NodeInfo] = []
        for node in ordered:
            if kept and kept[-1].partition_id == node.partition_id:
                log(WARNING, "Node %d announces partition %d, already taken by node %d: "
                    "dropped (DUPLICATE_PARTITION)", node.node_id, node.partition_id,
                    kept[-1].node_id)
                continue
            kept.append(node)
        configured = sorted({self.cfg.rank_for_partition(n.partition_id) for n in kept})
        if len(configured) > 1 and self.info.equal_ranks:  # the run config itself, not a node
            raise ConfigError(
                f"strategy {self.cfg.fl.strategy!r} needs every client at the same LoRA rank, "
                f"but rank-by-partition gives the nodes ranks {configured}; use one rank or a "
                f"rule that accepts mixed ranks: {', '.join(mixed_rank_strategies())}")
        ranks = Counter(n.rank for n in kept)
        if len(ranks) > 1 and self.info.equal_ranks:
            rank = max(ranks, key=lambda r: (ranks[r], r == self.cfg.lora.r, -r))
            for node in kept:
                if node.rank != rank:
                    log(WARNING, "Partition %d (node %d) announces LoRA rank %d; strategy %r "
                        "needs every client at one rank (%d here, or use a rule that accepts "
                        "mixed ranks: %s): dropped (RANK_MISMATCH)", node.partition_id,
                        node.node_id, node.rank, self.cfg.fl.strategy, rank,
                        ", ".join(mixed_rank_strategies()))
            kept = [n for n in kept if n.rank == rank]
        if self.glob.base_init:  # lora.init = pissa / olora: nodes' declared ranks (deployment)
            kept = base_init_nodes(self.cfg, kept, self.glob.init_rank)
        return kept

    # ------------------------------------------------------------------ rounds

    def sample(self, nodes: list[NodeInfo], server_round: int) -> list[NodeInfo]:
        """The nodes of one round: ``clients_per_round`` of them without replacement over
        nodes in partition order, uniformly or ∝ their example counts.

        Without DP the draw is seeded by (seed, round): reproducible. Under DP the ε reported
        is amplified by subsampling, which holds only if nobody can predict the sample, so it
        is drawn from OS entropy (``secrets``) and recorded (partition ids, by round) in
        :attr:`dp_samples`, which checkpoints keep: a round asked again, or restored, gets
        the very sample it drew.
        """
        k = self.cfg.fl.clients_per_round(len(nodes))
        if k == len(nodes):
            return nodes
        if self.dp.enabled and server_round in self.dp_samples:
            chosen = set(self.dp_samples[server_round])
            return [n for n in nodes if n.partition_id in chosen]
        seed = secrets.randbits(128) if self.dp.enabled else [self.cfg.fl.seed, server_round]
        rng = np.random.default_rng(seed)
        p = None
        if self.cfg.fl.sampling == "data-size":
            sizes = np.array([n.num_examples for n in nodes], dtype=np.float64)
            p = sizes / sizes.sum()
        picked = [nodes[i] for i in sorted(rng.choice(len(nodes), size=k, replace=False,
                                                      p=p).tolist())]
        if self.dp.enabled:
            self.dp_samples[server_round] = [n.partition_id for n in picked]
        return picked

    def _current_rank(self, node: NodeInfo) -> NodeInfo:
        """``node`` at the rank it pruned to (hetlora-prune), else as it announced itself."""
        rank = self.pruned_ranks.get(node.partition_id, node.rank)
        return node if rank == node.rank else dataclasses.replace(node, rank=rank)

    def _pruned_reply(self, node: NodeInfo, arrays: Mapping[str, np.ndarray],
                      sent: Mapping[str, np.ndarray]) -> tuple[NodeInfo, dict[str, np.ndarray]]:
        """hetlora-prune: a reply at the rank sent, or at exactly ``max(1, floor(γ r))`` (one
        prune); anything else is ``RANK_MISMATCH``. Returns the node at the reply's rank and
        what it received truncated to that rank (for the shape checks and update norms)."""
        try:
            got = hetlora_prune.adapter_rank(arrays)
        except (ValueError, KeyError) as exc:
            raise UpdateRejected("RANK_MISMATCH", f"hetlora-prune: {exc}") from None
        if got == node.rank:
            return node, dict(sent)
        allowed = hetlora_prune.pruned_rank(node.rank, self.cfg.fl.hetlora_prune_gamma)
        if got != allowed:
            raise UpdateRejected("RANK_MISMATCH", f"hetlora-prune: the node was sent rank "
                                 f"{node.rank} and replied at rank {got}; a reply keeps that "
                                 f"rank or prunes once to {allowed} (gamma "
                                 f"{self.cfg.fl.hetlora_prune_gamma})")
        return dataclasses.replace(node, rank=got), hetlora_prune.truncate(sent, got)

    def _message(self, node: NodeInfo, server_round: int, plan: RoundPlan, message_type: str,
                 encoded: dict[int, tuple[ArrayRecord, dict[str, np.ndarray]]]
                 ) -> tuple[Message, dict[str, np.ndarray]]:
        """The message for ``node`` and the arrays it receives (after ``wire-dtype`` rounding:
        what it trains from, and what frozen factors of its reply are filled in with).

        ``encoded`` holds the adapter of each rank once encoded; nodes of one rank share it.
        """
        if node.rank not in encoded:
            arrays = self.glob.arrays_for(node.rank)
            record = pack(arrays, self.cfg.fl.wire_dtype)
            encoded[node.rank] = (record, arrays if self.cfg.fl.wire_dtype == "float32"
                                  else unpack(record))
        record, arrays = encoded[node.rank]
        content = RecordDict({"arrays": record})
        config = ConfigRecord({"server-round": server_round, "trainable": plan.trainable,
                               "send": plan.send, "personal": plan.personal})
        if self.cfg.fl.hetlora_prune:  # the rank this node trains at (it may have pruned)
            config["lora-rank"] = node.rank
        have = self.base_version.get(node.partition_id, 0)
        if have < self.glob.version:
            content["correction"] = pack_correction(self.glob.correction_since(have, node.rank))
            config["base-from"], config["base-to"] = have, self.glob.version
        content["config"] = config  # one copy per node: nodes get different arrays and configs
        return (Message(content, dst_node_id=node.node_id, message_type=message_type,
                        group_id=str(server_round)), arrays)

    def decode(self, reply: Message, node: NodeInfo, sent: Mapping[str, np.ndarray],
               send: str = "ab", server_round: int | None = None) -> Accepted:
        """Validate one reply before anything touches the global state.

        Raises UpdateRejected/PayloadError with a reason code. Order matters: cheap checks of
        the metadata and the payload size come before decoding any array. Arrays are read as
        views into the reply's bytes where they allow it; nothing here writes into them.
        """
        content = reply.content
        record, raw_metrics = content.get("arrays"), content.get("metrics")
        if not isinstance(record, ArrayRecord) or not isinstance(raw_metrics,
                                                                  MetricRecord | ConfigRecord):
            raise PayloadError("MALFORMED", f"a reply carries an ArrayRecord 'arrays' and a "
                               f"MetricRecord 'metrics'; got {type(record).__name__} and "
                               f"{type(raw_metrics).__name__}")
        metrics = dict(raw_metrics)
        n = self.check_metrics(metrics, server_round)
        expected = select_outgoing(sent, send)
        limit = 2 * sum(v.size * 4 for v in expected.values()) + 65_536  # float64 at most
        size = nbytes(record)
        if size > limit:
            raise PayloadError("PAYLOAD_TOO_LARGE", f"{size} bytes of arrays; this node's "
                               f"adapter is at most {limit} bytes")
        if set(record) != set(expected):
            extra = sorted(set(record) - set(expected))
            missing = sorted(set(expected) - set(record))
            raise PayloadError("KEY_MISMATCH", f"expected the {send!r} factors and heads; "
                               f"missing {missing[:3]}, unexpected {extra[:3]}")
        # every .npy header is parsed and bound-checked (dtype, shape, exact length) first
        arrays = unpack(record, copy=False)
        if self.dp.mode == "central":  # the sensitivity the noise is calibrated to
            norm = privacy.update_norm(arrays, sent)
            if norm > self.dp.clip_norm * (1 + 1e-4):
                raise PayloadError("DP_NORM_EXCEEDED", f"update norm {norm:.4g} exceeds "
                                   f"dp-clip-norm {self.dp.clip_norm}; the client must clip")
        if self.cfg.fl.hetlora_prune:
            node, sent = self._pruned_reply(node, arrays, sent)
        # frozen or personal factors were not sent back: they are what this node received
        full = {**sent, **arrays}
        scale = self.glob.scale_of  # per module: its alpha over the rank it arrived at
        factors, heads = split_arrays(full, scale)
        sent_factors, sent_heads = split_arrays(sent, scale)
        for key, value in heads.items():
            if value.shape != sent_heads[key].shape or not np.all(np.isfinite(value)):
                raise PayloadError("BAD_HEAD", f"head {key}: shape {value.shape} or non-finite")
        # under DP every update weighs the same: an example count would scale its sensitivity
        update = ClientUpdate(factors=factors, num_examples=1 if self.dp.enabled else n)
        validate_update(update, {m: (f.b.shape[0], f.a.shape[1]) for m, f in sent_factors.items()},
                        max_rank=self.cfg.fl.max_rank, declared_rank=node.rank,
                        pattern=self.glob.pattern)
        bounded, heads = self._bound_norm(update, heads, sent_factors, sent_heads)
        return Accepted(node, bounded, heads, metrics,
                        record if bounded is update else None)

    def check_metrics(self, metrics: Mapping[str, Any], server_round: int | None) -> int:
        """The reply's example count, after checking its round, count and loss, then every
        other metric against the declared schema
        (:data:`fedlora.federation.wire_schema.TRAIN_METRICS`:
        known keys only, each a finite number of its kind)."""
        if server_round is not None and metrics.get("server-round") != server_round:
            raise PayloadError("WRONG_ROUND", f"reply is for round "
                               f"{str(metrics.get('server-round'))[:40]}, this is round "
                               f"{server_round}")
        n = metrics.get("num-examples")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= self.cfg.fl.max_examples:
            raise PayloadError("BAD_EXAMPLE_COUNT", f"num-examples must be an int in 1.."
                               f"{self.cfg.fl.max_examples} (max-examples), got "
                               f"{str(n)[:40]}")
        loss = metrics.get("train-loss")
        if not isinstance(loss, int | float) or isinstance(loss, bool) or not np.isfinite(loss):
            raise PayloadError("BAD_METRICS", f"train-loss must be a finite number, got "
                               f"{str(loss)[:40]}")
        wire_schema.check_metrics(metrics, wire_schema.TRAIN_METRICS, wire_schema.TRAIN_REQUIRED)
        return n

    def _bound_norm(self, update: ClientUpdate, heads: Mapping[str, np.ndarray],
                    sent: Mapping[str, LoraFactors], sent_heads: Mapping[str, np.ndarray]
                    ) -> tuple[ClientUpdate, dict[str, np.ndarray]]:
        """Reject absurd moves (``max-update-norm``), clip large ones (``clip-update-norm``, or
        the adaptive bound tracking the ``clip-quantile`` of the update norms).

        The norm is the Frobenius norm of the whole upload's change: every LoRA factor and
        every head, bias and module to save (``x − x_received``, float64). Clipping moves all
        of them back towards what was received by one factor. Returns the update and heads,
        the very objects given when neither bound acts.
        """
        fl = self.cfg.fl
        bound = self.adaptive_clip.bound if self.adaptive_clip else fl.clip_update_norm
        if not fl.max_update_norm and not bound:
            return update, dict(heads)
        squares = 0.0
        for module, f in update.factors.items():
            g = sent[module]
            squares += float(np.sum((f.a.astype(np.float64) - g.a) ** 2))
            squares += float(np.sum((f.b.astype(np.float64) - g.b) ** 2))
        for key, value in heads.items():
            squares += float(np.sum((value.astype(np.float64) - sent_heads[key]) ** 2))
        norm = float(np.sqrt(squares))
        if fl.max_update_norm and not norm <= fl.max_update_norm:
            raise PayloadError("NORM_TOO_LARGE", f"the upload (factors and heads) moved by "
                               f"{norm:.3g} (Frobenius); max-update-norm is "
                               f"{fl.max_update_norm}")
        self._round_norms.append(norm)
        if not bound or norm <= bound:
            return update, dict(heads)
        keep = bound / norm
        clipped = {m: LoraFactors(a=(sent[m].a + keep * (f.a - sent[m].a)).astype(f.a.dtype),
                                  b=(sent[m].b + keep * (f.b - sent[m].b)).astype(f.b.dtype),
                                  scale=f.scale) for m, f in update.factors.items()}
        clipped_heads = {k: (sent_heads[k] + keep * (v - sent_heads[k])).astype(np.float32)
                         for k, v in heads.items()}
        return ClientUpdate(factors=clipped, num_examples=update.num_examples), clipped_heads

    def run(self, grid: Grid, start_round: int = 1,
            checkpoint_dir: Path | None = None) -> GlobalAdapter:
        """Rounds ``start_round``..``num-server-rounds`` (round 0 = evaluate the initial
        adapter when starting fresh); a checkpoint after every ``checkpoint-every`` rounds."""
        started = time.perf_counter()
        if self.dp.enabled and checkpoint_dir is not None:
            self.releases = privacy.ReleaseLog(checkpoint_dir / privacy.RELEASES)
            if start_round == 1:
                self.releases.reset()
        nodes = self.discover(grid)
        discovery = {"num_nodes": len(nodes), "discover_s": time.perf_counter() - started}
        log(INFO, "fedlora: %d nodes (nodes per rank %s), %d sampled per round (%s), "
            "strategy %s", len(nodes), dict(sorted(Counter(n.rank for n in nodes).items())),
            self.cfg.fl.clients_per_round(len(nodes)), self.cfg.fl.sampling,
            self.cfg.fl.strategy)
        privacy.check_config(self.cfg, len(nodes))  # dp-min-contributors vs the sample
        if start_round == 1:
            self._evaluate_and_log(0, grid, nodes, {"duration_s": 0.0, **discovery})
        failures = 0
        last = self.cfg.fl.num_server_rounds
        for server_round in range(start_round, last + 1):
            cpu = time.process_time()
            record = self.train_round(grid, nodes, server_round)
            # CPU of this whole process: the ServerApp and, in simulation, Flower's engine
            record["server_cpu_s"] = time.process_time() - cpu
            failures = failures + 1 if record.get("abandoned") else 0
            self._evaluate_and_log(server_round, grid, nodes, record)
            every = self.cfg.fl.checkpoint_every
            if checkpoint_dir is not None and every and (server_round % every == 0 or
                                                         server_round == last):
                self.save_checkpoint(checkpoint_dir, server_round)
            if failures >= self.cfg.fl.max_failed_rounds or (
                    failures and self.glob.updates == 0 and server_round == last):
                raise RuntimeError(
                    f"{failures} round(s) in a row without enough accepted updates "
                    f"(max-failed-rounds {self.cfg.fl.max_failed_rounds}); rejections "
                    f"{record['rejected']}; first client error: {record.get('errors', ['-'])[0]}")
        if round_plan(self.cfg, max(last, 1)).personal:
            self.personal_saved = self.export_personal(grid, nodes, last)
        return self.glob

    def export_personal(self, grid: Grid, nodes: list[NodeInfo], server_round: int) -> int:
        """Personal factors (FedSA's B) never reach the server: the run's end is announced to
        every node (``query.personal_export`` with the final global adapter), and a node that
        has a ``personal-adapter-dir`` saves the final global A with its own B there in PEFT
        format. Returns how many nodes saved one."""
        plan = round_plan(self.cfg, max(server_round, 1))
        encoded: dict[int, tuple[ArrayRecord, dict[str, np.ndarray]]] = {}
        msgs = [self._message(n, server_round, plan, "query.personal_export", encoded)[0]
                for n in nodes]
        replies = [r for r in grid.send_and_receive(msgs, timeout=self.cfg.fl.round_timeout)
                   if not r.has_error()]
        saved = sum(int(r.content["metrics"].get("personal-saved", 0)) for r in replies)
        log(INFO if saved else WARNING, "fedlora: %d of %d nodes saved their personal adapter "
            "(global A + own B)%s", saved, len(nodes),
            "" if saved else "; set personal-adapter-dir (run or node config) to keep them")
        return saved

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Everything the next rounds depend on (sampling, aggregation seeds and client
        training seeds are pure functions of (seed, round, partition): no RNG state; under DP
        the samples drawn from OS entropy so far are kept instead)."""
        glob_state, glob_arrays = self.glob.state_dict()
        arrays = {f"global/{k}": v for k, v in glob_arrays.items()}
        state: dict[str, Any] = {"global": glob_state, "strategy": self.cfg.fl.strategy,
                                 "config_digest": config_digest(self.cfg)}
        if self.adaptive_clip is not None:
            state["adaptive_clip_bound"] = self.adaptive_clip.bound
        if self.pruned_ranks:
            state["pruned_ranks"] = {str(p): r for p, r in sorted(self.pruned_ranks.items())}
        if self.dp_samples:
            state["dp_samples"] = {str(r): p for r, p in sorted(self.dp_samples.items())}
        if self.accountant is not None:
            state["dp_population"] = self.accountant.population
            state["dp_events"] = self.accountant.state()
        if self.optimizer is not None:
            opt = self.optimizer.state_dict()
            state["optimizer"] = {k: float(v) for k, v in opt.items()
                                  if not isinstance(v, np.ndarray)}
            arrays.update({f"optimizer/{k}": v for k, v in opt.items()
                           if isinstance(v, np.ndarray)})
        return state, arrays

    def save_checkpoint(self, directory: Path, server_round: int) -> Path:
        state, arrays = self.state()
        path = checkpoint.save(directory, server_round, state, arrays,
                               keep=self.cfg.fl.checkpoint_keep)
        log(INFO, "fedlora: checkpoint of round %d in %s", server_round, path)
        return path

    def restore(self, ck: checkpoint.Checkpoint) -> None:
        """Adopt a checkpoint's global adapter and optimizer state (same run config only)."""
        if ck.state.get("config_digest") != config_digest(self.cfg):
            raise checkpoint.CheckpointError(
                f"checkpoint {ck.path} was written with a different configuration; resume "
                f"with the run's own config (only num-server-rounds and round-timeout may "
                f"change) or start a new output directory")
        glob_arrays = {k[len("global/"):]: v for k, v in ck.arrays.items()
                       if k.startswith("global/")}
        self.glob = GlobalAdapter.from_state(ck.state["global"], glob_arrays)
        if self.optimizer is not None:
            opt: dict[str, Any] = dict(ck.state.get("optimizer", {}))
            opt.update({k[len("optimizer/"):]: v for k, v in ck.arrays.items()
                        if k.startswith("optimizer/")})
            self.optimizer.load_state_dict(opt)
        if self.adaptive_clip is not None:
            self.adaptive_clip.bound = float(ck.state["adaptive_clip_bound"])
        self.pruned_ranks = {int(p): int(r)
                             for p, r in ck.state.get("pruned_ranks", {}).items()}
        self.dp_samples = {int(r): [int(p) for p in pids]
                           for r, pids in ck.state.get("dp_samples", {}).items()}
        if "dp_events" in ck.state:
            self.accountant = privacy.Accountant(self.dp, int(ck.state["dp_population"]))
            self.accountant.load(ck.state["dp_events"])
        if self.dp.enabled:
            self._charge_lost_releases(ck)
        self.base_version = {}  # fresh node processes: every correction is sent again

    def _charge_lost_releases(self, ck: checkpoint.Checkpoint) -> None:
        """Count in ε the DP round attempts made after the checkpoint (see ReleaseLog)."""
        lost = privacy.ReleaseLog(ck.path.parent / privacy.RELEASES).after(ck.round)
        if not lost:
            return
        if self.accountant is None:
            self.accountant = privacy.Accountant(self.dp, population=lost[0]["population"])
        for attempt in lost:
            self.accountant.record_round(attempt["sample"])
        log(WARNING, "fedlora: DP: %d round attempt(s) after the round-%d checkpoint (rounds "
            "%s) are charged to epsilon; the rounds now repeated are charged again",
            len(lost), ck.round, ", ".join(str(a["round"]) for a in lost))

    def train_round(self, grid: Grid, nodes: list[NodeInfo], server_round: int) -> dict:
        """One round as a pipeline of named stages: sample → build messages → (secure round,
        or) send/receive → per reply: verify signature, validate/decode (one boundary: a
        reply that raises anything is rejected with a reason, never the run) → central noise
        → aggregate → adopt → diagnose; the caller evaluates and logs."""
        start = time.perf_counter()
        plan = round_plan(self.cfg, server_round)
        sampled = [self._current_rank(n) for n in self.sample(nodes, server_round)]
        out = self._build_messages(sampled, server_round, plan)
        if self.releases is not None:  # before anything leaves: a crash cannot lose it
            self.releases.append(server_round, len(sampled), len(nodes))
        if self.secure is not None:
            return self._secure_round(grid, nodes, sampled, out, plan, server_round, start)
        replies = list(grid.send_and_receive(out.messages, timeout=self.cfg.fl.round_timeout))
        received = self._receive(replies, out, sampled, plan, server_round)
        record = self._round_record(sampled, received, out.bytes_down)
        needed = self._needed(len(sampled))
        if len(received.accepted) < needed:
            log(WARNING, "Round %d: %d accepted update(s), %d needed (min-accepted / "
                "min-accepted-fraction): round abandoned, the global adapter is unchanged",
                server_round, len(received.accepted), needed)
            record["abandoned"] = True
            record["duration_s"] = time.perf_counter() - start
            return record
        aggregating = time.perf_counter()
        accepted = self._capped(self._noised(received.accepted, plan), record)
        weights = [item.update.num_examples for item in accepted]
        # the contributors' metrics are summarised before anything touches the global state
        record.update(self._client_summary([item.metrics for item in accepted], weights))
        result, heads = self._aggregate_accepted(accepted, out.sent, plan, server_round)
        diagnostics = result.diagnostics([item.update for item in accepted])
        self.glob.apply(result, heads, self.optimizer, rank=accepted[0].node.rank,
                        frozen="".join(sorted(set("ab") - set(plan.send))))
        if self.cfg.fl.hetlora_prune:  # an accepted pruned upload sets the node's rank
            was = {n.node_id: n.rank for n in sampled}
            pruned = {i.node.partition_id: i.node.rank for i in accepted
                      if i.node.rank < was[i.node.node_id]}
            self.pruned_ranks.update(pruned)
            record["pruned"] = len(pruned)
        record["aggregate_s"] = time.perf_counter() - aggregating
        record.update({key: diagnostics[key] for key in (
            "agg_error", "agg_error_mean", "agg_error_max", "effective_rank_mean")})
        record["base_version"] = self.glob.version
        if "phase" in plan.options:
            record["phase"] = plan.options["phase"]
        self._account(record, len(sampled), len(nodes))
        record["duration_s"] = time.perf_counter() - start
        return record

    def _build_messages(self, sampled: list[NodeInfo], server_round: int, plan: RoundPlan
                        ) -> Outgoing:
        """Stage "build messages": one train message per sampled node, and what each got."""
        out = Outgoing(start_version=self.glob.version)
        encoded: dict[int, tuple[ArrayRecord, dict[str, np.ndarray]]] = {}
        for node in sampled:
            msg, arrays = self._message(node, server_round, plan, MessageType.TRAIN, encoded)
            out.messages.append(msg)
            out.sent[node.node_id] = arrays
        out.bytes_down = sum(nbytes(m.content["arrays"]) + (
            nbytes(m.content["correction"]) if "correction" in m.content else 0)
            for m in out.messages)
        return out

    def _receive(self, replies: list[Message], out: Outgoing, sampled: list[NodeInfo],
                 plan: RoundPlan, server_round: int) -> Received:
        """Stage "receive": every reply through :meth:`_take_reply`, the per-reply boundary.

        Whatever handling one reply raises becomes a rejection with a reason code — its own
        (``UpdateRejected``, ``PayloadError``, ``SignatureRejected``), else ``MALFORMED`` —
        and is logged; it never aborts the round, and nothing of that reply is kept.
        """
        by_id = {n.node_id: n for n in sampled}
        received = Received()
        # the SuperLink's own "node unavailable" replies carry its id as sender: replies are
        # matched to the node that was asked through the message they answer
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in out.messages
                 if m.metadata.message_id}
        answered: set[int] = set()
        for reply in replies:
            try:
                answered.add(asked.get(reply.metadata.reply_to_message_id,
                                       reply.metadata.src_node_id))
                item = self._take_reply(reply, by_id, out, received, plan, server_round)
            except (UpdateRejected, PayloadError, SignatureRejected) as exc:
                received.reject(exc.reason, server_round, reply, by_id, exc)
            except Exception as exc:  # noqa: BLE001 — the boundary: one reply, never the run
                received.reject("MALFORMED", server_round, reply, by_id,
                                f"{type(exc).__name__}: {str(exc)[:300]}")
            else:
                if item is not None:
                    received.accepted.append(item)
        received.rejected["NO_REPLY"] += len(set(by_id) - answered)
        received.accepted.sort(key=lambda item: item.node.partition_id)  # reproducible sums
        return received

    def _take_reply(self, reply: Message, by_id: Mapping[int, NodeInfo], out: Outgoing,
                    received: Received, plan: RoundPlan, server_round: int) -> Accepted | None:
        """One reply: a client error, an unknown or duplicate sender, its signature, then
        :meth:`decode`. Returns the validated update, or ``None`` when the reply was counted
        as rejected here; raises (with a reason) when it is rejected."""
        if reply.has_error():
            received.rejected["CLIENT_ERROR"] += 1
            received.errors.append(_last_line(str(reply.error.reason)))
            log(WARNING, "Round %d: node %s failed: %s", server_round,
                reply.metadata.src_node_id, str(reply.error.reason)[:2000])
            return None
        arrays = reply.content.get("arrays")
        received.bytes_up += nbytes(arrays) if isinstance(arrays, ArrayRecord) else 0
        node = by_id.get(reply.metadata.src_node_id)
        if node is None:
            received.rejected["DUPLICATE_OR_UNKNOWN"] += 1
            return None
        # the node finished its round, so it now holds every correction it was sent
        self.base_version[node.partition_id] = out.start_version
        # first, so that replayed and duplicate signed replies get their own codes
        self.verify_signature(reply.content, node.node_id, server_round)
        if node.node_id in received.seen:
            received.rejected["DUPLICATE_OR_UNKNOWN"] += 1
            return None
        received.seen.add(node.node_id)
        return self.decode(reply, node, out.sent[node.node_id], plan.send, server_round)

    def _round_record(self, sampled: list[NodeInfo], received: Received, bytes_down: int
                      ) -> dict[str, Any]:
        """The metrics line's counts (and this round's adaptive clip bound, then adapted)."""
        clip_bound = None
        if self.adaptive_clip is not None:  # this round used the old bound; adapt for the next
            clip_bound = self.adaptive_clip.bound
            self.adaptive_clip.update(self._round_norms)
        self._round_norms = []
        record: dict[str, Any] = {
            "num_sampled": len(sampled), "num_accepted": len(received.accepted),
            "clients": [item.node.partition_id for item in received.accepted],
            "rejected": {k: v for k, v in sorted(received.rejected.items()) if v},
            "bytes_up": received.bytes_up, "bytes_down": bytes_down,
        }
        if clip_bound is not None:
            record["clip_bound"] = clip_bound
        if received.errors:
            record["errors"] = received.errors[:5]
        return record

    def _capped(self, accepted: list[Accepted], record: dict[str, Any]) -> list[Accepted]:
        """Stage "weights": no reply carries more than ``max-weight-fraction`` of the round's
        total weight (:func:`~fedlora.aggregation.weighting.cap_weights`); the number of
        capped replies goes into the metrics line."""
        counts = [item.update.num_examples for item in accepted]
        capped = cap_weights(counts, self.cfg.fl.max_weight_fraction)
        if capped == counts:
            return accepted
        limit = self.cfg.fl.max_weight_fraction * sum(counts)
        record["weight_capped"] = sum(c > limit for c in counts)
        return [dataclasses.replace(item, update=dataclasses.replace(item.update, num_examples=w))
                for item, w in zip(accepted, capped, strict=True)]

    def _noised(self, accepted: list[Accepted], plan: RoundPlan) -> list[Accepted]:
        """Stage "noise": central DP adds the round's Gaussian noise (to one update)."""
        if self.dp.mode != "central":
            return accepted
        return [self._with_central_noise(accepted[0], plan.send), *accepted[1:]]

    def _aggregate_accepted(self, accepted: list[Accepted],
                            sent: Mapping[int, Mapping[str, np.ndarray]], plan: RoundPlan,
                            server_round: int) -> tuple[AggregationResult, dict[str, np.ndarray]]:
        """Stage "aggregate": the rule over the accepted updates (the zero-copy weighted mean
        of their records where that is the rule) and the example-weighted mean heads — under
        ``robust`` the heads go through the rule's own clipping and reducer instead
        (:func:`fedlora.aggregation.robust.robust_heads`), against what each node was sent."""
        updates = [item.update for item in accepted]
        weights = [u.num_examples for u in updates]
        node = accepted[0].node
        records = self.records_to_average(accepted)
        if records is not None:
            mean = unpack(weighted_mean_records(records, weights))  # what arrived, as it is
            result, heads, _ = self._adopt_mean(mean, sent[node.node_id], node, sum(weights),
                                                plan, server_round)
            return result, heads
        if self.cfg.fl.strategy == "robust":
            received = [{k: v for k, v in sent[item.node.node_id].items() if k in item.heads}
                        for item in accepted]
            heads = robust_heads([item.heads for item in accepted], received,
                                 **plan.options)
        else:
            heads = aggregate_heads([item.heads for item in accepted], weights)
        return self._aggregate(updates, plan, server_round), heads

    def _secure_round(self, grid: Grid, nodes: list[NodeInfo], sampled: list[NodeInfo],
                      out: Outgoing, plan: RoundPlan, server_round: int, start: float) -> dict:
        """The round's exchange and sum under secure aggregation (:class:`SecureRound`)."""
        template = select_outgoing(out.sent[sampled[0].node_id], plan.send)
        if self.cfg.fl.strategy == "hetlora":  # uploads padded to the round's largest rank
            gain, pad = secure_hetlora.gain(self.glob.adapter), max(n.rank for n in sampled)
            for msg in out.messages:
                msg.content["config"]["hetlora-gain"] = gain
                msg.content["config"]["hetlora-rank"] = pad
            template = secure_hetlora.prescale(template, 1, sampled[0].rank, pad,
                                               self.glob.lora_alpha, self.glob.rslora)
        unmask_at_least = 0
        if self.dp.mode == "distributed":  # each client's share of the noise is 1/m
            contributors = self.cfg.fl.dp_min_contributors or len(sampled)
            privacy.check_secure_range(template, self.dp, contributors,
                                       self.cfg.fl.secagg_clip_range)
            for msg in out.messages:
                msg.content["config"][privacy.CONTRIBUTORS_KEY] = contributors
            unmask_at_least = max(contributors, self._needed(len(sampled)))
        outcome = self.secure.run(
            grid, server_round, sampled, out.messages, template,
            lambda metrics: self.check_metrics(metrics, server_round),
            lambda content, node_id: self.verify_signature(content, node_id, server_round),
            min_contributors=unmask_at_least,
            signing_keys=self.signing_public_keys if self.cfg.fl.sign_updates else None,
            run_id=self.run_id)
        for node in outcome.trained:
            self.base_version[node.partition_id] = out.start_version
        released = outcome.mean is not None  # seen by the server, adopted or not
        record = self._adopt_secure(outcome, out.sent, plan, server_round, start, out.bytes_down)
        if released:
            self._account(record, len(sampled), len(nodes))
        return record

    def _needed(self, sampled: int) -> int:
        """Accepted updates a round of ``sampled`` nodes needs (min-accepted[-fraction])."""
        return max(self.cfg.fl.min_accepted,
                   math.ceil(self.cfg.fl.min_accepted_fraction * sampled))

    def _client_summary(self, metrics: list[Mapping[str, Any]], weights: list[int]
                        ) -> dict[str, float]:
        """What the contributors' metrics say about a round: timings, memory, CPU, examples
        and ``train_loss`` (mean weighted by ``weights``, unless the clients withheld their
        losses: DP with an untrusted server); with central DP the median update norm before
        clipping and the fraction of clients clipped."""
        out: dict[str, float] = client_timings(metrics)
        if self.dp.mode not in privacy.UNTRUSTED_SERVER:
            out["train_loss"] = sum(float(m["train-loss"]) * w for m, w in
                                    zip(metrics, weights, strict=True)) / float(sum(weights))
        if self.dp.mode == "central":  # for tuning dp-clip-norm: how large, how many clipped
            norms = [float(m["dp-norm"]) for m in metrics if "dp-norm" in m]
            if norms:
                out["dp_norm_median"] = float(np.median(norms))
                out["dp_clipped_fraction"] = sum(
                    float(m["dp-clip-factor"]) < 1.0 for m in metrics if "dp-clip-factor" in m
                ) / len(norms)
        out.update({
            "client_rss_mb_max": max(float(m.get("rss-mb", 0.0)) for m in metrics),
            "client_peak_rss_mb_max": max(float(m.get("peak-rss-mb", 0.0)) for m in metrics),
            "client_cpu_s": sum(float(m.get("train-cpu-s", 0.0)) for m in metrics),
            "num_examples": int(sum(m["num-examples"] for m in metrics)),
        })
        out.update(client_memory(metrics))
        return out

    def _account(self, record: dict[str, Any], sampled: int, population: int) -> None:
        """With DP: one more Gaussian release of ``sampled`` of ``population`` clients; the
        run's ε so far (for ``dp-delta``) goes into the round's metrics line."""
        if not self.dp.enabled:
            return
        if self.accountant is None:
            self.accountant = privacy.Accountant(self.dp, population=population)
        self.accountant.record_round(sampled)
        record.update(self.accountant.report())

    def records_to_average(self, accepted: list[Accepted]) -> list[ArrayRecord] | None:
        """The accepted replies' records when the round's aggregate is their weighted mean:
        a linear equal-rank rule, and every update as it arrived. ``None`` otherwise."""
        records = [item.record for item in accepted]
        if self.info.linear and self.info.equal_ranks and None not in records:
            return [record for record in records if record is not None]
        return None

    def _with_central_noise(self, item: Accepted, send: str) -> Accepted:
        """Central DP: adding N(0, (σC)²) to one of k equally weighted updates adds exactly
        N(0, (σC/k)²) to their mean — the Gaussian mechanism on the sum of clipped updates."""
        noisy = {}
        for module, f in item.update.factors.items():
            pair = privacy.add_central_noise({"a": f.a, "b": f.b},
                                             [k for k in ("a", "b") if k in send], self.dp, k=1)
            noisy[module] = LoraFactors(a=pair["a"], b=pair["b"], scale=f.scale)
        heads = privacy.add_central_noise(item.heads, list(item.heads), self.dp, k=1)
        update = ClientUpdate(factors=noisy, num_examples=item.update.num_examples)
        return dataclasses.replace(item, update=update, heads=heads, record=None)

    def _adopt_mean(self, mean: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray],
                    node: NodeInfo, weight: int, plan: RoundPlan, server_round: int
                    ) -> tuple[AggregationResult, dict[str, np.ndarray], ClientUpdate]:
        """The aggregate of a round whose weighted mean of the uploaded arrays is known.

        The factors that were not sent are filled in from what was sent (as :meth:`decode`
        does for one reply), and the whole is a single update of weight ``weight``; every
        linear rule returns such an update unchanged, so ``aggregate`` builds the same kind
        of result (and view) as from the individual replies, and server optimizers apply as
        usual. Returns the result, the mean heads and that update.
        """
        # each module's scale from the rank it arrived at (secure hetlora: every upload was
        # padded to one rank) and its alpha (lora.alpha-pattern)
        factors, heads = split_arrays({**sent, **mean}, self.glob.scale_of)
        update = ClientUpdate(factors=factors, num_examples=weight)
        return self._aggregate([update], plan, server_round), heads, update

    def _aggregate(self, updates: list[ClientUpdate], plan: RoundPlan, server_round: int
                   ) -> AggregationResult:
        """The round's rule over ``updates`` (its randomness seeded by run seed and round).

        Rules that declare a ``previous`` option get the global adapter before the round
        (HetLoRA keeps the components nobody trained from it), and a ``received`` option
        what each update's client was sent (robust clips the round's change)."""
        options = dict(plan.options)
        if self.glob.base_init:  # a lower-rank node's upload + the components it holds frozen
            updates = [dataclasses.replace(u, factors=self.glob.fill_tail(u.factors))
                       for u in updates]
        if "previous" in self.info.options:
            options["previous"] = self.glob.adapter
        if "received" in self.info.options:  # what each client was sent (the global before)
            options["received"] = [self.glob.view({m: f.rank for m, f in u.factors.items()})
                                   for u in updates]
        return aggregate(self.cfg.fl.strategy, updates, lora_alpha=self.glob.lora_alpha,
                         rslora=self.glob.rslora, max_rank=self.cfg.fl.max_rank,
                         pattern=self.glob.pattern,
                         seed=self.cfg.fl.seed * 100_003 + server_round, **options)

    def _adopt_secure(self, outcome: SecureOutcome, sent: Mapping[int, Mapping[str, np.ndarray]],
                      plan: RoundPlan, server_round: int, start: float, bytes_down: int
                      ) -> dict[str, Any]:
        """A secure round's metrics line; its mean is adopted like a plain aggregate
        (:meth:`_adopt_mean`)."""
        contributors = outcome.contributors
        record: dict[str, Any] = {
            "num_sampled": len(sent), "num_accepted": len(contributors),
            "clients": [n.partition_id for n, _ in contributors],
            "rejected": {k: v for k, v in sorted(outcome.rejected.items()) if v},
            "bytes_up": outcome.bytes_up, "bytes_down": bytes_down + outcome.bytes_down,
            "secagg_dropped": outcome.dropped, "secagg_s": outcome.seconds,
        }
        mean, error_bound = outcome.mean, outcome.error_bound
        if mean is not None and self.cfg.fl.strategy == "hetlora":
            try:  # norm-weighted sums and their normalisers → HetLoRA's padded means
                mean, normaliser = secure_hetlora.unscale(mean)
                error_bound /= normaliser
            except PayloadError as exc:
                mean, outcome.aborted = None, str(exc)
        errors = ([outcome.aborted] if outcome.aborted else []) + outcome.errors
        if errors:
            record["errors"] = [_last_line(e) for e in errors[:5]]
        needed = self._needed(len(sent))
        if mean is None or len(contributors) < needed:
            log(WARNING, "Round %d: %d update(s) in the secure sum, %d needed (min-accepted / "
                "min-accepted-fraction / secure aggregation threshold): round abandoned, the "
                "global adapter is unchanged", server_round, len(contributors), needed)
            record["abandoned"] = True
            if outcome.aborted:  # SECAGG_<reason>: BELOW_THRESHOLD, OUT_OF_RANGE, ...
                record["abandon_reason"] = f"SECAGG_{outcome.abort_reason or 'ABORTED'}"
            record["duration_s"] = time.perf_counter() - start
            return record

        node = contributors[0][0]
        clipped = {n.partition_id: int(m.get("secagg-clipped", 0)) for n, m in contributors}
        if any(clipped.values()):
            record["secagg_clipped"] = sum(clipped.values())
            log(WARNING, "Round %d: secure aggregation clipped %d uploaded value(s) to "
                "±secagg-clip-range %g (by partition: %s); raise secagg-clip-range if the "
                "adapter's values are that large", server_round, record["secagg_clipped"],
                self.cfg.fl.secagg_clip_range, {p: c for p, c in clipped.items() if c})
        weights = [int(m["num-examples"]) for _, m in contributors]
        aggregating = time.perf_counter()
        result, heads, update = self._adopt_mean(mean, sent[node.node_id], node,
                                                 sum(weights), plan, server_round)
        self.glob.apply(result, heads, self.optimizer, rank=node.rank,
                        frozen="".join(sorted(set("ab") - set(plan.send))))
        record["aggregate_s"] = time.perf_counter() - aggregating
        record.update(self._client_summary([m for _, m in contributors], weights))
        record.update({
            "effective_rank_mean": result.diagnostics([update])["effective_rank_mean"],
            "base_version": self.glob.version,
            "secagg_error_bound": error_bound,
        })
        if "phase" in plan.options:
            record["phase"] = plan.options["phase"]
        record["duration_s"] = time.perf_counter() - start
        return record

    def _evaluate_and_log(self, server_round: int, grid: Grid, nodes: list[NodeInfo],
                          record: dict[str, Any]) -> None:
        start = time.perf_counter()
        metrics = self.evaluate_fn(self.glob) or {}
        # with personal factors (FedSA's B) only the clients can evaluate the model they use
        personal = bool(round_plan(self.cfg, max(server_round, 1)).personal)
        if self.cfg.fl.fraction_evaluate > 0 or personal:
            metrics.update(self.federated_evaluate(grid, nodes, server_round))
        line = {"round": server_round, "strategy": self.cfg.fl.strategy}
        line.update({k.replace("-", "_"): v for k, v in metrics.items()})
        line.update(record)
        # what each rank tier receives next round: capacity kept or lost under sampling
        line.update(tier_diagnostics(self.glob.view, {n.rank for n in nodes}))
        line["eval_s"] = time.perf_counter() - start
        line["server_rss_mb"] = round(rss_mb(), 1)
        line["time"] = time.time()  # Unix time the round ended: wall time between rounds
        line["server_peak_rss_mb"] = round(rss_mb(peak=True), 1)
        log(INFO, "fedlora round %d: %s", server_round,
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in line.items()})
        self.log_round(line)
        if self.after_round is not None:
            self.after_round(server_round, self.glob)

    def _eval_metrics(self, reply: Message) -> dict[str, int | float]:
        """One evaluate reply's metrics, checked against
        :data:`~fedlora.federation.wire_schema.EVAL_METRICS`
        (known keys, finite numbers in range, the task's metrics present, ``num-examples`` an
        int in 1..``max-examples``).

        Raises PayloadError (``CLIENT_ERROR``, ``MALFORMED``, ``BAD_METRICS``,
        ``BAD_EXAMPLE_COUNT``).
        """
        if reply.has_error():
            raise PayloadError("CLIENT_ERROR", str(reply.error.reason))
        metrics = reply.content.get("metrics")
        if not isinstance(metrics, MetricRecord | ConfigRecord):
            raise PayloadError("MALFORMED", f"an evaluate reply carries a MetricRecord "
                               f"'metrics', got {type(metrics).__name__}")
        checked = wire_schema.check_metrics(metrics, wire_schema.EVAL_METRICS,
                                            wire_schema.eval_required(self.cfg.model.task))
        n = checked["num-examples"]
        if not 0 < n <= self.cfg.fl.max_examples:
            raise PayloadError("BAD_EXAMPLE_COUNT", f"num-examples must be in 1.."
                               f"{self.cfg.fl.max_examples} (max-examples), got {n}")
        for key, (low, high) in wire_schema.EVAL_RANGES.items():
            if key in checked and not low <= checked[key] <= high:
                raise PayloadError("BAD_METRICS", f"{key} must be in {low}..{high}, got "
                                   f"{checked[key]}")
        return checked

    def federated_evaluate(self, grid: Grid, nodes: list[NodeInfo], server_round: int
                           ) -> dict[str, float]:
        """Clients evaluate the global adapter (with their personal factors) on local data."""
        if self.cfg.fl.fraction_evaluate:
            k = max(1, int(round(len(nodes) * self.cfg.fl.fraction_evaluate)))
        else:  # personal factors: as many nodes as a round trains, not every node
            k = self.cfg.fl.clients_per_round(len(nodes))
        chosen = nodes[:k] if k == len(nodes) else [
            nodes[i] for i in sorted(np.random.default_rng([self.cfg.fl.seed, server_round, 1])
                                     .choice(len(nodes), size=k, replace=False).tolist())]
        plan = round_plan(self.cfg, max(server_round, 1))
        encoded: dict[int, tuple[ArrayRecord, dict[str, np.ndarray]]] = {}
        msgs = [self._message(n, server_round, plan, MessageType.EVALUATE, encoded)[0]
                for n in chosen]
        results, rejected = [], Counter()
        for reply in grid.send_and_receive(msgs, timeout=self.cfg.fl.round_timeout):
            try:  # one boundary per answer: a bad one is left out of the mean, never the run
                results.append(self._eval_metrics(reply))
            except Exception as exc:  # noqa: BLE001
                reason = exc.reason if isinstance(exc, PayloadError) else "MALFORMED"
                rejected[reason] += 1
                log(WARNING, "Round %d: left out the evaluation of node %s (%s): %s",
                    server_round, reply.metadata.src_node_id, reason,
                    _last_line(str(exc))[:300])
        out: dict[str, float] = {}
        if rejected:
            out["fed_eval_rejected"] = dict(sorted(rejected.items()))
        if not results:
            return out
        total = sum(m["num-examples"] for m in results)
        keys = wire_schema.eval_required(self.cfg.model.task)  # what every accepted reply has
        out.update({f"fed_{k.replace('-', '_')}": sum(float(m[k]) * m["num-examples"]
                                                      for m in results) / total
                    for k in keys if k.startswith("eval-") and k != "eval-examples"})
        out["fed_eval_clients"] = len(results)
        return out



def client_timings(metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The slowest accepted client's loading and training seconds (clients run in parallel)."""
    out = {}
    for key, name in (("load-seconds", "client_load_s_max"), ("train-seconds",
                                                             "client_train_s_max")):
        values = [float(m[key]) for m in metrics if isinstance(m.get(key), int | float)]
        if values:
            out[name] = max(values)
    return out


def _last_line(reason: str) -> str:
    """The exception line of a client's error reason (Flower sends the whole traceback)."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    hits = [line for line in lines if "Error: " in line or "Exception: " in line]
    return (hits[-1] if hits else lines[-1] if lines else "")[:500]


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
