"""``python -m benchmarks.tier_capacity [--json FILE] [--rounds N]``: what each rank tier receives.

Issue #20's measurement. Runs the real strategy against the real ClientApp in process (the
``tests/fl_harness.py`` setup: no Ray, no SuperLink, MiniLM cut to 1 layer) for ``hetlora`` and
``flexlora``: 30 clients of ranks 4/8/16 (10 each, partition ``i`` has rank
``(4, 8, 16)[i % 3]``), 6 sampled per round (20 %), 10 rounds, seed 0. After every round it
takes the global adapter's view for a rank-``r`` client (what that tier loads next round) and
reports, per tier:

- ``dead``: components, summed over modules, whose A row and B column are both zero (their
  gradients are exactly zero, so the tier can never train them again);
- ``rank``: the numerical rank of ``s · B @ A`` (singular values above ``1e-6 · σ_max``), the
  minimum over modules;

and which tiers were sampled that round. Not part of ``python -m benchmarks`` (about a minute
per strategy on 2 cores). It also runs on the flat layout before commit cdcc6f2 (imports are
tried in both places), which is how ``simulations/results/tier-capacity/`` compares before and
after the fix: run it as a file from a checkout of ``cdcc6f2^`` with that checkout on
``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

TIERS = (4, 8, 16)
RTOL = 1e-6
SETUP = {"clients": 30, "sampled": 6, "rounds": 10, "seed": 0, "layers": 1}
TINY = {  # tests/fl_harness.py's TINY
    "model.num-hidden-layers": 1, "data.samples-per-client": 24, "data.eval-samples": 32,
    "data.max-length": 32, "train.local-steps": 2, "train.batch-size": 8,
}


def numerical_rank(b: np.ndarray, a: np.ndarray, scale: float, rtol: float = RTOL) -> int:
    """Numerical rank of ``scale · b @ a``: singular values above ``rtol · σ_max`` (0 for a
    zero matrix)."""
    sigma = np.linalg.svd(scale * b.astype(np.float64) @ a.astype(np.float64),
                          compute_uv=False)
    if sigma.size == 0 or sigma[0] == 0.0:
        return 0
    return int((sigma > rtol * sigma[0]).sum())


def dead_components(b: np.ndarray, a: np.ndarray) -> int:
    """Components ``i`` with ``a[i, :]`` and ``b[:, i]`` both exactly zero."""
    return int((~(a.any(axis=1) | b.any(axis=0))).sum())


def tier_capacity(view: Callable[[int], Mapping[str, Any]], tiers: Iterable[int] = TIERS,
                  rtol: float = RTOL) -> dict[str, dict[str, int]]:
    """Per tier ``r``: ``{"dead": summed over modules, "rank": min over modules}`` of what
    ``view(r)`` (module -> factors with ``a``, ``b``, ``scale``) hands a rank-``r`` client."""
    out: dict[str, dict[str, int]] = {}
    for rank in tiers:
        factors = list(view(rank).values())
        out[str(rank)] = {
            "dead": sum(dead_components(f.b, f.a) for f in factors),
            "rank": min(numerical_rank(f.b, f.a, f.scale, rtol) for f in factors),
        }
    return out


def _imports() -> tuple[Any, Any, Any, Any, Any]:
    """config, ClientApp, InProcessGrid, ServerModel, FederatedLora from today's layout or
    from the flat one before cdcc6f2 (``fedlora/evaluator.py``)."""
    from clients.app import app as client_app
    from fedlora import config
    from server.inprocess import InProcessGrid
    from server.strategy import FederatedLora
    try:
        from fedlora.learning.evaluator import ServerModel
    except ImportError:
        from fedlora.evaluator import ServerModel
    return config, client_app, InProcessGrid, ServerModel, FederatedLora


def run_strategy(strategy: str, rounds: int = SETUP["rounds"]) -> list[dict[str, Any]]:
    """One in-process run; one row per round: sampled partitions and tiers, and the tiers'
    capacity after the round."""
    config, client_app, grid_cls, server_model_cls, strategy_cls = _imports()
    n = SETUP["clients"]
    flat = {**config.defaults(), **TINY, "strategy": strategy, "num-server-rounds": rounds,
            "num-train-nodes": SETUP["sampled"], "seed": SETUP["seed"],
            "rank-by-partition": ",".join(str(TIERS[i % 3]) for i in range(n))}
    cfg = config.from_flat(flat)
    nodes = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    grid = grid_cls(client_app, nodes, flat)
    server_model = server_model_cls(cfg, cfg.fl.max_rank)
    glob = server_model.initial_global()
    rows: list[dict[str, Any]] = []

    def log_round(line: dict[str, Any]) -> None:  # called once the round's global is applied
        if line["round"] == 0:
            return
        clients = list(line.get("clients", []))
        rows.append({"round": line["round"], "clients": clients,
                     "sampled_tiers": sorted({TIERS[c % 3] for c in clients}),
                     "tiers": tier_capacity(glob.view)})

    strategy_cls(cfg, glob, server_model.evaluate, log_round, run_id=grid.run_id).run(grid)
    return rows


def table(strategy: str, rows: list[dict[str, Any]]) -> str:
    """Markdown table: round, tiers sampled, then dead / rank for each tier."""
    head = "| round | tiers sampled | " + " | ".join(f"r={t} dead | r={t} rank" for t in TIERS)
    lines = [f"**{strategy}**", "", head + " |", "|---" * (2 + 2 * len(TIERS)) + "|"]
    for row in rows:
        cells = [str(row["round"]), "/".join(map(str, row["sampled_tiers"]))]
        for t in TIERS:
            cells += [str(row["tiers"][str(t)]["dead"]), str(row["tiers"][str(t)]["rank"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run both strategies, print the tables, optionally write the JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, metavar="FILE")
    parser.add_argument("--rounds", type=int, default=SETUP["rounds"])
    parser.add_argument("--strategies", nargs="+", default=["hetlora", "flexlora"])
    parser.add_argument("--label", default="", help="recorded in the JSON (e.g. a commit)")
    args = parser.parse_args(argv)
    document: dict[str, Any] = {"setup": {**SETUP, "rounds": args.rounds, "tiers": TIERS,
                                          "rtol": RTOL, **TINY},
                                "label": args.label, "runs": {}}
    for strategy in args.strategies:
        document["runs"][strategy] = run_strategy(strategy, args.rounds)
        print(table(strategy, document["runs"][strategy]) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
