"""P6: the default demo, ``fedlora run`` (preset ``bbc-minilm``: 3 clients × 3 rounds), end to
end, and where its wall time goes.

The split comes from what the run already records: ``summary.json`` (when the ServerApp
started, its model load, the adapter export) and each ``metrics.jsonl`` line (its ``time``
stamp, the round's duration, the slowest client's loading and training, aggregation and
evaluation seconds, and in round 0 the wait for the nodes):

* ``flower_startup``: launch → ServerApp start (SuperLink, ``flwr run``, SuperExec, the
  simulation process);
* ``server_model_load``: base model + LoRA + held-out data, tokenized (ServerApp);
* ``wait_for_nodes``: Ray workers start and answer the capability query (overlaps nothing:
  the server waits);
* ``client_model_load``: the slowest client's model, data and adapter loading, summed over
  rounds (round 1 loads the model and tokenizes; later rounds only load the adapter);
* ``training``: the slowest client's local training, summed over rounds;
* ``aggregation``, ``evaluation`` (central, rounds 0..R);
* ``queue_and_messaging``: the rest of each round's duration: Flower's transport and
  scheduling, and the wait of the clients that find no free worker (3 clients share 2 Ray
  workers, one per core, so a third client trains after one of the first two);
* ``teardown``: end of the last round → exit (last checkpoint, adapter export, Flower
  shutdown, final status);
* ``other``: whatever remains (checkpoints and metrics lines between rounds, server set-up).

The peer is :mod:`benchmarks.plain`'s loop doing the same training in this process: the same
3 × 3 × 10 = 90 steps of 16 examples on the 3 clients' articles, plus loading the model and
evaluating the held-out articles once (Python and the libraries are already imported).
Correctness: the exported adapter, loaded with ``PeftModel.from_pretrained`` on a fresh base,
reproduces the run's final accuracy. Not part of ``--quick`` (``QUICK_SKIP`` in
``benchmarks/__main__.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import plain
from benchmarks.common import at_most, checkout_pythonpath, equal, result
from fedlora import config
from fedlora.federation.outputs import read_metrics
from fedlora.learning import builders, data, training
from fedlora.learning.evaluator import load_exported
from fedlora.runtime import run_setup

ID = "P6"
TITLE = "default demo end to end"


def demo(out: Path) -> dict[str, Any]:
    """Run ``fedlora run --out OUT`` (the default job); its wall time and outputs."""
    launched = time.time()
    done = subprocess.run([sys.executable, "-m", "fedlora", "run", "--out", str(out)],
                          capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "PYTHONPATH": checkout_pythonpath()})
    ended = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"fedlora run failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"launched": launched, "ended": ended, "records": read_metrics(out),
            "summary": summary}


def split(run: dict[str, Any]) -> dict[str, float]:
    """Seconds of the wall time by phase (see module docstring); they add up to the wall."""
    records, summary = run["records"], run["summary"]
    rounds = [r for r in records if r["round"] > 0]
    parts = {
        "flower_startup": summary["started_at"] - run["launched"],
        "server_model_load": summary["model_load_s"],
        "wait_for_nodes": records[0]["discover_s"],
        "client_model_load": sum(r["client_load_s_max"] for r in rounds),
        "training": sum(r["client_train_s_max"] for r in rounds),
        "aggregation": sum(r["aggregate_s"] for r in rounds),
        "evaluation": sum(r["eval_s"] for r in records),
        "queue_and_messaging": sum(r["duration_s"] - r["client_load_s_max"]
                                   - r["client_train_s_max"] - r["aggregate_s"]
                                   for r in rounds),
        "teardown": run["ended"] - records[-1]["time"],
    }
    parts["other"] = run["ended"] - run["launched"] - sum(parts.values())
    return parts


def plain_equivalent(flat: dict[str, Any], clients: int) -> dict[str, Any]:
    """The same training as one plain loop: model load, tokenization, steps, one evaluation."""
    cfg = config.from_flat(flat)
    start = time.perf_counter()
    spec = builders.model_spec(cfg)
    setup = plain.PlainSetup(model_dir=spec.path, num_labels=spec.num_labels, r=cfg.lora.r,
                             alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                             target_modules=tuple(cfg.lora.target_module_list))
    model, tokenizer = plain.build(setup)
    texts, labels = [], []
    for partition in range(clients):
        rows, _ = data.client_split(builders.data_spec(cfg), partition, clients)
        texts += list(rows["text"])
        labels += [int(v) for v in rows["label"]]
    heldout = data.heldout(builders.data_spec(cfg))
    ids = plain.encode(tokenizer, texts, cfg.data.max_length)
    test_ids = plain.encode(tokenizer, heldout["text"], cfg.data.max_length)
    steps = clients * cfg.fl.num_server_rounds * cfg.train.local_steps
    plain.train(model, tokenizer, ids, labels, steps=steps, batch_size=cfg.train.batch_size,
                lr=cfg.train.lr, seed=0)
    accuracy = plain.evaluate(model, tokenizer, test_ids, [int(v) for v in heldout["label"]],
                              cfg.eval.batch_size)
    return {"seconds": time.perf_counter() - start, "steps": steps, "accuracy": accuracy}


def reevaluate(out: Path, flat: dict[str, Any]) -> float:
    """Accuracy of the exported adapter loaded with ``PeftModel.from_pretrained``."""
    cfg = config.from_flat(flat)
    model, tokenizer = load_exported(out / "adapter", cfg)
    examples = data.tokenize(data.heldout(builders.data_spec(cfg)), tokenizer, cfg.model.task,
                             cfg.data.max_length)
    return training.evaluate(model, examples, cfg.eval.batch_size, tokenizer.pad_token_id,
                             cfg.model.task)["eval-accuracy"]


def run(quick: bool = False) -> dict[str, Any]:
    """The default demo end to end and its split (there is no quick mode: ``--quick`` skips
    it, see ``QUICK_SKIP`` in ``benchmarks/__main__.py``)."""
    if quick:
        raise ValueError(f"{ID} has no quick mode; `python -m benchmarks --quick` skips it")
    flat = config.defaults()
    layer = run_setup.preset_layer()
    clients = int(layer.pop("num-clients"))
    flat.update(layer)
    with tempfile.TemporaryDirectory(prefix="fedlora-p6-") as tmp:
        out = Path(tmp) / "demo"
        ours = demo(out)
        again = reevaluate(out, flat)
    peer = plain_equivalent(flat, clients)
    records = ours["records"]
    wall = ours["ended"] - ours["launched"]
    parts = split(ours)
    accuracy = float(records[-1]["eval_accuracy"])
    completed = sum(1 for r in records if r["round"] > 0 and r["num_accepted"] == clients)
    return result(
        bench_id=ID, name=f"{ID} {TITLE}", ours_s=wall,
        peer="plain PEFT loop, same steps + load + 1 evaluation", peer_s=peer["seconds"],
        max_abs_diff=abs(again - accuracy),
        params={"clients": clients, "rounds": flat["num-server-rounds"],
                "split_s": parts, "split_fraction": {k: v / wall for k, v in parts.items()},
                "final_accuracy": accuracy, "exported_adapter_accuracy": again,
                "peer_steps": peer["steps"], "peer_accuracy": peer["accuracy"],
                "server_wall_s": ours["summary"]["wall_s"]},
        target="none: the wall time and its split are reported",
        target_met=None,
        checks=[equal("rounds completed by every client", completed,
                      flat["num-server-rounds"]),
                at_most("|exported adapter accuracy - reported|", abs(again - accuracy), 0.01)],
        summary=(f"{wall:.1f} s end to end, accuracy {accuracy:.4f}: "
                 + ", ".join(f"{k} {v:.1f}" for k, v in sorted(parts.items(),
                                                                key=lambda kv: -kv[1]))),
    )
