"""Warm clients on the deployment engine: per-round time with and without ``fedlora worker``.

``python -m benchmarks.warm_clients [--rounds 5] [--nodes 2] [--out DIR] [-c "key=value ..."]``
runs the same ``fedlora launch`` twice on loopback — SuperNodes that start a ``flwr-clientapp``
process per message (``--cold``, Flower's default), then ``--warm`` SuperNodes served by one
long-lived ``fedlora worker`` each — and compares the rounds' ``duration_s`` from ``metrics.jsonl``.
Round 1 carries the first model load either way, so the comparison uses rounds 2..R.
Both runs must end with the same adapter bit for bit (checked: warm clients compute the same).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedlora.federation.outputs import read_metrics

TINY = ("model.num-hidden-layers=1 data.samples-per-client=16 data.eval-samples=32 "
        "data.max-length=32 train.local-steps=2 train.batch-size=8")


def launch(out: Path, rounds: int, nodes: int, overrides: list[str], warm: bool) -> dict:
    cmd = [sys.executable, "-m", "fedlora", "launch", "--nodes", str(nodes), "--rounds",
           str(rounds), "--out", str(out), "-c", "checkpoint-every=0"]
    for text in overrides:
        cmd += ["-c", text]
    cmd.append("--warm" if warm else "--cold")  # warm is launch's default: say both
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    per_round = [r["duration_s"] for r in read_metrics(out) if r["round"] >= 2]
    return {"wall_s": round(wall, 1), "round_s": [round(s, 2) for s in per_round],
            "median_round_s": round(statistics.median(per_round), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--out", help="keep both runs here (default: a temporary directory)")
    parser.add_argument("-c", action="append", default=[], metavar='"key=value ..."',
                        help=f"run-config overrides (default: the tiny job, {TINY!r})")
    args = parser.parse_args(argv)
    overrides = args.c or [TINY]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        cold = launch(root / "per-message", args.rounds, args.nodes, overrides, warm=False)
        warm = launch(root / "warm", args.rounds, args.nodes, overrides, warm=True)
        adapters = [(root / d / "adapter" / "adapter_model.safetensors").read_bytes()
                    for d in ("per-message", "warm")]
    result = {"per_message": cold, "warm": warm,
              "ratio": round(cold["median_round_s"] / warm["median_round_s"], 2),
              "same_adapter": adapters[0] == adapters[1]}
    print(json.dumps(result, indent=2))
    return 0 if result["same_adapter"] else 1


if __name__ == "__main__":
    sys.exit(main())
