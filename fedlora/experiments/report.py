"""An experiment's report: ``runs.csv``, ``summary.md``, PNG plots and ``report.html``.

Everything here is computed from the files the cells and baselines wrote (``cell.json``,
``metrics.jsonl``), so a report can be rebuilt at any time, also of a partial or resumed sweep
(``fedlora report OUT``). Where ``OUT/cells`` is gone (committed results keep only
``runs.csv``), the runs are read back from ``runs.csv``. The paired statistics against the
spec's reference are :mod:`fedlora.experiments.stats`; the interactive page is
:mod:`fedlora.experiments.html_report`.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.experiments import stats, task_scores
from fedlora.experiments.plots import write_plots
from fedlora.experiments.report_data import RuleStats, Series, group
from fedlora.experiments.sweep import Spec, cell_status, slug
from fedlora.federation.outputs import read_metrics

FIRST_COLUMNS = ["kind", "setting", "label", "strategy", "seed", "cell", "status", "round"]
# runs.csv column -> cell status key (per row): the cell's wall time, and the seconds its
# final lm-eval tasks took (the run's summary.json ``lm_eval_s``: evaluation work, see _work_s)
STATUS_COLUMNS = {"cell_wall_s": "wall_s", "cell_lm_eval_s": "lm_eval_s"}


def _with_eval_clock(status: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``status`` with the run's ``lm_eval_s`` from its ``summary.json``, when it has one."""
    try:
        seconds = json.loads((directory / "summary.json").read_text()).get("lm_eval_s")
    except (OSError, ValueError, AttributeError):
        return status
    return {**status, "lm_eval_s": float(seconds)} if seconds else status


def collect(spec: Spec, out: Path) -> list[Series]:
    """The runs of ``out``: from its cell directories, else from its ``runs.csv``."""
    if not (out / "cells").is_dir() and (out / "runs.csv").exists():
        return collect_csv(spec, out / "runs.csv")
    series = []
    for cell in spec.cells():
        directory = out / "cells" / cell.id
        status = cell_status(directory)
        if status is None:
            continue
        records = read_metrics(directory)
        task_scores.attach(records, directory)  # eval/<task>.json → lmeval.* on the last round
        series.append(Series("federated", cell.setting.label, cell.strategy.label, cell.seed,
                             cell.id, _with_eval_clock(status, directory), records))
    for setting in spec.settings:
        for seed in spec.seeds:
            for kind in spec.baselines:
                directory = out / "baselines" / f"{slug(setting.label)}--seed{seed}" / kind
                status = cell_status(directory)
                if status is None:
                    continue
                records = read_metrics(directory)
                task_scores.attach(records, directory)
                series.append(Series("baseline", setting.label, f"{kind} (baseline)", seed,
                                     f"{directory.parent.name}/{kind}", status, records))
    return series


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False}.get(text, text)


def collect_csv(spec: Spec, path: Path) -> list[Series]:
    """Series rebuilt from a ``runs.csv`` that :func:`write_csv` wrote (empty cells dropped,
    numbers and JSON values parsed back); runs of settings the spec lacks are ignored."""
    runs: dict[str, Series] = {}
    settings = {s.label for s in spec.settings}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["setting"] not in settings:
                continue
            status = {"status": row["status"]}
            for column, key in STATUS_COLUMNS.items():
                if row.get(column):
                    status[key] = float(row[column])
            s = runs.setdefault(row["cell"], Series(row["kind"], row["setting"], row["label"],
                                                    int(row["seed"]), row["cell"], status, []))
            rec = {k: _parse(v) for k, v in row.items()
                   if v != "" and k not in FIRST_COLUMNS and k not in STATUS_COLUMNS}
            rec["round"] = int(row["round"])
            if row.get("strategy"):
                rec["strategy"] = row["strategy"]
            s.records.append(rec)
    return list(runs.values())


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
            row.update({column: s.status[key] for column, key in STATUS_COLUMNS.items()
                        if s.status.get(key) is not None})
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
    """The first round whose ``metric`` reaches ``target`` (at or above it when
    ``higher_is_better``, else at or below), or ``None`` if none does.
    """
    for rec in records:
        value = rec.get(metric)
        if value is None:
            continue
        if (value >= target) if higher_is_better else (value <= target):
            return int(rec["round"])
    return None


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def summary_markdown(spec: Spec, series: list[Series], wall_s: float | None = None,
                     timing: dict[str, Any] | None = None) -> str:
    """``summary.md``: the sweep's settings, machine and base config, then per setting one
    table row per rule and baseline (final metric, rounds to target, MB, aggregation error,
    wall time), the paired comparison, the lm-eval task scores (where runs have them) and the
    sweep's overhead.
    """
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
            walls = [s.status["wall_s"] for s in ok if s.status.get("wall_s") is not None]
            wall = f"{np.mean(walls):.0f}" if walls else "—"
            label = f"*{row.label}*" if row.kind == "baseline" else row.label
            lines.append(f"| {label} | {stats.fmt_mean_sd(finals)} (n={len(ok)}) | {rtt} | "
                         f"{_mb(up)} | {_mb(down)} | {agg} | {wall} |")
        lines.append("")
        lines += paired_markdown(spec, analysis(spec, series).get(setting.label))
    lines += task_scores.markdown(spec, series)
    overhead = overhead_markdown(spec, series, timing)
    if overhead:
        lines += overhead
    failed = [s for s in series if s.status.get("status") == "failed"]
    if failed:
        lines += ["## Failed cells", ""]
        for s in failed:
            lines += [f"- `{s.cell}`: {s.status.get('error', '').strip()[:600]}"]
        lines.append("")
    lines += ["Plots: `metric_vs_round.png`, `metric_vs_bytes.png`, `agg_error_vs_round.png`, "
              "`rank_plot.png`; interactive: `report.html`; every per-round number is in "
              "`runs.csv`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------ paired statistics


def _by_seed(runs: list[Series]) -> dict[int, list[dict[str, Any]]]:
    return {s.seed: s.records for s in runs if s.status.get("status") == "done" and s.records}


def analysis(spec: Spec, series: list[Series]) -> dict[str, list[RuleStats]]:
    """Per setting: every rule (and baseline) against ``spec.reference``, paired by seed."""
    out: dict[str, list[RuleStats]] = {}
    rows = group(series)
    for setting in spec.settings:
        mine = [r for r in rows if r.setting == setting.label]
        ref = next((r for r in mine if r.label == spec.reference and r.kind == "federated"),
                   None)
        ref_runs = _by_seed(ref.runs) if ref else {}
        finals = {r.label: {seed: v for seed, recs in _by_seed(r.runs).items()
                            if (v := stats.final_value(recs, spec.metric)) is not None}
                  for r in mine if r.kind == "federated"}
        ranked = stats.ranks(finals, spec.higher_is_better)
        table = []
        for r in mine:
            runs = _by_seed(r.runs)
            if not runs:
                continue
            comparison = None
            if r is not ref and ref_runs:
                comparison = stats.paired(runs, ref_runs, spec.metric, spec.higher_is_better,
                                          r.label)
            reached = ([stats.to_target(recs, spec.metric, spec.target, spec.higher_is_better)
                        for recs in runs.values()] if spec.target is not None else [])
            table.append(RuleStats(r.label, r.kind, comparison, reached, ranked.get(r.label)))
        out[setting.label] = table
    return out


def _target_cells(reached: list[tuple[int, float] | None]) -> tuple[str, str]:
    hits = [x for x in reached if x is not None]
    if not reached:
        return "—", "—"
    note = "" if len(hits) == len(reached) else f" ({len(hits)}/{len(reached)} reached)"
    if not hits:
        return f"never{note}", "—"
    rounds = stats.spread([float(h[0]) for h in hits]) + note
    return rounds, stats.spread([h[1] for h in hits])


def paired_markdown(spec: Spec, table: list[RuleStats] | None) -> list[str]:
    """The Markdown lines comparing each rule with the reference, paired by seed (Δ of the final
    metric and of rounds to target, with their intervals); ``[]`` without a table.
    """
    if not table:
        return []
    target = f" {spec.target}" if spec.target is not None else ""
    methods = {t.comparison.final.method for t in table if t.comparison}
    how = {"t": "t-interval over seeds", "bootstrap-t": "bootstrap-t over seeds",
           "none": "one seed: no interval"}
    lines = [f"Paired by seed against the reference `{spec.reference}` (Δ = rule − reference; "
             f"95 % CI: {', '.join(how[m] for m in sorted(methods)) or '—'}; win / loss = the "
             "CI excludes 0 on the better / worse side; area = mean "
             f"{spec.metric} over the rounds, i.e. area under its curve ÷ rounds):", "",
             f"| rule | seeds | Δ final [95 % CI] | call | Δ area [95 % CI] | call | "
             f"rounds to{target} median [min, max] | MB to{target} | mean rank [95 % CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        label = f"*{t.label}*" if t.kind == "baseline" else t.label
        rounds, mb = _target_cells(t.reached)
        rank = "—" if t.rank is None else (
            f"{t.rank.mean:.2f}" if t.rank.method == "none"
            else f"{t.rank.mean:.2f} [{t.rank.low:.2f}, {t.rank.high:.2f}]")
        if t.comparison is None:
            n = len(t.reached) if t.reached else "—"
            lines.append(f"| **{label}** (reference) | {n} | — | — | — | — | {rounds} | {mb} | "
                         f"{rank} |")
            continue
        c = t.comparison
        lines.append(f"| {label} | {len(c.seeds)} | {stats.fmt_interval(c.final)} | "
                     f"{c.final_call} | {stats.fmt_interval(c.area)} | {c.area_call} | "
                     f"{rounds} | {mb} | {rank} |")
    lines.append("")
    return lines


def _work_s(run: Series) -> float:
    """Seconds a run spent training, aggregating and evaluating: its records' own clocks, and
    the lm-eval tasks run on its final model (``eval.tasks``)."""
    return float(run.status.get("lm_eval_s") or 0) + sum(
        float(r.get("duration_s") or 0) + float(r.get("eval_s") or 0) for r in run.records)


def overhead(spec: Spec, series: list[Series], timing: dict[str, Any] | None
             ) -> dict[str, float] | None:
    """The sweep's own time (start-up, teardown, reports) against its cells' work, for a sweep
    that ran every cell in one invocation (``timing.json``), or that started afresh and was cut
    short (``fresh``: what it ran so far, rewritten after every cell and baseline run); None
    otherwise (a resumed sweep's timing misses the earlier invocations). Work is what the
    finished runs' records clock (``duration_s`` + ``eval_s``: training, aggregation and
    evaluation) plus their final lm-eval tasks (``lm_eval_s``); the first round's
    ``duration_s`` also holds the Ray workers' lazy model loading, so start-up is if anything
    under-counted; a failed run's time is all overhead."""
    if not timing:
        return None
    timed = [s for s in series if s.status.get("wall_s") is not None]
    ran = sum(1 for s in timed if s.kind == "federated")
    complete = timing.get("cells_run") == len(spec.cells())
    cut_short = bool(timing.get("fresh")) and timing.get("cells_run") == ran
    if not (complete or cut_short):
        return None
    if not timing.get("complete") and "baselines_run" not in timing:
        # cut short by a runner that rewrote timing.json after cells only: the baselines that
        # ran after its last rewrite are not in its wall time, so report the cells' part
        timed = [s for s in timed if s.kind == "federated"]
    done = [s for s in timed if s.status.get("status") == "done"]
    fed = [s for s in done if s.kind == "federated"]
    base = [s for s in done if s.kind == "baseline"]
    failed = [s for s in timed if s.status.get("status") != "done"]
    work = sum(_work_s(s) for s in done)
    cell_wall = sum(s.status["wall_s"] for s in fed)
    base_wall = sum(s.status["wall_s"] for s in base)
    failed_wall = sum(s.status["wall_s"] for s in failed)
    wall = float(timing["wall_s"])
    report_s = float(timing.get("report_s", 0.0))
    return {"wall_s": wall, "work_s": work,
            "cell_startup_s": cell_wall - sum(_work_s(s) for s in fed),
            "baseline_setup_s": base_wall - sum(_work_s(s) for s in base),
            "failed_s": failed_wall, "failed": len(failed), "report_s": report_s,
            "other_s": wall - cell_wall - base_wall - failed_wall - report_s,
            "overhead_s": wall - work, "fraction": (wall - work) / wall if wall else math.nan,
            "cells_run": ran, "cells": len(spec.cells())}


CELL_STARTUP = {  # what a cell's wall time holds besides its rounds, per engine (timing.json)
    "simulation": "per-cell Flower start-up and teardown (SuperLink, Ray, models, run submission)",
    "inprocess": "per-cell set-up and teardown in process (model loads, discovery, export)",
}


def overhead_markdown(spec: Spec, series: list[Series], timing: dict[str, Any] | None
                      ) -> list[str]:
    """The "Sweep overhead" section (:func:`overhead`) as Markdown lines; ``[]`` when unknown."""
    o = overhead(spec, series, timing)
    if o is None:
        return []
    so_far = (f"So far (the sweep was cut short after {o['cells_run']} of {o['cells']} cells): "
              if o["cells_run"] < o["cells"] else "")
    return ["## Sweep overhead", "",
            f"{so_far}Wall time {o['wall_s']:.1f} s, of which the runs' own training, "
            f"aggregation and evaluation (their `duration_s` + `eval_s`, and `lm_eval_s` of "
            f"their final lm-eval tasks) {o['work_s']:.1f} s; "
            f"the sweep's own time is **{o['overhead_s']:.1f} s = "
            f"{100 * o['fraction']:.1f} %**:", "",
            "| part | s |", "|---|---|",
            f"| {CELL_STARTUP[str(timing.get('engine', 'simulation'))]} | "
            f"{o['cell_startup_s']:.1f} |",
            f"| baselines' set-up (data, model) | {o['baseline_setup_s']:.1f} |",
            *([f"| {o['failed']} failed run(s), their whole wall time | {o['failed_s']:.1f} |"]
              if o["failed"] else []),
            f"| writing reports (after every cell) | {o['report_s']:.1f} |",
            f"| the rest (spec, bookkeeping) | {o['other_s']:.1f} |", ""]


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


def write(spec: Spec, out: Path, plots: bool = True) -> dict[str, Any]:
    """(Re)write runs.csv, summary.md, the plots and report.html from what is in ``out`` now
    (``plots=False``: runs.csv and summary.md only)."""
    from fedlora.experiments import html_report

    series = collect(spec, out)
    walls = [s.status["wall_s"] for s in series if s.status.get("wall_s") is not None]
    timing = None
    if (out / "timing.json").exists():
        timing = json.loads((out / "timing.json").read_text())
    rows = write_csv(series, out / "runs.csv")
    (out / "summary.md").write_text(summary_markdown(spec, series, sum(walls) if walls
                                                     else None, timing))
    written: list[Path] = []
    if plots:
        tables = analysis(spec, series)
        written = write_plots(spec, series, tables, out)
        written.append(html_report.write(spec, series, tables, out))
    return {"rows": rows, "plots": [str(p) for p in written], "series": len(series)}

