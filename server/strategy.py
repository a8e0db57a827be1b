"""Thin Flower adapter around fedlora's pure aggregation rules.

:class:`FederatedLora` holds what the federation keeps between rounds (the global adapter,
the server optimizer, the nodes' base versions, DP's accountant and samples, the signing
keys) and runs each round as the named stages of :mod:`server.round`: sample → build messages
→ send/receive → per reply (one boundary, :mod:`server.round.replies`): verify the signature,
validate and decode, clip → central noise → weights → aggregate → adopt → diagnose →
evaluate and log. Secure aggregation replaces send/receive through aggregate
(:mod:`server.round.secure`); signing and DP plug in as the stages' own steps.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedlora.aggregation import strategy_info
from fedlora.config import RunConfig, to_flat
from fedlora.federation import checkpoint
from fedlora.federation.global_adapter import GlobalAdapter
from fedlora.privacy import dp as privacy
from fedlora.privacy import signed_wire
from fedlora.privacy.secagg.signing import UpdateVerifier
from server import discovery
from server.discovery import DISCOVERY_BATCH
from server.nodes import NodeInfo
from server.round import evaluate, sampling
from server.round.aggregate import adopt, aggregate_accepted, capped
from server.round.clip import UpdateBound, adaptive_clip
from server.round.diagnose import AGGREGATION_KEYS, client_summary, round_record
from server.round.messages import Outgoing, build_messages, messages_for
from server.round.noise import noised
from server.round.plan import RoundPlan, build_optimizer, needed, round_plan
from server.round.replies import Accepted, ReplyStages, receive
from server.round.secure import adopt_secure, prepare
from server.round.validate import ReplyValidator
from server.secure_round import ReplyChecks, SecureRound

__all__ = ["DISCOVERY_BATCH", "Accepted", "FederatedLora", "NodeInfo", "RoundPlan",
           "build_optimizer", "config_digest", "round_plan"]

# keys that may differ between a run and its resumption
RESUMABLE_KEYS = ("num-server-rounds", "round-timeout", "resume", "output-dir")


def config_digest(cfg: RunConfig) -> str:
    """The digest of the run config a checkpoint must match (resumable keys aside)."""
    return checkpoint.config_digest(to_flat(cfg), ignore=RESUMABLE_KEYS)


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
        self.adaptive_clip = adaptive_clip(cfg, secure=self.secure is not None)
        self.bound = UpdateBound(cfg, self.adaptive_clip)  # stage "clip", per reply
        self.dp = privacy.check_config(cfg)
        self.validator = ReplyValidator(cfg, self.dp)  # stage "validate / decode"
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
        (and its number of training examples when sampling by data size); see
        :mod:`server.discovery`. With ``sign-updates`` also sets up :attr:`verifier`."""
        node_ids = discovery.wait_for_nodes(self.cfg, grid)
        nodes, announced, errors = discovery.query_capabilities(self.cfg, grid, node_ids)
        nodes = self.admit(nodes)
        if not nodes:
            raise RuntimeError(f"no node answered the capability query: {errors}")
        if self.cfg.fl.sign_updates:
            # secure aggregation: the keys also vouch for each node's round keys
            self.verifier, self.signing_public_keys = discovery.signature_verifier(
                self.run_id, nodes, announced, self.registered)
        return nodes

    def admit(self, nodes: Iterable[NodeInfo]) -> list[NodeInfo]:
        """The nodes a run can use, in partition order (:func:`server.discovery.admit`; under
        a base-dependent init also :func:`server.discovery.base_init_nodes`)."""
        kept = discovery.admit(self.cfg, nodes)
        if self.glob.base_init:  # lora.init = pissa / olora: nodes' declared ranks (deployment)
            kept = discovery.base_init_nodes(self.cfg, kept, self.glob.init_rank)
        return kept

    # ------------------------------------------------------------------ per-reply stages

    def verify_signature(self, content: RecordDict, node_id: int, server_round: int) -> None:
        """Check a signed reply before anything is decoded (no-op without sign-updates).

        Raises :class:`~fedlora.privacy.secagg.signing.SignatureRejected` with a reason code.
        """
        if self.verifier is not None:
            signed_wire.verify_reply(self.verifier, content, node_id, server_round)

    def decode(self, reply: Message, node: NodeInfo, sent: Mapping[str, np.ndarray],
               send: str = "ab", server_round: int | None = None) -> Accepted:
        """Validate and decode one reply (:class:`~server.round.validate.ReplyValidator`),
        then bound its change (:class:`~server.round.clip.UpdateBound`).

        Raises UpdateRejected/PayloadError with a reason code.
        """
        return self.bound.accept(self.validator.decode(self.glob, reply, node, sent, send,
                                                       server_round))

    def check_metrics(self, metrics: Mapping[str, Any], server_round: int | None) -> int:
        """A train reply's example count, after checking its metrics
        (:meth:`~server.round.validate.ReplyValidator.check_metrics`)."""
        return self.validator.check_metrics(metrics, server_round)

    def sample(self, nodes: list[NodeInfo], server_round: int) -> list[NodeInfo]:
        """The nodes of one round (:func:`server.round.sampling.sample`); under DP drawn from
        OS entropy and kept in :attr:`dp_samples`."""
        return sampling.sample(self.cfg, nodes, server_round, self.dp.enabled, self.dp_samples)

    def _current_rank(self, node: NodeInfo) -> NodeInfo:
        """``node`` at the rank it pruned to (hetlora-prune), else as it announced itself."""
        return sampling.current_rank(node, self.pruned_ranks)

    # ------------------------------------------------------------------ rounds

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
        found = {"num_nodes": len(nodes), "discover_s": time.perf_counter() - started}
        log(INFO, "fedlora: %d nodes (nodes per rank %s), %d sampled per round (%s), "
            "strategy %s", len(nodes), dict(sorted(Counter(n.rank for n in nodes).items())),
            self.cfg.fl.clients_per_round(len(nodes)), self.cfg.fl.sampling,
            self.cfg.fl.strategy)
        privacy.check_config(self.cfg, len(nodes))  # dp-min-contributors vs the sample
        if start_round == 1:
            self._evaluate_and_log(0, grid, nodes, {"duration_s": 0.0, **found})
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
        msgs = messages_for(self.cfg, self.glob, nodes, server_round,
                            round_plan(self.cfg, max(server_round, 1)), "query.personal_export",
                            self.base_version)
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
        """Write :meth:`state` as the checkpoint of ``server_round`` (keeping the newest
        ``checkpoint-keep``); returns its path."""
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
        or) send/receive → per reply: verify signature, validate/decode, clip (one boundary:
        a reply that raises anything is rejected with a reason, never the run) → central
        noise → weights → aggregate → adopt → diagnose; the caller evaluates and logs."""
        start = time.perf_counter()
        plan = round_plan(self.cfg, server_round)
        sampled = [self._current_rank(n) for n in self.sample(nodes, server_round)]
        out = build_messages(self.cfg, self.glob, sampled, server_round, plan,
                             self.base_version)
        if self.releases is not None:  # before anything leaves: a crash cannot lose it
            self.releases.append(server_round, len(sampled), len(nodes))
        if self.secure is not None:
            return self._secure_round(grid, nodes, sampled, out, plan, server_round, start)
        replies = list(grid.send_and_receive(out.messages, timeout=self.cfg.fl.round_timeout))
        received = receive(replies, out, sampled, self._reply_stages(out, plan, server_round),
                           server_round)
        record = round_record(sampled, received, out.bytes_down, self.bound.end_round())
        wanted = needed(self.cfg, len(sampled))
        if len(received.accepted) < wanted:
            log(WARNING, "Round %d: %d accepted update(s), %d needed (min-accepted / "
                "min-accepted-fraction): round abandoned, the global adapter is unchanged",
                server_round, len(received.accepted), wanted)
            record["abandoned"] = True
        else:
            self._aggregate_and_adopt(received.accepted, sampled, out, plan, server_round,
                                      record)
            self._account(record, len(sampled), len(nodes))
        record["duration_s"] = time.perf_counter() - start
        return record

    def _reply_stages(self, out: Outgoing, plan: RoundPlan, server_round: int) -> ReplyStages:
        """What the per-reply boundary does with each reply of this round."""
        def answered(node: NodeInfo) -> None:  # it now holds every correction it was sent
            self.base_version[node.partition_id] = out.start_version

        return ReplyStages(
            answered=answered,
            verify=lambda content, node_id: self.verify_signature(content, node_id,
                                                                  server_round),
            decode=lambda reply, node, sent: self.decode(reply, node, sent, plan.send,
                                                         server_round))

    def _aggregate_and_adopt(self, accepted: list[Accepted], sampled: list[NodeInfo],
                             out: Outgoing, plan: RoundPlan, server_round: int,
                             record: dict[str, Any]) -> None:
        """Stages noise → weights → aggregate → adopt → diagnose, into ``record``."""
        aggregating = time.perf_counter()
        accepted = capped(self.cfg, noised(accepted, plan.send, self.dp), record)
        weights = [item.update.num_examples for item in accepted]
        # the contributors' metrics are summarised before anything touches the global state
        record.update(client_summary(self.dp, [item.metrics for item in accepted], weights))
        result, heads = aggregate_accepted(self.cfg, self.glob, accepted, out.sent, plan,
                                           server_round)
        diagnostics = result.diagnostics([item.update for item in accepted])
        adopt(self.glob, result, heads, self.optimizer, accepted[0].node.rank, plan)
        if self.cfg.fl.hetlora_prune:  # an accepted pruned upload sets the node's rank
            pruned = sampling.pruned_ranks(sampled, [item.node for item in accepted])
            self.pruned_ranks.update(pruned)
            record["pruned"] = len(pruned)
        record["aggregate_s"] = time.perf_counter() - aggregating
        record.update({key: diagnostics[key] for key in AGGREGATION_KEYS})
        record["base_version"] = self.glob.version
        if "phase" in plan.options:
            record["phase"] = plan.options["phase"]

    def _secure_round(self, grid: Grid, nodes: list[NodeInfo], sampled: list[NodeInfo],
                      out: Outgoing, plan: RoundPlan, server_round: int, start: float) -> dict:
        """The round's exchange and sum under secure aggregation (:class:`SecureRound`),
        adopted by :func:`server.round.secure.adopt_secure`."""
        template, unmask_at_least = prepare(self.cfg, self.glob, self.dp, sampled, out, plan)
        checks = ReplyChecks(
            check_metrics=lambda metrics: self.check_metrics(metrics, server_round),
            check_signature=lambda content, node_id: self.verify_signature(content, node_id,
                                                                           server_round),
            signing_keys=self.signing_public_keys if self.cfg.fl.sign_updates else None,
            run_id=self.run_id)
        outcome = self.secure.run(grid, server_round, sampled, out.messages, template, checks,
                                  min_contributors=unmask_at_least)
        for node in outcome.trained:
            self.base_version[node.partition_id] = out.start_version
        released = outcome.mean is not None  # seen by the server, adopted or not
        record = adopt_secure(self.cfg, self.dp, self.glob, self.optimizer, outcome, out.sent,
                              plan, server_round, out.bytes_down)
        record["duration_s"] = time.perf_counter() - start
        if released:
            self._account(record, len(sampled), len(nodes))
        return record

    def _account(self, record: dict[str, Any], sampled: int, population: int) -> None:
        """With DP: one more Gaussian release of ``sampled`` of ``population`` clients; the
        run's ε so far (for ``dp-delta``) goes into the round's metrics line."""
        if not self.dp.enabled:
            return
        if self.accountant is None:
            self.accountant = privacy.Accountant(self.dp, population=population)
        self.accountant.record_round(sampled)
        record.update(self.accountant.report())

    def _evaluate_and_log(self, server_round: int, grid: Grid, nodes: list[NodeInfo],
                          record: dict[str, Any]) -> None:
        """Stages "evaluate" and "log": central (and federated) evaluation, then the round's
        metrics line (:func:`server.round.evaluate.round_line`) and the per-round extras."""
        start = time.perf_counter()
        metrics = self.evaluate_fn(self.glob) or {}
        # with personal factors (FedSA's B) only the clients can evaluate the model they use
        personal = bool(round_plan(self.cfg, max(server_round, 1)).personal)
        if self.cfg.fl.fraction_evaluate > 0 or personal:
            metrics.update(self.federated_evaluate(grid, nodes, server_round))
        line = evaluate.round_line(self.cfg, self.glob, server_round, nodes, metrics, record,
                                   start)
        self.log_round(line)
        if self.after_round is not None:
            self.after_round(server_round, self.glob)

    def federated_evaluate(self, grid: Grid, nodes: list[NodeInfo], server_round: int
                           ) -> dict[str, float]:
        """Clients evaluate the global adapter (with their personal factors) on local data
        (:func:`server.round.evaluate.federated_evaluate`)."""
        return evaluate.federated_evaluate(self.cfg, self.glob, grid, nodes, server_round,
                                           self.base_version)
