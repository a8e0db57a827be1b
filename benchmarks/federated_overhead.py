"""P3: what a federated round costs beyond the same local steps in a plain training loop.

A tiny setup, so that the overhead is not hidden by compute: all-MiniLM-L6-v2 truncated to one
layer, LoRA r = 8 on ``query``/``value`` + the classifier, 2 clients × 32 BBC News articles,
batch 8, 32 tokens, 5 local steps per round, 20 rounds. The same total local steps run

* (peer) as :mod:`benchmarks.plain`'s loop in one process: 20 × 2 × 5 = 200 steps on both
  clients' examples;
* (ours) as ``fedlora run --num-clients 2`` on Flower's simulation engine (SuperLink, Ray, one
  ClientApp worker per client), timed from outside and from the ``time`` stamp that every
  ``metrics.jsonl`` line carries: a round is the time between two lines, over rounds 2..R
  (round 1 also loads the clients' model and data); start-up = launch → end of round 1, less
  one round; teardown = end of round R → the command's exit;
* (in-process) the same rounds through the real strategy and ClientApp handlers without
  Flower's transport (:mod:`server.inprocess`; clients run one after the other, as in the
  plain loop): in-process − plain is fedlora's own per-round cost (central evaluation,
  checkpoint, adapter in/out, aggregation); ours − in-process is Flower's transport and
  scheduling, less what the two clients gain by training in parallel.

The plain loop is timed step by step and summed per round (2 × 5 steps). The headline
numbers are medians over the rounds, because the machine is shared: a burst of someone
else's work lands in a few rounds; the means are reported too. Each round's split (means
over rounds 2..R) comes from the round metrics: the central evaluation (``eval_s``),
aggregation (``aggregate_s``), the slowest client's loading and training
(``client_load_s_max``, ``client_train_s_max``), messaging (the rest of ``duration_s``; in
process it also holds the other client's training, as clients run one after the other) and
the rest of the gap between two rounds (checkpoint, metrics line).

``--quick`` runs the in-process rounds (2) and the plain loop only: no Flower processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import plain
from benchmarks.common import checkout_pythonpath, equal, result
from clients.app import app as client_app
from fedlora import config
from fedlora.federation.outputs import read_metrics
from fedlora.learning import builders, data
from fedlora.learning.evaluator import ServerModel
from server.inprocess import InProcessGrid
from server.strategy import FederatedLora

ID = "P3"
TITLE = "federated overhead per round"
TARGET_S = 0.150  # ours − plain per round, after start-up
CLIENTS = 2
TINY = {
    "model.num-hidden-layers": 1,
    "data.samples-per-client": 32,
    "data.eval-samples": 64,
    "data.max-length": 32,
    "train.local-steps": 5,
    "train.batch-size": 8,
}


def tiny_config(rounds: int, out: Path) -> dict[str, Any]:
    flat = {**config.defaults(), **TINY, "num-server-rounds": rounds, "output-dir": str(out)}
    return flat


def round_split(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean seconds per round over rounds 2..R, by where they went (see module docstring)."""
    steady = [r for r in records if r["round"] >= 2]
    times = {r["round"]: r["time"] for r in records}
    gaps = [times[r["round"]] - times[r["round"] - 1] for r in steady]

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in steady]))

    split = {key: mean(key) for key in ("client_load_s_max", "client_train_s_max",
                                        "aggregate_s", "eval_s")}
    split["messaging_s"] = mean("duration_s") - (split["client_load_s_max"] +
                                                 split["client_train_s_max"] +
                                                 split["aggregate_s"])
    split["between_rounds_s"] = float(np.mean(gaps)) - mean("duration_s") - split["eval_s"]
    split["round_s"] = float(np.mean(gaps))
    return split


def round_times(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """Seconds between consecutive metrics lines, rounds 2..R."""
    times = {r["round"]: r["time"] for r in records}
    return [times[r] - times[r - 1] for r in sorted(times) if r >= 2]


def simulation(rounds: int, out: Path) -> dict[str, Any]:
    """``fedlora run`` of the tiny job on Flower's simulation engine; its timeline."""
    overrides = " ".join(f"{k}={v}" for k, v in TINY.items())
    cmd = [sys.executable, "-m", "fedlora", "run", "--num-clients", str(CLIENTS), "--rounds",
           str(rounds), "--out", str(out), "-c", overrides]
    launched = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": checkout_pythonpath()})
    ended = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"fedlora run failed:\n{done.stderr[-3000:]}")
    records = read_metrics(out)
    t = {r["round"]: r["time"] for r in records}
    per_round = float(np.median(round_times(records)))
    return {"records": records, "per_round_s": per_round,
            "mean_round_s": float(np.mean(round_times(records))), "wall_s": ended - launched,
            "startup_s": t[1] - launched - per_round, "teardown_s": ended - t[rounds]}


def in_process(rounds: int, out: Path) -> dict[str, Any]:
    """The same rounds through the real strategy and ClientApp, in this process."""
    flat = tiny_config(rounds, out)
    cfg = config.from_flat(flat)
    nodes = [{"partition-id": i, "num-partitions": CLIENTS} for i in range(CLIENTS)]
    server_model = ServerModel(cfg, cfg.fl.max_rank)
    records: list[dict[str, Any]] = []
    strategy = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                             records.append)
    strategy.run(InProcessGrid(client_app, nodes, flat), checkpoint_dir=out / "checkpoints")
    return {"records": records, "per_round_s": float(np.median(round_times(records))),
            "mean_round_s": float(np.mean(round_times(records)))}


def plain_loop(rounds: int) -> dict[str, Any]:
    """The plain loop: the same model, examples, batch and total steps, in one process."""
    cfg = config.from_flat(tiny_config(rounds, Path(".")))
    spec = builders.model_spec(cfg)
    setup = plain.PlainSetup(model_dir=spec.path, num_labels=spec.num_labels,
                             num_hidden_layers=cfg.model.num_hidden_layers, r=cfg.lora.r,
                             alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                             target_modules=tuple(cfg.lora.target_module_list))
    model, tokenizer = plain.build(setup)
    texts, labels = [], []
    for partition in range(CLIENTS):
        rows, _ = data.client_split(builders.data_spec(cfg), partition, CLIENTS)
        texts += list(rows["text"])
        labels += [int(v) for v in rows["label"]]
    ids = plain.encode(tokenizer, texts, cfg.data.max_length)
    per_round = CLIENTS * cfg.train.local_steps
    _, seconds = plain.train(model, tokenizer, ids, labels, steps=rounds * per_round,
                             batch_size=cfg.train.batch_size, lr=cfg.train.lr, seed=0)
    by_round = [sum(seconds[i:i + per_round]) for i in range(0, len(seconds), per_round)]
    return {"steps": len(seconds), "per_round_s": float(np.median(by_round)),
            "mean_round_s": float(np.mean(by_round))}


def run(quick: bool = False) -> dict[str, Any]:
    """Plain loop, in-process rounds and (unless ``quick``) the Flower simulation.

    Parameters
    ----------
    quick
        2 in-process rounds against the plain loop; no simulation (``ours`` is then the
        in-process round).
    """
    rounds = 2 if quick else 20
    with tempfile.TemporaryDirectory(prefix="fedlora-p3-") as tmp:
        peer = plain_loop(rounds)
        local = in_process(rounds, Path(tmp) / "in-process")
        sim = None if quick else simulation(rounds, Path(tmp) / "simulation")
    ours = local if sim is None else sim
    completed = sum(1 for r in ours["records"] if r["round"] > 0 and
                    r.get("num_accepted") == CLIENTS)
    fed_steps = completed * CLIENTS * TINY["train.local-steps"]
    overhead = ours["per_round_s"] - peer["per_round_s"]
    params: dict[str, Any] = {
        "setup": "all-MiniLM-L6-v2 with 1 layer, LoRA r=8 query,value + classifier, "
                 f"{CLIENTS} clients x 32 articles, batch 8, 32 tokens, 5 local steps",
        "rounds": rounds, "engine": "in-process" if sim is None else "flower-simulation",
        "overhead_per_round_s": overhead,
        "plain_per_round_s": peer["per_round_s"],
        "mean_round_s": {"ours": ours["mean_round_s"], "plain": peer["mean_round_s"],
                         "in_process": local["mean_round_s"]},
        "in_process_per_round_s": local["per_round_s"],
        "in_process_overhead_per_round_s": local["per_round_s"] - peer["per_round_s"],
        "in_process_split_s": round_split(local["records"]),
        "quick": quick,
    }
    if sim is not None:
        params.update({
            "simulation_split_s": round_split(sim["records"]),
            "startup_s": sim["startup_s"], "teardown_s": sim["teardown_s"],
            "wall_s": sim["wall_s"],
            "flower_vs_in_process_per_round_s": sim["per_round_s"] - local["per_round_s"],
        })
    return result(
        bench_id=ID, name=f"{ID} {TITLE}", ours_s=ours["per_round_s"],
        peer="plain PEFT loop (same steps)", peer_s=peer["per_round_s"],
        max_abs_diff=float(abs(fed_steps - peer["steps"])), params=params,
        target=f"ours - plain <= {TARGET_S * 1e3:.0f} ms per round",
        target_met=None if quick else overhead <= TARGET_S,
        checks=[equal("rounds completed by every client", completed, rounds),
                equal("local steps: federated = plain", fed_steps, peer["steps"])],
        summary=(f"{ours['per_round_s'] * 1e3:.0f} ms per round "
                 f"({params['engine']}) vs {peer['per_round_s'] * 1e3:.0f} ms plain: "
                 f"+{overhead * 1e3:.0f} ms"
                 + ("" if sim is None else f"; start-up {sim['startup_s']:.1f} s, "
                                           f"teardown {sim['teardown_s']:.1f} s")),
    )
