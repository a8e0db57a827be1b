"""An experiment's results as data: one :class:`Series` per run, grouped into rows, and the
per-round curves over seeds.

Shared by the Markdown/PNG report (:mod:`fedlora.experiments.report`) and the interactive page
(:mod:`fedlora.experiments.html_report`), so that neither imports the other's module for its types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.experiments import stats


@dataclass
class Series:
    """One run's per-round records with where it belongs in the report."""

    kind: str  # "federated" or "baseline"
    setting: str
    label: str
    seed: int
    cell: str
    status: dict[str, Any]
    records: list[dict[str, Any]]


@dataclass
class Row:
    """The runs of one rule (``label``) in one setting, one per seed."""
    setting: str
    label: str
    kind: str
    runs: list[Series]


def group(series: list[Series]) -> list[Row]:
    """``series`` grouped into one :class:`Row` per (setting, label), in first-seen order."""
    rows: dict[tuple[str, str], Row] = {}
    for s in series:
        key = (s.setting, s.label)
        rows.setdefault(key, Row(s.setting, s.label, s.kind, [])).runs.append(s)
    return list(rows.values())


@dataclass
class RuleStats:
    """One row of a setting's paired table: the comparison (None for the reference itself),
    target reaching per seed, and the mean rank (federated rules only)."""

    label: str
    kind: str
    comparison: stats.Comparison | None
    reached: list[tuple[int, float] | None]
    rank: stats.Interval | None


def curves(runs: list[Series], x_key: str | None, y_key: str
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean and std over seeds of y per round (x = round, or cumulative bytes)."""
    per_seed = []
    for s in runs:
        if s.status.get("status") != "done":
            continue
        recs = [r for r in s.records if r.get(y_key) is not None]
        if not recs:
            continue
        if x_key is None:
            xs = [r["round"] for r in recs]
        else:
            cum = np.cumsum([r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in s.records])
            by_round = {r["round"]: c for r, c in zip(s.records, cum, strict=True)}
            xs = [by_round[r["round"]] / 1e6 for r in recs]
        per_seed.append((np.asarray(xs, float), np.asarray([r[y_key] for r in recs], float)))
    if not per_seed:
        return None
    n = min(len(y) for _, y in per_seed)
    xs = np.mean([x[:n] for x, _ in per_seed], axis=0)
    ys = np.stack([y[:n] for _, y in per_seed])
    return xs, ys.mean(axis=0), ys.std(axis=0)
