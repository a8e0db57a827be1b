"""An experiment's report: ``runs.csv``, ``summary.md`` and PNG plots from its output directory.

Everything here is computed from the files the cells and baselines wrote (``cell.json``,
``metrics.jsonl``), so a report can be rebuilt at any time, also of a partial or resumed sweep.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.experiment import Spec, cell_status, slug
from fedlora.outputs import read_metrics

FIRST_COLUMNS = ["kind", "setting", "label", "strategy", "seed", "cell", "status", "round"]


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


def collect(spec: Spec, out: Path) -> list[Series]:
    series = []
    for cell in spec.cells():
        directory = out / "cells" / cell.id
        status = cell_status(directory)
        if status is None:
            continue
        series.append(Series("federated", cell.setting.label, cell.strategy.label, cell.seed,
                             cell.id, status, read_metrics(directory)))
    for setting in spec.settings:
        for seed in spec.seeds:
            for kind in spec.baselines:
                directory = out / "baselines" / f"{slug(setting.label)}--seed{seed}" / kind
                status = cell_status(directory)
                if status is None:
                    continue
                series.append(Series("baseline", setting.label, f"{kind} (baseline)", seed,
                                     f"{directory.parent.name}/{kind}", status,
                                     read_metrics(directory)))
    return series


def _cell_value(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return value


def write_csv(series: Iterable[Series], path: Path) -> int:
    """One row per run × round with every metric the run logged; returns the row count."""
    rows = []
    for s in series:
        for rec in s.records:
            row = {"kind": s.kind, "setting": s.setting, "label": s.label,
                   "strategy": rec.get("strategy", ""), "seed": s.seed, "cell": s.cell,
                   "status": s.status.get("status", "")}
            row.update({k: _cell_value(v) for k, v in rec.items() if k != "strategy"})
            rows.append(row)
    keys = sorted({k for row in rows for k in row} - set(FIRST_COLUMNS))
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIRST_COLUMNS + keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return len(rows)


# ---------------------------------------------------------------------------------- summary


def _final(records: list[dict[str, Any]], metric: str) -> float | None:
    values = [r[metric] for r in records if r.get(metric) is not None and r["round"] > 0]
    return values[-1] if values else None


def rounds_to_target(records: list[dict[str, Any]], metric: str, target: float,
                     higher_is_better: bool) -> int | None:
    for rec in records:
        value = rec.get(metric)
        if value is None:
            continue
        if (value >= target) if higher_is_better else (value <= target):
            return int(rec["round"])
    return None


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


@dataclass
class Row:
    setting: str
    label: str
    kind: str
    runs: list[Series]


def group(series: list[Series]) -> list[Row]:
    rows: dict[tuple[str, str], Row] = {}
    for s in series:
        key = (s.setting, s.label)
        rows.setdefault(key, Row(s.setting, s.label, s.kind, [])).runs.append(s)
    return list(rows.values())


def summary_markdown(spec: Spec, series: list[Series], wall_s: float | None = None) -> str:
    metric, target = spec.metric, spec.target
    lines = [f"# Experiment `{spec.name}`", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    cells = spec.cells()
    done = sum(1 for s in series if s.kind == "federated" and s.status.get("status") == "done")
    lines += [
        f"- cells: {done}/{len(cells)} done ({len(spec.strategies)} strategies × "
        f"{len(spec.settings)} settings × seeds {spec.seeds}); baselines: "
        f"{', '.join(spec.baselines) or 'none'}",
        f"- metric: `{metric}` ({'higher' if spec.higher_is_better else 'lower'} is better)"
        + (f"; target {target}" if target is not None else ""),
        f"- machine: {platform.machine()}, {_cpu_name()}, {_cpu_count()} cores; "
        f"python {platform.python_version()}; report written {time.strftime('%Y-%m-%d %H:%M')}",
    ]
    if wall_s is not None:
        lines.append(f"- total wall time of the cells and baselines: {wall_s / 60:.1f} min")
    base = {k: v for k, v in spec.base.items() if not k.startswith("output")}
    lines += ["", "<details><summary>base config</summary>", "", "```",
              *[f"{k} = {v!r}" for k, v in sorted(base.items())], "```", "</details>", ""]
    target_col = f"rounds to {target}" if target is not None else "rounds to target"
    for setting in spec.settings:
        keys = " ".join(f"{k}={v}" for k, v in setting.keys.items())
        lines += [f"## {setting.label}", "", f"`{keys}`" if keys else "", "",
                  f"| strategy | final {metric} | {target_col} | MB up | MB down | "
                  "agg. error (mean) | wall s |",
                  "|---|---|---|---|---|---|---|"]
        for row in [r for r in group(series) if r.setting == setting.label]:
            ok = [s for s in row.runs if s.status.get("status") == "done"]
            if not ok:
                errors = {s.status.get("error", "?").splitlines()[0][:120] for s in row.runs}
                lines.append(f"| {row.label} | failed: {'; '.join(sorted(errors))} "
                             f"| | | | | |")
                continue
            finals = [_final(s.records, metric) for s in ok]
            reached = [rounds_to_target(s.records, metric, target, spec.higher_is_better)
                       for s in ok] if target is not None else []
            if target is None:
                rtt = "—"
            elif all(r is not None for r in reached):
                rtt = f"{np.mean(reached):.1f}"
            else:
                rtt = f"not reached ({sum(r is None for r in reached)}/{len(reached)})"
            up = np.mean([sum(r.get("bytes_up", 0) for r in s.records) for s in ok])
            down = np.mean([sum(r.get("bytes_down", 0) for r in s.records) for s in ok])
            errs = [r["agg_error_mean"] for s in ok for r in s.records
                    if r.get("agg_error_mean") is not None]
            agg = f"{np.mean(errs):.2e}" if errs else "—"
            wall = np.mean([s.status.get("wall_s", float("nan")) for s in ok])
            label = f"*{row.label}*" if row.kind == "baseline" else row.label
            lines.append(f"| {label} | {_mean_std(finals)} (n={len(ok)}) | {rtt} | {_mb(up)} | "
                         f"{_mb(down)} | {agg} | {wall:.0f} |")
        lines.append("")
    failed = [s for s in series if s.status.get("status") == "failed"]
    if failed:
        lines += ["## Failed cells", ""]
        for s in failed:
            lines += [f"- `{s.cell}`: {s.status.get('error', '').strip()[:600]}"]
        lines.append("")
    lines += ["Plots: `metric_vs_round.png`, `metric_vs_bytes.png`, `agg_error_vs_round.png`; "
              "every per-round number is in `runs.csv`.", ""]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ------------------------------------------------------------------------------------ plots


def _curves(runs: list[Series], x_key: str | None, y_key: str
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


def _plot(spec: Spec, series: list[Series], path: Path, y_key: str, x_key: str | None,
          title: str, ylabel: str, include_baselines: bool, log_y: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    settings = [s.label for s in spec.settings]
    cols = min(3, len(settings))
    rows_n = math.ceil(len(settings) / cols)
    size = (max(7.0, 5.2 * cols), 4.2 * rows_n)
    fig, axes = plt.subplots(rows_n, cols, figsize=size, squeeze=False)
    rows = group(series)
    labels = list(dict.fromkeys(r.label for r in rows if r.kind == "federated"))
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    # distinct markers and dash patterns keep overlapping curves (exact rules at 0) visible
    markers = {label: "osD^vP*X"[i % 8] for i, label in enumerate(labels)}
    dashes = {label: ["-", "--", "-.", ":"][i % 4] for i, label in enumerate(labels)}
    for ax, setting in zip(axes.flat, settings, strict=False):
        for row in [r for r in rows if r.setting == setting]:
            if row.kind == "baseline" and (not include_baselines or x_key is not None):
                continue
            curve = _curves(row.runs, x_key, y_key)
            if curve is None:
                continue
            xs, mean, std = curve
            style = dict(linestyle=(0, (5, 2)), color="black" if "central" in row.label
                         else "gray") \
                if row.kind == "baseline" else dict(color=colors[row.label],
                                                    marker=markers[row.label], markersize=4,
                                                    linestyle=dashes[row.label])
            ax.plot(xs, mean, label=row.label, linewidth=1.6, **style)
            if len(row.runs) > 1:
                ax.fill_between(xs, mean - std, mean + std, alpha=0.15,
                                color=style.get("color"))
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel("round" if x_key is None else "cumulative MB (up + down)")
        if x_key is None:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    fig.suptitle(f"{spec.name}: {title}", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(spec: Spec, series: list[Series], out: Path) -> list[Path]:
    metric = spec.metric
    written = []
    jobs = [("metric_vs_round.png", metric, None, f"{metric} per round (mean ± std over seeds)",
             metric, True, False),
            ("metric_vs_bytes.png", metric, "bytes",
             f"{metric} vs communication", metric, False, False),
            ("agg_error_vs_round.png", "agg_error_mean", None,
             "aggregation error ‖ΔW − Σwᵢ·BᵢAᵢ‖ / ‖Σwᵢ·BᵢAᵢ‖",
             "relative error (mean over modules)", False, False)]
    for name, y_key, x_key, title, ylabel, baselines_too, log_y in jobs:
        path = out / name
        _plot(spec, series, path, y_key, x_key, title, ylabel, baselines_too, log_y)
        written.append(path)
    return written


def write(spec: Spec, out: Path) -> dict[str, Any]:
    """(Re)write runs.csv, summary.md and the plots from what is in ``out`` now."""
    series = collect(spec, out)
    wall = sum(s.status.get("wall_s", 0.0) for s in series)
    rows = write_csv(series, out / "runs.csv")
    (out / "summary.md").write_text(summary_markdown(spec, series, wall))
    plots = write_plots(spec, series, out)
    return {"rows": rows, "plots": [str(p) for p in plots], "series": len(series)}

