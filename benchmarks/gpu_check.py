"""The GPU check: QLoRA on a CUDA machine, in one offline command of under 8 minutes.

``benchmarks/gpu_check.sh [--out DIR] [--budget-s 450]`` (or ``python -m benchmarks.gpu_check``)
measures, on SmolLM2-135M (the packaged ``smollm2`` model, no hub access):

1. **memory and speed** of LoRA training on a bfloat16 base against a QLoRA NF4 base (bfloat16
   compute), and NF4 with the CUDA-only memory knobs (gradient checkpointing and
   ``paged_adamw_8bit``): peak CUDA memory allocated (``torch.cuda.max_memory_allocated``),
   the base's resident weights, and training tokens/s (predicted and context tokens of
   ``--steps`` optimizer steps after one warm-up step);
2. **a 2-SuperNode launch** (``fedlora launch``, warm workers, NF4) pinned to GPU 0, and, when
   a second GPU is present, one node per GPU 0 and 1, and one node training with
   ``procs-per-node`` = the GPU count (NCCL): completion, seconds per round, and each client's
   peak CUDA memory from ``metrics.jsonl`` (``client_cuda_peak_mb``).

It writes ``OUT/gpu_check.json`` and ``OUT/RESULTS-gpu.md`` (a section for
``benchmarks/RESULTS.md``). Steps that would overrun ``--budget-s`` are skipped and say so.
Without a CUDA device it prints ``no CUDA device`` and what torch reports, writes the JSON with
``"status": "no-cuda"`` and exits 0: nothing was measured, nothing failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import now, versions

MODEL = "smollm2"
SEQ_LEN = 256
BATCH = 8


def cuda_state() -> tuple[bool, str]:
    """Whether CUDA can be used here, and what torch says about it."""
    import torch

    built = torch.version.cuda or "none (a CPU-only build)"
    if not torch.cuda.is_available():
        return False, (f"no CUDA device: torch {torch.__version__} (CUDA build: {built}) sees "
                       f"none; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return True, f"{len(names)} CUDA device(s): {', '.join(names)} (CUDA {built})"


def _examples(vocab: int, n: int, seed: int = 0) -> list[dict]:
    """Synthetic instruction-tuning rows: SEQ_LEN tokens, the first quarter a prompt (-100)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        ids = rng.integers(100, vocab - 1, SEQ_LEN).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (SEQ_LEN // 4) + ids[SEQ_LEN // 4:]})
    return rows


def train_memory(name: str, quantization: str, steps: int, **knobs: Any) -> dict[str, Any]:
    """Peak CUDA memory and tokens/s of ``steps`` LoRA steps (rank 16, all linear layers)."""
    import torch

    from fedlora.learning import assets, lora, training

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    spec = lora.ModelSpec(path=assets.resolve_model(MODEL), task="causal-lm", dtype="bfloat16",
                          device="cuda", quantization=quantization,
                          gradient_checkpointing=bool(knobs.pop("gradient_checkpointing", False)))
    adapter = lora.AdapterSpec(r=16, alpha=32.0, dropout=0.05, target_modules="all-linear")
    model, tokenizer = lora.build_peft_model(spec, adapter)
    weights_mb = (torch.cuda.memory_allocated() - before) / 2**20
    rows = _examples(len(tokenizer), BATCH * (steps + 1))
    base = training.TrainSpec(steps=1, batch_size=BATCH, lr=1e-4, **knobs)
    training.train(model, rows[:BATCH], base, tokenizer.pad_token_id)  # warm-up: kernels, cache
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    metrics = training.train(model, rows[BATCH:], training.TrainSpec(
        steps=steps, batch_size=BATCH, lr=1e-4, seed=1, **knobs), tokenizer.pad_token_id)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"name": name, "quantization": quantization, "knobs": {
               **knobs, "gradient_checkpointing": spec.gradient_checkpointing},
           "weights_mb": round(weights_mb, 1),
           "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
           "tokens_per_s": round(steps * BATCH * SEQ_LEN / seconds, 1),
           "train_loss": round(metrics["train-loss"], 4), "steps": steps, "seconds": seconds}
    del model
    torch.cuda.empty_cache()
    return out


def launch_check(name: str, gpus: list[int] | None, out: Path, rounds: int,
                 procs: int = 1) -> dict[str, Any]:
    """A warm ``fedlora launch`` of ``len(gpus)`` SuperNodes on the given GPU indices, or
    (``gpus`` None) one SuperNode that sees every GPU and trains with ``procs`` processes."""
    from benchmarks.common import checkout_pythonpath
    from fedlora.federation.outputs import read_metrics
    from fedlora.runtime import deploy

    os.environ["PYTHONPATH"] = checkout_pythonpath()  # the Flower processes import this code
    flat = {"model.name": MODEL, "model.task": "causal-lm", "data.source": "chatterbot",
            "model.quantization": "nf4", "model.dtype": "bfloat16", "lora.r": 16,
            "lora.target-modules": "all-linear", "train.local-steps": 5, "train.batch-size": 8,
            "data.max-length": 128, "num-server-rounds": rounds, "checkpoint-every": 0,
            "round-timeout": 240.0}
    warnings: list[str] = []
    start = time.perf_counter()
    try:
        placement = {"gpus": gpus} if gpus is not None else {"nodes": 1}
        if gpus is None:
            flat.update({"min-available-nodes": 1, "min-train-nodes": 1})
        deploy.launch(flat, out=out / name, warm=True, poll_s=1.0, procs_per_node=procs,
                      on_warning=warnings.append, **placement)
        error = None
    except Exception as exc:  # noqa: BLE001 — reported in the results, the check goes on
        error = f"{type(exc).__name__}: {str(exc)[-1500:]}"
    records = read_metrics(out / name)
    rounds_done = [r for r in records if r.get("round", 0) > 0]
    return {"name": name, "gpus": gpus, "procs_per_node": procs, "completed": error is None,
            "error": error, "warnings": warnings, "wall_s": round(time.perf_counter() - start, 1),
            "rounds": len(rounds_done),
            "round_s": [round(r.get("duration_s", 0.0), 2) for r in rounds_done],
            "client_cuda_peak_mb": [r.get("client_cuda_peak_mb") for r in rounds_done],
            "num_accepted": [r.get("num_accepted") for r in rounds_done]}


def markdown(doc: dict[str, Any]) -> str:
    lines = ["## GPU check (`benchmarks/gpu_check.sh`)", "",
             f"{doc['time']} · {doc['device']} · torch {doc['versions'].get('torch')} · "
             f"flwr {doc['versions'].get('flwr')}", ""]
    if doc["status"] == "no-cuda":
        return "\n".join([*lines, f"Not run: {doc['device']}.", ""])
    lines += [f"SmolLM2-135M, LoRA r=16 on all linear layers, batch {BATCH} x {SEQ_LEN} tokens:",
              "", "| base | knobs | weights (MB) | peak CUDA (MB) | tokens/s |",
              "|---|---|---:|---:|---:|"]
    for row in doc["training"]:
        if "error" in row:
            lines.append(f"| {row['name']} | — | error: {row['error'][:120]} | | |")
            continue
        knobs = ", ".join(f"{k}={v}" for k, v in row["knobs"].items()) or "—"
        lines.append(f"| {row['name']} | {knobs} | {row['weights_mb']:.0f} | "
                     f"{row['peak_cuda_mb']:.0f} | {row['tokens_per_s']:.0f} |")
    lines += ["", "| launch | GPUs | completed | rounds | s/round | peak CUDA per client (MB) |",
              "|---|---|---|---:|---|---|"]
    for row in doc["launches"]:
        peaks = row["client_cuda_peak_mb"][-1] if row.get("client_cuda_peak_mb") else None
        lines.append(f"| {row['name']} | {row['gpus']} | {row['completed']} | "
                     f"{row.get('rounds', 0)} | {row.get('round_s')} | {peaks} |")
    lines += [f"| skipped: {s}" for s in doc["skipped"]]
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh")
    parser.add_argument("--out", default="benchmarks/results/gpu-check",
                        help="directory of gpu_check.json, RESULTS-gpu.md and the launches")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="stop starting new steps after this many seconds (default 450)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per base")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each launch")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ok, device = cuda_state()
    doc: dict[str, Any] = {"schema": "fedlora-gpu-check/1", "time": now(), "device": device,
                           "versions": versions(), "status": "ok" if ok else "no-cuda",
                           "training": [], "launches": [], "skipped": []}

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    if not ok:
        print(f"gpu_check: {device}; nothing measured (run it on a machine with a GPU)")
    else:
        import torch

        print(f"gpu_check: {device}")
        for name, quant, knobs in (("bf16", "none", {}), ("nf4", "nf4", {}),
                                   ("nf4 + ckpt + paged 8-bit AdamW", "nf4",
                                    {"gradient_checkpointing": True,
                                     "optimizer": "paged_adamw_8bit"})):
            if left() < 60:
                doc["skipped"].append(f"training {name}: budget")
                continue
            try:
                row = train_memory(name, quant, args.steps, **knobs)
            except Exception as exc:  # noqa: BLE001 — e.g. the packaged model is missing
                row = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
            print(f"  {row}")
            doc["training"].append(row)
        count = torch.cuda.device_count()
        plans: list[tuple[str, list[int] | None, int]] = [("2 nodes on GPU 0", [0, 0], 1)]
        if count > 1:
            plans.append(("GPU 0 + GPU 1", [0, 1], 1))
            plans.append((f"1 node, procs-per-node {count}", None, count))
        else:
            doc["skipped"].append("procs-per-node: one GPU (needs two or more)")
        for name, gpus, procs in plans:
            if left() < 150:
                doc["skipped"].append(f"launch {name}: budget")
                continue
            row = launch_check(name, gpus, out, args.rounds, procs)
            print(f"  {row}")
            doc["launches"].append(row)
        if any("error" in r for r in doc["training"]) or not all(
                r["completed"] for r in doc["launches"]):
            doc["status"] = "failed"
    doc["wall_s"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "RESULTS-gpu.md").write_text(markdown(doc))
    print(f"gpu_check: {doc['status']} in {doc['wall_s']:.0f}s; wrote {out / 'gpu_check.json'} "
          f"and {out / 'RESULTS-gpu.md'}")
    return 1 if doc["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
