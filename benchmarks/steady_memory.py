"""Steady-state memory: a long run of the default preset must not grow round after round.

``python -m benchmarks.steady_memory [--rounds 20] [--out DIR] [-c "key=value ..."]`` runs
``fedlora run`` (the default preset unless overridden) and reads the resident memory that every
round records in ``metrics.jsonl``: ``server_rss_mb`` (the ServerApp process) and
``client_rss_mb_max`` (the largest ClientApp process that trained in that round). It prints
both per round and the change from round 3 to round ``--rounds`` (target: it grows by at most
5 %).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedlora.federation.outputs import read_metrics

TARGET = 0.05


def measure(rounds: int, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fedlora", "run", "--rounds", str(rounds), "--out", str(out),
           "-c", "checkpoint-every=0"]
    for text in overrides:
        cmd += ["-c", text]
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - started
    records = {r["round"]: r for r in read_metrics(out)}
    series = {k: [records[r].get(k) for r in range(1, rounds + 1)]
              for k in ("server_rss_mb", "client_rss_mb_max")}
    ratios = {k: v[-1] / v[2] - 1.0 for k, v in series.items() if v[2]}
    return {"rounds": rounds, "wall_s": round(wall, 1), "series": series,
            "growth_vs_round_3": ratios,
            "target_met": all(g <= TARGET for g in ratios.values())}  # growth, not shrinkage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.steady_memory")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    parser.add_argument("-c", action="append", default=[], help="config overrides")
    args = parser.parse_args(argv)
    if args.rounds < 4:
        parser.error("--rounds must be at least 4 (round 3 is the reference)")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedlora-mem-")) / "run"
    result = measure(args.rounds, out, args.c)
    for k, values in result["series"].items():
        print(f"{k:18} " + " ".join(f"{v:.0f}" if v else "-" for v in values))
    for k, g in result["growth_vs_round_3"].items():
        print(f"{k}: round {args.rounds} vs round 3: {g * 100:+.2f} % (target: growth <= "
              f"{TARGET:.0%})")
    print(json.dumps(result))
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
