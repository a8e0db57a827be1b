"""Reference points for federated runs, with the same data, model, seeds and step budget.

* ``centralized`` — one adapter trained on all clients' training data pooled together. Per
  "round" it takes as many steps as the federation does in total per round (clients sampled
  per round × local steps), so after round r both have spent the same number of local steps.
* ``local`` — every client trains its own adapter (at its own rank) on its own data only, the
  same local steps per round, and never communicates; the reported metrics are the mean over
  clients of each client's adapter on the server's held-out set.

Both run in-process with the same training and evaluation loops as the clients and the
server, and write ``metrics.jsonl`` in the same format as a federated run (bytes are zero).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.federation.outputs import RunOutputs
from fedlora.learning import builders, data, lora, training


def _heldout(cfg: RunConfig, tokenizer: Any) -> list[dict]:
    held = data.heldout(builders.data_spec(cfg))
    if held is None:
        raise ConfigError("baselines evaluate on the server's held-out split; this data source "
                          "has none (data.source = 'files' without a shared file)")
    return data.tokenize(held, tokenizer, cfg.model.task, cfg.data.max_length)


def _client_examples(cfg: RunConfig, num_clients: int, tokenizer: Any) -> list[list[dict]]:
    spec = builders.data_spec(cfg)
    return [data.tokenize(data.client_split(spec, pid, num_clients)[0], tokenizer,
                          cfg.model.task, cfg.data.max_length) for pid in range(num_clients)]


def _metrics_line(round_: int, kind: str, train_loss: float | None,
                  evals: list[dict[str, float]], started: float) -> dict[str, Any]:
    line: dict[str, Any] = {"round": round_, "strategy": kind}
    if train_loss is not None:
        line["train_loss"] = train_loss
    for key in evals[0]:
        values = [e[key] for e in evals if key in e]
        line[key.replace("-", "_")] = float(np.mean(values))
        if kind == "local" and key in ("eval-accuracy", "eval-loss") and len(values) > 1:
            line[key.replace("-", "_") + "_std"] = float(np.std(values))
    line.update(bytes_up=0, bytes_down=0, duration_s=time.perf_counter() - started)
    return line


def run(kind: str, cfg: RunConfig, num_clients: int, out: Path,
        on_round: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run one baseline; returns (and writes to ``out/metrics.jsonl``) one record per round."""
    if kind not in ("centralized", "local"):
        raise ConfigError(f"unknown baseline {kind!r}; available: centralized, local")
    outputs = RunOutputs(out, cfg)
    ranks = [cfg.rank_for_partition(pid) for pid in range(num_clients)]
    model_spec = builders.model_spec(cfg)
    rounds = cfg.fl.num_server_rounds
    records: list[dict[str, Any]] = []

    def log(record: dict[str, Any]) -> None:
        outputs.log_round(record)
        records.append(record)
        if on_round:
            on_round(record)

    if kind == "centralized":
        rank = max(ranks)  # the largest adapter any client could hold
        model, tok = lora.build_peft_model(model_spec, builders.adapter_spec(cfg, rank),
                                           seed=cfg.fl.seed)
        held = _heldout(cfg, tok)
        pooled = [ex for part in _client_examples(cfg, num_clients, tok) for ex in part]
        steps = cfg.fl.clients_per_round(num_clients) * cfg.train.local_steps

        def evaluate() -> list[dict[str, float]]:
            return [training.evaluate(model, held, cfg.eval.batch_size, tok.pad_token_id,
                                      cfg.model.task)]

        started = time.perf_counter()
        log(_metrics_line(0, kind, None, evaluate(), started))
        for r in range(1, rounds + 1):
            started = time.perf_counter()
            spec = replace(builders.train_spec(cfg, r, 0), steps=steps)
            lora.set_trainable(model, True, True)
            result = training.train(model, pooled, spec, tok.pad_token_id)
            log(_metrics_line(r, kind, result["train-loss"], evaluate(), started))
        return records

    # local-only: one model per distinct rank, each client's adapter kept as arrays
    models = {r: lora.build_peft_model(model_spec, builders.adapter_spec(cfg, r),
                                       seed=cfg.fl.seed) for r in sorted(set(ranks))}
    tok = next(iter(models.values()))[1]
    held = _heldout(cfg, tok)
    parts = _client_examples(cfg, num_clients, tok)
    state = [lora.adapter_arrays(models[r][0]) for r in ranks]

    def evaluate_all() -> list[dict[str, float]]:
        evals = []
        for pid, r in enumerate(ranks):
            model = models[r][0]
            lora.load_adapter_arrays(model, state[pid])
            evals.append(training.evaluate(model, held, cfg.eval.batch_size, tok.pad_token_id,
                                           cfg.model.task))
        return evals

    started = time.perf_counter()
    log(_metrics_line(0, kind, None, evaluate_all(), started))
    for r in range(1, rounds + 1):
        started = time.perf_counter()
        losses = []
        for pid, rank in enumerate(ranks):
            model = models[rank][0]
            lora.load_adapter_arrays(model, state[pid])
            lora.set_trainable(model, True, True)
            result = training.train(model, parts[pid], builders.train_spec(cfg, r, pid),
                                    tok.pad_token_id)
            losses.append(result["train-loss"])
            state[pid] = lora.adapter_arrays(model)
        log(_metrics_line(r, kind, float(np.mean(losses)), evaluate_all(), started))
    return records
