"""Secure aggregation as a stage: it replaces send/receive → per reply → aggregate of the
plain round by :class:`server.secure_round.SecureRound`, whose masked sum is adopted like a
plain aggregate (:func:`server.round.aggregate.adopt_mean`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import WARNING
from typing import Any

import numpy as np
from flwr.common import log

from fedlora.aggregation import ServerOptimizer
from fedlora.config import RunConfig
from fedlora.errors import PayloadError
from fedlora.federation.global_adapter import GlobalAdapter
from fedlora.federation.wire_schema import select_outgoing
from fedlora.privacy import dp as privacy
from fedlora.privacy import secure_hetlora
from server.nodes import NodeInfo
from server.round.aggregate import adopt, adopt_mean
from server.round.diagnose import client_summary
from server.round.messages import Outgoing
from server.round.plan import RoundPlan, needed
from server.round.replies import last_line
from server.secure_round import SecureOutcome


def prepare(cfg: RunConfig, glob: GlobalAdapter, dp: privacy.DPSpec, sampled: list[NodeInfo],
            out: Outgoing, plan: RoundPlan) -> tuple[dict[str, np.ndarray], int]:
    """The layout one node uploads (the template of the masked vector) and how many masked
    inputs the round needs before it unmasks; HetLoRA's padding rank and gain, and
    distributed DP's number of contributors, go into the train messages' configs."""
    template = select_outgoing(out.sent[sampled[0].node_id], plan.send)
    if cfg.fl.strategy == "hetlora":  # uploads padded to the round's largest rank
        gain, pad = secure_hetlora.gain(glob.adapter), max(n.rank for n in sampled)
        for msg in out.messages:
            msg.content["config"]["hetlora-gain"] = gain
            msg.content["config"]["hetlora-rank"] = pad
        template = secure_hetlora.prescale(template, 1, sampled[0].rank, pad,
                                           glob.lora_alpha, glob.rslora)
    unmask_at_least = 0
    if dp.mode == "distributed":  # each client's share of the noise is 1/m
        contributors = cfg.fl.dp_min_contributors or len(sampled)
        privacy.check_secure_range(template, dp, contributors, cfg.fl.secagg_clip_range)
        for msg in out.messages:
            msg.content["config"][privacy.CONTRIBUTORS_KEY] = contributors
        unmask_at_least = max(contributors, needed(cfg, len(sampled)))
    return template, unmask_at_least


def outcome_record(outcome: SecureOutcome, num_sampled: int, bytes_down: int
                   ) -> dict[str, Any]:
    """A secure round's counts for its metrics line."""
    return {
        "num_sampled": num_sampled, "num_accepted": len(outcome.contributors),
        "clients": [n.partition_id for n, _ in outcome.contributors],
        "rejected": {k: v for k, v in sorted(outcome.rejected.items()) if v},
        "bytes_up": outcome.bytes_up, "bytes_down": bytes_down + outcome.bytes_down,
        "secagg_dropped": outcome.dropped, "secagg_s": outcome.seconds,
    }


def unscaled_mean(cfg: RunConfig, outcome: SecureOutcome
                  ) -> tuple[dict[str, np.ndarray] | None, float]:
    """The secure sum's mean and error bound; under HetLoRA the norm-weighted sums and their
    normalisers become HetLoRA's padded means (``None``, and ``outcome.aborted`` set, when
    they cannot)."""
    mean, error_bound = outcome.mean, outcome.error_bound
    if mean is not None and cfg.fl.strategy == "hetlora":
        try:
            mean, normaliser = secure_hetlora.unscale(mean)
            error_bound /= normaliser
        except PayloadError as exc:
            mean, outcome.aborted = None, str(exc)
    return mean, error_bound


def warn_clipped(cfg: RunConfig, outcome: SecureOutcome, record: dict[str, Any],
                 server_round: int) -> None:
    """Count (and log) the uploaded values the fixed-point codec clipped."""
    clipped = {n.partition_id: int(m.get("secagg-clipped", 0)) for n, m in outcome.contributors}
    if any(clipped.values()):
        record["secagg_clipped"] = sum(clipped.values())
        log(WARNING, "Round %d: secure aggregation clipped %d uploaded value(s) to "
            "±secagg-clip-range %g (by partition: %s); raise secagg-clip-range if the "
            "adapter's values are that large", server_round, record["secagg_clipped"],
            cfg.fl.secagg_clip_range, {p: c for p, c in clipped.items() if c})


def adopt_secure(cfg: RunConfig, dp: privacy.DPSpec, glob: GlobalAdapter,
                 optimizer: ServerOptimizer | None, outcome: SecureOutcome,
                 sent: Mapping[int, Mapping[str, np.ndarray]], plan: RoundPlan,
                 server_round: int, bytes_down: int) -> dict[str, Any]:
    """A secure round's metrics line (without ``duration_s``); its mean is adopted like a
    plain aggregate, or the round is abandoned (too few contributors, or no sum)."""
    contributors = outcome.contributors
    record = outcome_record(outcome, len(sent), bytes_down)
    mean, error_bound = unscaled_mean(cfg, outcome)
    errors = ([outcome.aborted] if outcome.aborted else []) + outcome.errors
    if errors:
        record["errors"] = [last_line(e) for e in errors[:5]]
    wanted = needed(cfg, len(sent))
    if mean is None or len(contributors) < wanted:
        log(WARNING, "Round %d: %d update(s) in the secure sum, %d needed (min-accepted / "
            "min-accepted-fraction / secure aggregation threshold): round abandoned, the "
            "global adapter is unchanged", server_round, len(contributors), wanted)
        record["abandoned"] = True
        if outcome.aborted:  # SECAGG_<reason>: BELOW_THRESHOLD, OUT_OF_RANGE, ...
            record["abandon_reason"] = f"SECAGG_{outcome.abort_reason or 'ABORTED'}"
        return record
    node = contributors[0][0]
    warn_clipped(cfg, outcome, record, server_round)
    weights = [int(m["num-examples"]) for _, m in contributors]
    aggregating = time.perf_counter()
    result, heads, update = adopt_mean(cfg, glob, mean, sent[node.node_id], node,
                                       sum(weights), plan, server_round)
    adopt(glob, result, heads, optimizer, node.rank, plan)
    record["aggregate_s"] = time.perf_counter() - aggregating
    record.update(client_summary(dp, [m for _, m in contributors], weights))
    record.update({
        "effective_rank_mean": result.diagnostics([update])["effective_rank_mean"],
        "base_version": glob.version,
        "secagg_error_bound": error_bound,
    })
    if "phase" in plan.options:
        record["phase"] = plan.options["phase"]
    return record
