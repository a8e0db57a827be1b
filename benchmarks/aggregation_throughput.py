"""P1: server aggregation throughput, fedlora's fast path vs Flower's ``aggregate_arrayrecords``.

Eight client replies shaped like Llama-2-7B LoRA on ``q_proj`` and ``v_proj`` at r = 8
(32 layers × 2 modules × (A 8×4096, B 4096×8) = 4.19 M float32 parameters, 16 MiB per client,
PEFT key names), each packed by :func:`fedlora.federation.transport.pack` as a client does and
carried as
Flower reply content ``{"arrays": ArrayRecord, "metrics": MetricRecord(num-examples)}``. Both
sides return the example-weighted mean as one ``ArrayRecord``:

* ours: :func:`fedlora.federation.fastagg.weighted_mean_records`;
* peer: ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`` (what Flower's
  ``FedAvg.aggregate_train`` calls), on the identical ``RecordDict``s.

Also timed, for context only: fedlora's generic server path on the same replies
(``unpack`` → ``split_arrays`` → ``aggregate("fedit")`` with validation → ``join_arrays`` →
``pack``). Run ``python -m benchmarks --only P1 [--quick]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from benchmarks.common import at_most, best_times, equal, result
from fedlora.aggregation import ClientUpdate, aggregate, scale_for_rank, weighted_mean
from fedlora.federation.fastagg import weighted_mean_records
from fedlora.federation.global_adapter import join_arrays, split_arrays
from fedlora.federation.transport import nbytes, pack, unpack
from fedlora.learning.lora import LORA_A, LORA_B

ID = "P1"
TITLE = "aggregation throughput"
CLIENTS, RANK, ALPHA, HIDDEN = 8, 8, 16.0, 4096
MODULES = ("q_proj", "v_proj")
WEIGHT_KEY = "num-examples"
TARGET_RATIO, TOLERANCE = 4.0, 1e-6


def client_arrays(rng: np.random.Generator, layers: int) -> dict[str, np.ndarray]:
    """One client's adapter with Llama-2-7B's q/v LoRA key names and shapes."""
    arrays = {}
    for layer in range(layers):
        for module in MODULES:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            arrays[prefix + LORA_A] = rng.normal(0.0, HIDDEN**-0.5, (RANK, HIDDEN))  # (r, n)
            arrays[prefix + LORA_B] = rng.normal(0.0, 1e-2, (HIDDEN, RANK))  # (m, r)
    return arrays


def replies(layers: int, seed: int = 0) -> list[RecordDict]:
    """What the server holds after a round: one reply content per client."""
    rng = np.random.default_rng(seed)
    return [
        RecordDict({"arrays": pack(client_arrays(rng, layers)),
                    "metrics": MetricRecord({WEIGHT_KEY: int(rng.integers(50, 500))})})
        for _ in range(CLIENTS)
    ]


def ours(contents: list[RecordDict]):
    return weighted_mean_records([c["arrays"] for c in contents],
                                 [c["metrics"][WEIGHT_KEY] for c in contents])


def peer(contents: list[RecordDict]):
    return aggregate_arrayrecords(contents, WEIGHT_KEY)


def fedit_pipeline(contents: list[RecordDict]):
    """fedlora's generic path: decode, validate, ``fedit``, encode."""
    scale = scale_for_rank(RANK, ALPHA)
    updates = []
    for c in contents:
        factors, _ = split_arrays(unpack(c["arrays"]), scale)
        updates.append(ClientUpdate(factors=factors, num_examples=int(c["metrics"][WEIGHT_KEY])))
    aggregated = aggregate("fedit", updates, lora_alpha=ALPHA)
    return pack(join_arrays(aggregated.global_factors, {}))


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(a[k].numpy().astype(np.float64) - b[k].numpy())))
               for k in a)


def run(quick: bool = False) -> dict[str, Any]:
    """Time ours and Flower's interleaved (best of N) and check they agree.

    Parameters
    ----------
    quick
        8 layers instead of 32 and fewer repeats.
    """
    layers, repeats = (8, 3) if quick else (32, 11)
    contents = replies(layers)
    times, outputs = best_times({"ours": lambda: ours(contents),
                                 "peer": lambda: peer(contents)}, repeats)
    pipeline_times, pipeline_out = best_times({"fedit": lambda: fedit_pipeline(contents)},
                                              1 if quick else 3)
    mine, theirs, generic = outputs["ours"], outputs["peer"], pipeline_out["fedit"]

    decoded = [unpack(c["arrays"]) for c in contents]
    counts = [c["metrics"][WEIGHT_KEY] for c in contents]
    reference = {k: weighted_mean([d[k] for d in decoded], counts) for k in decoded[0]}
    diff = _max_diff(mine, theirs)
    params_per_client = sum(int(a.size) for a in decoded[0].values())
    input_bytes = 4 * params_per_client * CLIENTS
    checks = [
        at_most("max |ours - flower|", diff, TOLERANCE),
        at_most("max |ours - weighted_mean float64|",
                max(float(np.max(np.abs(mine[k].numpy().astype(np.float64) - reference[k])))
                    for k in reference), TOLERANCE),
        at_most("max |ours - fedit pipeline|", _max_diff(mine, generic), TOLERANCE),
        equal("keys in flower's order", list(mine.keys()) == list(theirs.keys()), True),
        equal("record bytes as flower's", nbytes(mine), nbytes(theirs)),
    ]
    ratio = times["peer"] / times["ours"]
    ours_gbs, peer_gbs = input_bytes / times["ours"] / 1e9, input_bytes / times["peer"] / 1e9
    return result(
        bench_id=ID, name=f"{ID} {TITLE}", ours_s=times["ours"],
        peer="flwr aggregate_arrayrecords", peer_s=times["peer"], max_abs_diff=diff,
        params={
            "clients": CLIENTS, "layers": layers, "modules": list(MODULES), "rank": RANK,
            "hidden": HIDDEN, "params_per_client": params_per_client,
            "input_float32_bytes": input_bytes, "repeats": repeats, "quick": quick,
            "ours_gb_per_s": ours_gbs, "peer_gb_per_s": peer_gbs,
            "fedit_pipeline_s": pipeline_times["fedit"],
            "weights": "num-examples", "gb_per_s_meaning": "input float32 bytes / seconds",
        },
        target=f"ratio >= {TARGET_RATIO:g} (max_abs_diff <= {TOLERANCE:g})",
        target_met=ratio >= TARGET_RATIO,
        checks=checks,
        summary=(f"{ours_gbs:.1f} GB/s vs {peer_gbs:.1f} GB/s; generic fedit path "
                 f"{pipeline_times['fedit'] * 1e3:.0f} ms"),
    )
