"""Cost curves of many virtual clients: round time and peak memory for N total × K sampled.

``python -m benchmarks.scale [--clients 10 100 1000] [--sampled 2 5 10] [--rounds 6]
[--out DIR]`` runs one ``fedlora run`` per (N, K) — the default preset (MiniLM, LoRA r=8 on
query/value, BBC News IID) on Flower's simulation engine with N virtual clients and K sampled
per round — and reads what every round records in ``metrics.jsonl``:

* round time: ``duration_s`` (send K messages, train, receive, validate, aggregate; central
  evaluation is separate), the median over rounds 2..R (round 1 also loads the model in each
  Ray worker);
* peak memory: ``server_peak_rss_mb`` (the simulation process: ServerApp, Flower's engine and
  every node's Context) and ``client_peak_rss_mb_max`` (the largest Ray worker that trained);
* ``discovery_s``: the one capability query of all N nodes at start-up (Ray start included);
* ``cpu_s``: CPU seconds of a round (median): the simulation process (``server_cpu_s``, which
  includes Flower's simulation engine polling every node's message queue) plus the training
  workers (each reply's ``train-cpu-s``). Unlike wall time it hardly moves with the load other
  jobs put on a shared machine.

Local work is made identical for every N so that only the federation's size varies: each client
holds one example (``data.samples-per-client=1``) and takes four steps on it per round. It then
fits ``round_s ≈ a + b·K + c·N`` and the same for ``cpu_s`` (least squares over the grid;
cells run in an order that changes N and K together, see :func:`grid_order`) and writes
``results.json``, ``table.md`` and ``scale.png`` into ``--out`` (default
``benchmarks/results/scale``; the run directories go to ``--runs``, a temporary directory
unless given). Targets (reported, not enforced): peak memory at the largest N within 1.2× of
the smallest N at the same K, round time linear in K (R² of round_s ~ K per N) and flat in N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, now, versions
from fedlora.federation.outputs import read_metrics

LOCAL_WORK = ("data.samples-per-client=1 train.batch-size=1 train.local-steps=4 "
              "data.eval-samples=64 checkpoint-every=0 min-train-nodes=1")
MEMORY_TARGET = 1.2
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scale"


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """One run's cost from its metrics records (round 0 first)."""
    rounds = [r for r in records if r["round"] >= 1]
    steady = [r["duration_s"] for r in rounds[1:]] or [r["duration_s"] for r in rounds]
    steady_rounds = rounds[1:] or rounds
    server_cpu = [r["server_cpu_s"] for r in steady_rounds]
    total_cpu = [r["server_cpu_s"] + r["client_cpu_s"] for r in steady_rounds]
    q1, _, q3 = statistics.quantiles(steady, n=4) if len(steady) > 1 else steady * 3
    return {
        "round_s": statistics.median(steady),
        "round_s_q1": q1,
        "round_s_q3": q3,
        "round_s_min": min(steady),
        "round_s_max": max(steady),
        "server_cpu_s": statistics.median(server_cpu),
        "cpu_s": statistics.median(total_cpu),
        "first_round_s": rounds[0]["duration_s"],
        "discovery_s": records[0].get("discover_s", float("nan")),
        "server_peak_mb": max(r["server_peak_rss_mb"] for r in records),
        "worker_peak_mb": max(r["client_peak_rss_mb_max"] for r in rounds),
        "rounds": len(rounds),
    }


def fit_growth(cells: Sequence[Mapping[str, float]], key: str = "round_s") -> dict[str, float]:
    """Least-squares ``cells[key] = a + b·K + c·N`` over the cells (keys ``n``, ``k`` and
    ``key``); returns the intercept, both slopes and R²."""
    x = np.array([[1.0, c["k"], c["n"]] for c in cells])
    y = np.array([c[key] for c in cells])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ coef
    total = float(np.sum((y - y.mean()) ** 2))
    return {"intercept_s": float(coef[0]), "per_sampled_client_s": float(coef[1]),
            "per_1000_clients_s": float(coef[2] * 1000),
            "r2": 1.0 - float(np.sum(residual**2)) / total if total else 1.0}


def linear_in_k(cells: Sequence[Mapping[str, float]], n: int, key: str = "round_s"
                ) -> dict[str, float]:
    """Slope (s per sampled client) and R² of ``cells[key] ~ K`` at one N."""
    row = sorted((c["k"], c[key]) for c in cells if c["n"] == n)
    k, y = np.array([p[0] for p in row]), np.array([p[1] for p in row])
    slope, intercept = np.polyfit(k, y, 1)
    fitted = slope * k + intercept
    total = float(np.sum((y - y.mean()) ** 2))
    return {"slope_s": float(slope), "r2": 1.0 - float(np.sum((y - fitted) ** 2)) / total
            if total else 1.0}


def grid_order(clients: Sequence[int], sampled: Sequence[int]) -> list[tuple[int, int]]:
    """Every (N, K), ordered along diagonals of the grid: consecutive runs change both N and K,
    so the drifting load of a shared machine is not confounded with either."""
    cells = [(i, j) for i in range(len(clients)) for j in range(len(sampled))]
    cells.sort(key=lambda ij: ((ij[0] + ij[1]) % len(sampled), ij[0]))
    return [(clients[i], sampled[j]) for i, j in cells]


def memory_ratios(cells: Sequence[Mapping[str, float]]) -> dict[int, dict[str, float]]:
    """Per K: peak memory at the largest N over the smallest N (server and worker)."""
    out: dict[int, dict[str, float]] = {}
    for k in sorted({int(c["k"]) for c in cells}):
        row = sorted((c for c in cells if c["k"] == k), key=lambda c: c["n"])
        out[k] = {"server": row[-1]["server_peak_mb"] / row[0]["server_peak_mb"],
                  "worker": row[-1]["worker_peak_mb"] / row[0]["worker_peak_mb"]}
    return out


def table(cells: Sequence[Mapping[str, float]]) -> str:
    """Markdown table of the grid."""
    lines = ["| N clients | K sampled | round time (median) | quartiles | CPU / round | "
             "of which server | round 1 | discovery | server peak | worker peak | load |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(cells, key=lambda c: (c["n"], c["k"])):
        lines.append(f"| {c['n']:,} | {c['k']} | {c['round_s']:.2f} s | "
                     f"{c['round_s_q1']:.2f}–{c['round_s_q3']:.2f} s | "
                     f"{c['cpu_s']:.2f} s | {c['server_cpu_s']:.2f} s | "
                     f"{c['first_round_s']:.1f} s | "
                     f"{c['discovery_s']:.1f} s | "
                     f"{c['server_peak_mb']:.0f} MB | {c['worker_peak_mb']:.0f} MB | "
                     f"{c.get('load_1m', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def plot(cells: Sequence[Mapping[str, float]], path: Path) -> None:
    """Round time and CPU per round against K (one line per N), peak memory against N (one
    line per K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({int(c["n"]) for c in cells})
    ks = sorted({int(c["k"]) for c in cells})
    fig, (time_ax, cpu_ax, mem_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, n in enumerate(ns):
        row = sorted((c for c in cells if c["n"] == n), key=lambda c: c["k"])
        time_ax.errorbar([c["k"] for c in row], [c["round_s"] for c in row],
                         yerr=[[c["round_s"] - c["round_s_q1"] for c in row],
                               [c["round_s_q3"] - c["round_s"] for c in row]],
                         marker="o", capsize=3, color=f"C{i}", label=f"N = {n:,}")
    time_ax.set(xlabel="K sampled clients per round", ylabel="round time (s, median; bars "
                "quartiles)", title="Round time vs sampled clients", xticks=ks)
    time_ax.set_ylim(bottom=0)
    time_ax.legend()
    for i, n in enumerate(ns):
        row = sorted((c for c in cells if c["n"] == n), key=lambda c: c["k"])
        cpu_ax.plot([c["k"] for c in row], [c["cpu_s"] for c in row], marker="o",
                    color=f"C{i}", label=f"N = {n:,}, server + workers")
        cpu_ax.plot([c["k"] for c in row], [c["server_cpu_s"] for c in row], marker="x",
                    linestyle=":", color=f"C{i}", label=f"N = {n:,}, server")
    cpu_ax.set(xlabel="K sampled clients per round", ylabel="CPU seconds per round (median)",
               title="CPU per round vs sampled clients", xticks=ks)
    cpu_ax.set_ylim(bottom=0)
    cpu_ax.legend(fontsize=7)
    for i, k in enumerate(ks):
        row = sorted((c for c in cells if c["k"] == k), key=lambda c: c["n"])
        mem_ax.plot([c["n"] for c in row], [c["server_peak_mb"] for c in row], marker="o",
                    color=f"C{i + len(ns)}", label=f"server, K = {k}")
        mem_ax.plot([c["n"] for c in row], [c["worker_peak_mb"] for c in row], marker="s",
                    linestyle="--", color=f"C{i + len(ns)}", label=f"worker, K = {k}")
    mem_ax.set(xscale="log", xlabel="N virtual clients", ylabel="peak RSS (MB)",
               title="Peak memory vs total clients", xticks=ns)
    mem_ax.set_xticklabels([f"{n:,}" for n in ns])
    mem_ax.set_ylim(bottom=0)
    mem_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cell(n: int, k: int, rounds: int, out: Path, overrides: Sequence[str],
             reuse: bool = False) -> dict:
    """One ``fedlora run`` with N clients and K sampled; its summary. With ``reuse``, a run
    directory that already holds every round is summarized again instead of rerun."""
    done = out / "cell.json"
    if not (reuse and done.exists() and len(read_metrics(out)) == rounds + 1):
        cmd = [sys.executable, "-m", "fedlora", "run", "--num-clients", str(n), "--rounds",
               str(rounds), "--out", str(out), "-c", LOCAL_WORK, "-c", f"num-train-nodes={k}"]
        for text in overrides:
            cmd += ["-c", text]
        started, load_before = time.perf_counter(), os.getloadavg()[0]
        subprocess.run(cmd, check=True)
        done.write_text(json.dumps({
            "n": n, "k": k, "wall_s": round(time.perf_counter() - started, 1),
            "load_1m": round((load_before + os.getloadavg()[0]) / 2, 1)}))  # shared machine
    cell = json.loads(done.read_text())
    cell.update(summarize(read_metrics(out)))
    return cell


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--sampled", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--runs", type=Path, help="where the runs go (default: a temporary "
                                                   "directory)")
    parser.add_argument("-c", action="append", default=[], help="more config overrides")
    parser.add_argument("--reuse", action="store_true", help="summarize the runs already "
                        "complete in --runs instead of running them again")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 loads the model)")
    if len(args.sampled) < 2 or len(args.clients) < 2:
        parser.error("give at least two --clients and two --sampled values to fit a growth")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.runs or Path(tempfile.mkdtemp(prefix="fedlora-scale-"))
    document: dict[str, Any] = {"date": now(), "machine": machine(), "versions": versions(),
                                "rounds": args.rounds, "local_work": LOCAL_WORK,
                                "overrides": args.c, "cells": []}
    for n, k in grid_order(args.clients, args.sampled):
        print(f"N = {n}, K = {k} ...", flush=True)
        cell = run_cell(n, k, args.rounds, runs / f"n{n}-k{k}", args.c, args.reuse)
        document["cells"].append(cell)
        print(json.dumps(cell), flush=True)
    cells = document["cells"]
    document["fit"] = fit_growth(cells)
    document["fit_cpu"] = fit_growth(cells, "cpu_s")
    document["linear_in_k"] = {n: linear_in_k(cells, n) for n in args.clients}
    document["linear_in_k_cpu"] = {n: linear_in_k(cells, n, "cpu_s") for n in args.clients}
    document["memory_ratio"] = memory_ratios(cells)
    document["memory_target_met"] = all(r["server"] <= MEMORY_TARGET and
                                        r["worker"] <= MEMORY_TARGET
                                        for r in document["memory_ratio"].values())
    (args.out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    (args.out / "table.md").write_text(table(cells))
    plot(cells, args.out / "scale.png")
    print(table(cells))
    for name, key in (("round_s", "fit"), ("cpu_s", "fit_cpu")):
        fit = document[key]
        print(f"{name} ≈ {fit['intercept_s']:.2f} s + {fit['per_sampled_client_s']:.3f} s × K "
              f"+ {fit['per_1000_clients_s']:.3f} s × N/1000  (R² {fit['r2']:.3f})")
    for n in args.clients:
        wall, cpu = document["linear_in_k"][n], document["linear_in_k_cpu"][n]
        print(f"N = {n}: per sampled client {wall['slope_s']:.3f} s of round time (R² "
              f"{wall['r2']:.3f}), {cpu['slope_s']:.3f} CPU s (R² {cpu['r2']:.3f})")
    for k, ratio in document["memory_ratio"].items():
        print(f"K = {k}: peak memory N = {max(args.clients)} / N = {min(args.clients)}: server "
              f"{ratio['server']:.3f}x, worker {ratio['worker']:.3f}x (target <= "
              f"{MEMORY_TARGET}x)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
