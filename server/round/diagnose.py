"""Stage "diagnose": what a round's metrics line says about its replies and contributors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fedlora.federation.outputs import client_memory
from fedlora.privacy import dp as privacy
from server.nodes import NodeInfo
from server.round.replies import Received

# what a round's AggregationResult.diagnostics contribute to its metrics line
AGGREGATION_KEYS = ("agg_error", "agg_error_mean", "agg_error_max", "effective_rank_mean")


def round_record(sampled: list[NodeInfo], received: Received, bytes_down: int,
                 clip_bound: float | None) -> dict[str, Any]:
    """The metrics line's counts: sampled, accepted (by partition), rejected by reason, bytes
    up and down, the first client errors and the adaptive clip bound the round used."""
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


def client_summary(dp: privacy.DPSpec, metrics: list[Mapping[str, Any]], weights: list[int]
                   ) -> dict[str, float]:
    """What the contributors' metrics say about a round: timings, memory, CPU, examples
    and ``train_loss`` (mean weighted by ``weights``, unless the clients withheld their
    losses: DP with an untrusted server); with central DP the median update norm before
    clipping and the fraction of clients clipped."""
    out: dict[str, float] = client_timings(metrics)
    if dp.mode not in privacy.UNTRUSTED_SERVER:
        out["train_loss"] = sum(float(m["train-loss"]) * w for m, w in
                                zip(metrics, weights, strict=True)) / float(sum(weights))
    if dp.mode == "central":  # for tuning dp-clip-norm: how large, how many clipped
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


def client_timings(metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The slowest accepted client's loading and training seconds (clients run in parallel)."""
    out = {}
    for key, name in (("load-seconds", "client_load_s_max"), ("train-seconds",
                                                             "client_train_s_max")):
        values = [float(m[key]) for m in metrics if isinstance(m.get(key), int | float)]
        if values:
            out[name] = max(values)
    return out
