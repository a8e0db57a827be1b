"""Stages "evaluate" and "log": federated evaluation of the global adapter, and the round's
metrics line."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from fedlora.aggregation.diagnostics import tier_diagnostics
from fedlora.config import RunConfig
from fedlora.errors import PayloadError
from fedlora.federation import wire_schema
from fedlora.federation.global_adapter import GlobalAdapter
from fedlora.federation.outputs import rss_mb
from server.nodes import NodeInfo
from server.round.messages import messages_for
from server.round.plan import round_plan
from server.round.replies import last_line
from server.round.sampling import evaluation_sample


def eval_metrics(cfg: RunConfig, reply: Message) -> dict[str, int | float]:
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
                                        wire_schema.eval_required(cfg.model.task))
    n = checked["num-examples"]
    if not 0 < n <= cfg.fl.max_examples:
        raise PayloadError("BAD_EXAMPLE_COUNT", f"num-examples must be in 1.."
                           f"{cfg.fl.max_examples} (max-examples), got {n}")
    for key, (low, high) in wire_schema.EVAL_RANGES.items():
        if key in checked and not low <= checked[key] <= high:
            raise PayloadError("BAD_METRICS", f"{key} must be in {low}..{high}, got "
                               f"{checked[key]}")
    return checked


def federated_evaluate(cfg: RunConfig, glob: GlobalAdapter, grid: Grid, nodes: list[NodeInfo],
                       server_round: int, base_version: Mapping[int, int]) -> dict[str, Any]:
    """Clients evaluate the global adapter (with their personal factors) on local data; the
    example-weighted means of their metrics (``fed_*``). One boundary per answer: a bad one
    is left out of the mean (counted in ``fed_eval_rejected``), never the run."""
    if cfg.fl.fraction_evaluate:
        k = max(1, int(round(len(nodes) * cfg.fl.fraction_evaluate)))
    else:  # personal factors: as many nodes as a round trains, not every node
        k = cfg.fl.clients_per_round(len(nodes))
    chosen = evaluation_sample(cfg, nodes, server_round, k)
    msgs = messages_for(cfg, glob, chosen, server_round, round_plan(cfg, max(server_round, 1)),
                        MessageType.EVALUATE, base_version)
    results, rejected = [], Counter()
    for reply in grid.send_and_receive(msgs, timeout=cfg.fl.round_timeout):
        try:
            results.append(eval_metrics(cfg, reply))
        except Exception as exc:  # noqa: BLE001
            reason = exc.reason if isinstance(exc, PayloadError) else "MALFORMED"
            rejected[reason] += 1
            log(WARNING, "Round %d: left out the evaluation of node %s (%s): %s",
                server_round, reply.metadata.src_node_id, reason, last_line(str(exc))[:300])
    out: dict[str, Any] = {}
    if rejected:
        out["fed_eval_rejected"] = dict(sorted(rejected.items()))
    if not results:
        return out
    total = sum(m["num-examples"] for m in results)
    keys = wire_schema.eval_required(cfg.model.task)  # what every accepted reply has
    out.update({f"fed_{k.replace('-', '_')}": sum(float(m[k]) * m["num-examples"]
                                                  for m in results) / total
                for k in keys if k.startswith("eval-") and k != "eval-examples"})
    out["fed_eval_clients"] = len(results)
    return out


def round_line(cfg: RunConfig, glob: GlobalAdapter, server_round: int, nodes: list[NodeInfo],
               metrics: Mapping[str, Any], record: Mapping[str, Any], eval_started: float
               ) -> dict[str, Any]:
    """Stage "log": the round's metrics line (evaluation, the round's record, what each rank
    tier receives next, timings and memory), also logged in one line."""
    line: dict[str, Any] = {"round": server_round, "strategy": cfg.fl.strategy}
    line.update({k.replace("-", "_"): v for k, v in metrics.items()})
    line.update(record)
    # what each rank tier receives next round: capacity kept or lost under sampling
    line.update(tier_diagnostics(glob.view, {n.rank for n in nodes}))
    line["eval_s"] = time.perf_counter() - eval_started
    line["server_rss_mb"] = round(rss_mb(), 1)
    line["time"] = time.time()  # Unix time the round ended: wall time between rounds
    line["server_peak_rss_mb"] = round(rss_mb(peak=True), 1)
    log(INFO, "fedlora round %d: %s", server_round,
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in line.items()})
    return line
