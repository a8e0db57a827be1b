"""What every benchmark shares: timing, correctness checks, the result object, the machine.

A benchmark module exposes ``ID`` (e.g. ``"P1"``), ``TITLE`` and ``run(quick: bool) -> dict``
returning :func:`result`'s object. Speed targets are reported (``target_met``), never
asserted; correctness checks (``checks``, ``correct``) make ``python -m benchmarks`` exit 1.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

VERSIONED = ("numpy", "torch", "flwr", "peft")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def best_times(fns: Mapping[str, Callable[[], Any]], repeats: int
               ) -> tuple[dict[str, float], dict[str, Any]]:
    """Best wall time (``time.perf_counter``) of each function over interleaved repeats.

    Repeat ``i`` runs every function once, in the given order, so slow phases of a busy
    machine hit all sides alike. A function's previous output is kept until its next call
    returns (as a server keeps its last aggregate until the new one replaces it), and garbage
    is collected before each call, outside the timed region.

    Returns
    -------
    tuple[dict[str, float], dict[str, Any]]
        Best seconds per name, and each function's last output.
    """
    best = {name: float("inf") for name in fns}
    outputs: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            out = fn()
            best[name] = min(best[name], time.perf_counter() - start)
            outputs[name] = out
    return best, outputs


def at_most(name: str, value: float, limit: float) -> dict[str, Any]:
    """A correctness check ``value <= limit``."""
    return {"name": name, "value": value, "op": "<=", "limit": limit,
            "passed": bool(value <= limit)}


def equal(name: str, value: Any, expected: Any) -> dict[str, Any]:
    """A correctness check ``value == expected`` (byte counts, key sets, shapes)."""
    return {"name": name, "value": value, "op": "==", "limit": expected,
            "passed": bool(value == expected)}


def result(*, bench_id: str, name: str, ours_s: float, peer: str, peer_s: float,
           max_abs_diff: float, params: Mapping[str, Any], target: str,
           target_met: bool | None,
           checks: list[dict[str, Any]], summary: str) -> dict[str, Any]:
    """One benchmark's JSON object (schema in ``benchmarks/README.md``).

    ``ratio = peer_s / ours_s`` (bigger is better); ``target_met`` is ``None`` when this run's
    sizes are not the ones the target is stated for (``--quick``); ``correct`` is true when
    every check passed.
    """
    return {
        "id": bench_id,
        "name": name,
        "ours_s": ours_s,
        "peer": peer,
        "peer_s": peer_s,
        "ratio": peer_s / ours_s,
        "max_abs_diff": max_abs_diff,
        "params": dict(params),
        "target": target,
        "target_met": None if target_met is None else bool(target_met),
        "checks": checks,
        "correct": all(c["passed"] for c in checks),
        "summary": summary,
    }


def machine() -> dict[str, Any]:
    """CPU model and cores (``/proc/cpuinfo``, ``os.cpu_count()``), load, thread settings, OS."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass  # not Linux: keep platform.processor()
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "thread_env": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
        "platform": platform.platform(),
    }


def versions() -> dict[str, str]:
    """Python and library versions the numbers were measured with."""
    out = {"python": platform.python_version()}
    for package in VERSIONED:
        out[package] = importlib.metadata.version(package)
    return out


def checkout_pythonpath() -> str:
    """``PYTHONPATH`` for subprocesses: this checkout first, so that the Flower processes a
    benchmark starts import the code being measured."""
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
