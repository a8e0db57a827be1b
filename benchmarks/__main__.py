"""``python -m benchmarks [--quick] [--json FILE] [--only NAME ...]``: run the suite.

Runs each benchmark (``P1`` aggregation throughput, ``P2`` FlexLoRA re-projection, ``P3``
federated overhead per round, ``P4`` bytes on the wire, ``P5`` client throughput, ``P6`` the
default demo end to end, ``P7`` secure aggregation against Flower's SecAgg+), prints a table and
optionally writes the JSON document described in ``benchmarks/README.md``. Exits 1 when a
correctness check failed; speed targets are reported, never enforced. ``--quick`` leaves out
the benchmarks listed in ``QUICK_SKIP``, with their reason in the document.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.common import machine, now, versions

SCHEMA = "fedlora-benchmarks/1"
BENCHMARKS = {"P1": "aggregation_throughput", "P2": "flexlora_svd", "P3": "federated_overhead",
              "P4": "wire_bytes", "P5": "client_throughput", "P6": "demo_split",
              "P7": "secagg"}
QUICK_SKIP = {"P6": "a real `fedlora run` of the default job (minutes on 2 cores); the same "
                    "path runs in tests/test_simulation.py::test_default_job_end_to_end"}


def select(names: Sequence[str] | None) -> list[str]:
    """Benchmark ids for ``--only`` names (ids or module names, any case), in suite order."""
    if not names:
        return list(BENCHMARKS)
    lookup = {bench_id.lower(): bench_id for bench_id in BENCHMARKS}
    lookup.update({module: bench_id for bench_id, module in BENCHMARKS.items()})
    unknown = [n for n in names if n.lower() not in lookup]
    if unknown:
        valid = ", ".join(f"{i} ({m})" for i, m in BENCHMARKS.items())
        raise ValueError(f"unknown benchmark(s) {unknown}; valid: {valid}")
    chosen = {lookup[n.lower()] for n in names}
    return [bench_id for bench_id in BENCHMARKS if bench_id in chosen]


def load(bench_id: str) -> ModuleType:
    """The module of one benchmark (imported on demand: P4 imports torch and transformers)."""
    return importlib.import_module(f"benchmarks.{BENCHMARKS[bench_id]}")


def run_suite(ids: Sequence[str], quick: bool, console: Console) -> dict[str, Any]:
    """Run the chosen benchmarks; the JSON document (``results`` in suite order)."""
    document: dict[str, Any] = {"schema": SCHEMA, "date": now(), "quick": quick,
                                "machine": machine(), "versions": versions(), "results": []}
    if quick:
        document["skipped"] = {i: QUICK_SKIP[i] for i in ids if i in QUICK_SKIP}
    for bench_id in ids:
        if bench_id in document.get("skipped", {}):
            console.print(f"skipping {bench_id} under --quick: {QUICK_SKIP[bench_id]}")
            continue
        module = load(bench_id)
        console.print(f"running {bench_id} {module.TITLE}{' (quick)' if quick else ''} ...")
        document["results"].append(module.run(quick=quick))
    document["correct"] = all(r["correct"] for r in document["results"])
    return document


def table(document: dict[str, Any]) -> Table:
    out = Table(title=f"fedlora benchmarks{' (quick)' if document['quick'] else ''}, "
                      f"{document['date']}")
    for column in ("id", "benchmark", "ours", "peer", "peer time", "ratio", "max |Δ|",
                   "target", "met", "correct"):
        out.add_column(column, justify="right" if column in ("ours", "peer time", "ratio",
                                                               "max |Δ|") else "left")
    for r in document["results"]:
        met = {True: "met", False: "missed", None: "n/a"}[r["target_met"]]
        out.add_row(r["id"], r["name"].removeprefix(r["id"] + " "), _seconds(r["ours_s"]),
                    r["peer"], _seconds(r["peer_s"]), f"{r['ratio']:.1f}x",
                    f"{r['max_abs_diff']:.1e}", r["target"], met,
                    "ok" if r["correct"] else "FAIL")
    return out


def _seconds(value: float) -> str:
    return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.2f} s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (CI); correctness is still checked")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results here")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help=f"run only these: {', '.join(BENCHMARKS)} or module names")
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:  # logs and CI: one row per benchmark, no wrapping
        console = Console(width=200)
    try:
        ids = select(args.only)
    except ValueError as exc:
        parser.error(str(exc))
    document = run_suite(ids, args.quick, console)
    console.print(table(document))
    for r in document["results"]:
        console.print(f"{r['id']}: {r['summary']}")
    if args.json:
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        console.print(f"wrote {args.json}")
    for r in document["results"]:
        for check in r["checks"]:
            if not check["passed"]:
                console.print(f"[red]FAILED[/] {r['id']}: {check['name']}: {check['value']} "
                              f"{check['op']} {check['limit']} does not hold")
    return 0 if document["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
