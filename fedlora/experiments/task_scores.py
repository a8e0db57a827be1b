"""The report's "lm-eval tasks" section: each run's lm-eval task scores, paired by seed.

A run with ``eval.tasks`` writes one ``eval/<task>.json`` per task after its last round
(:func:`fedlora.learning.lmeval.write`: ``{"task": ..., "metrics": {metric: value, ...,
"n-samples": n}}``, lm-eval on the merged final export). :func:`read` turns those files into
record keys ``lmeval.<task>.<metric>`` that :func:`attach` puts on the run's last record, so
they become ``runs.csv`` columns (on the last round's row) and come back when a report is
rebuilt from ``runs.csv`` alone. Per-round task files (``eval/round-<r>/``) are not read.

:func:`markdown` is the section itself, only for sweeps where some run has task scores: per
setting and per score, one row per rule with its mean ± sample std over seeds and the paired
difference against the spec's reference, ``Δ = rule − reference`` by seed, with the 95 % CI and
win / tie / loss call of :mod:`fedlora.experiments.stats` (the same statistics as the main
paired table). The scores are the perplexity of the final held-out loss (``exp`` of the last
``eval_loss``) and one main metric per task (:func:`main_metric`): ``acc`` for multiple choice
tasks, and for a log-likelihood task, whose lm-eval ``perplexity`` is ``exp(−mean over answers
of the answer's summed log-likelihood)``, that mean log-likelihood itself (``−ln perplexity``,
nats per answer: differences of it are differences of log-likelihood, not of an exponential).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.experiments import stats
from fedlora.experiments.report_data import Series, group
from fedlora.experiments.sweep import Spec

PREFIX = "lmeval."
COUNT = "n-samples"
PREFERRED = ("acc", "acc_norm", "exact_match", "f1", "mcc", "bleu")
LOWER_IS_BETTER = ("perplexity", "loss", "error", "bits_per_byte", "ter")


def read(directory: Path) -> dict[str, float]:
    """``{"lmeval.<task>.<metric>": value}`` from ``directory/eval/*.json`` (numbers only;
    unreadable files are skipped)."""
    out: dict[str, float] = {}
    for path in sorted((directory / "eval").glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get("metrics"), dict):
            continue
        task = str(payload.get("task") or path.stem)
        for metric, value in payload["metrics"].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{PREFIX}{task}.{metric}"] = float(value)
    return out


def attach(records: list[dict[str, Any]], directory: Path) -> None:
    """Add :func:`read`'s scores of ``directory`` to the last round's record (none: nothing)."""
    scores = read(directory)
    if scores and records:
        max(records, key=lambda r: int(r.get("round", 0))).update(scores)


def task_metrics(series: list[Series]) -> dict[str, set[str]]:
    """Every task any run scored, with the metrics it logged (``n-samples`` left out)."""
    out: dict[str, set[str]] = {}
    for s in series:
        for rec in s.records:
            for key in rec:
                if key.startswith(PREFIX):
                    task, metric = key[len(PREFIX):].rsplit(".", 1)
                    if metric != COUNT:
                        out.setdefault(task, set()).add(metric)
    return out


def main_metric(metrics: set[str]) -> str | None:
    """The metric a task is reported by: ``perplexity`` for a log-likelihood task (shown as
    the mean log-likelihood), else the first of :data:`PREFERRED`, else the first by name."""
    if "perplexity" in metrics:
        return "perplexity"
    for name in PREFERRED:
        if name in metrics:
            return name
    return min(metrics) if metrics else None


@dataclass(frozen=True)
class Score:
    """One reported score: its title, direction, and how to read it from a run's records."""

    title: str
    higher_is_better: bool
    value: Callable[[list[dict[str, Any]]], float | None]
    count_key: str | None = None  # the record key holding lm-eval's examples per task


def _task_score(task: str, metric: str) -> Score:
    key = f"{PREFIX}{task}.{metric}"
    count = f"{PREFIX}{task}.{COUNT}"
    if metric == "perplexity":
        def loglik(records: list[dict[str, Any]]) -> float | None:
            ppl = stats.final_value(records, key)
            return -math.log(ppl) if ppl is not None and ppl > 0 else None

        return Score(f"`{task}` answer log-likelihood (−ln of lm-eval's `perplexity`, nats per "
                     f"answer)", True, loglik, count)
    lower = any(word in metric for word in LOWER_IS_BETTER)
    return Score(f"`{task}` `{metric}`", not lower,
                 lambda records: stats.final_value(records, key), count)


def _perplexity(records: list[dict[str, Any]]) -> float | None:
    loss = stats.final_value(records, "eval_loss")
    return math.exp(loss) if loss is not None else None


def scores(series: list[Series]) -> list[Score]:
    """The section's scores: final perplexity (where ``eval_loss`` was logged), then each task's
    main metric, tasks by name; ``[]`` when no run has task scores."""
    tasks = task_metrics(series)
    if not tasks:
        return []
    out = []
    if any(r.get("eval_loss") is not None for s in series for r in s.records):
        out.append(Score("perplexity = exp(final `eval_loss`) on the held-out answers", False,
                         _perplexity))
    for task in sorted(tasks):
        metric = main_metric(tasks[task])
        if metric is not None:
            out.append(_task_score(task, metric))
    return out


def _by_seed(runs: list[Series], score: Score) -> dict[int, float]:
    out = {}
    for s in runs:
        if s.status.get("status") == "done" and s.records:
            value = score.value(s.records)
            if value is not None and math.isfinite(value):
                out[s.seed] = value
    return out


def _examples(runs: list[Series], score: Score) -> str:
    if score.count_key is None:
        return ""
    counts = sorted({int(n) for s in runs if (n := stats.final_value(s.records, score.count_key))
                     is not None})
    return f"; {'/'.join(map(str, counts))} examples per run" if counts else ""


def score_table(spec: Spec, series: list[Series], setting: str, score: Score) -> list[str]:
    """One score's Markdown table for ``setting``: per rule (reference first) mean ± std over
    seeds and the paired Δ against the reference with its CI and call; ``[]`` without values."""
    rows = [(r, v) for r in group(series) if r.setting == setting
            if (v := _by_seed(r.runs, score))]
    if not rows:
        return []
    ref = next((v for r, v in rows if r.label == spec.reference and r.kind == "federated"), {})
    rows.sort(key=lambda rv: not (rv[0].label == spec.reference and rv[0].kind == "federated"))
    better = "higher" if score.higher_is_better else "lower"
    lines = [f"{score.title}, {better} is better"
             f"{_examples([s for r, _ in rows for s in r.runs], score)}:", "",
             "| rule | seeds | mean ± std | Δ vs reference [95 % CI] | call |",
             "|---|---|---|---|---|"]
    for row, values in rows:
        label = f"*{row.label}*" if row.kind == "baseline" else row.label
        spread = stats.fmt_mean_sd(list(values.values()))
        if row.label == spec.reference and row.kind == "federated":
            lines.append(f"| **{label}** (reference) | {len(values)} | {spread} | — | — |")
            continue
        common = sorted(set(values) & set(ref))
        diff = stats.mean_ci([values[s] - ref[s] for s in common])
        lines.append(f"| {label} | {len(common)} | {spread} | {stats.fmt_interval(diff)} | "
                     f"{stats.call(diff, score.higher_is_better) if common else '—'} |")
    return [*lines, ""]


def markdown(spec: Spec, series: list[Series]) -> list[str]:
    """The "lm-eval tasks" section of ``summary.md`` (``[]`` when no run scored a task)."""
    chosen = scores(series)
    if not chosen:
        return []
    lines = ["## lm-eval tasks", "",
             "Each run's final model scored by lm-eval (`eval/<task>.json`; every metric is a "
             "`lmeval.<task>.<metric>` column of `runs.csv`, on the last round's row), with "
             f"the final perplexity; Δ = rule − reference `{spec.reference}`, paired by seed "
             "(95 % CI and call as in the paired table above).", ""]
    for setting in spec.settings:
        tables = [t for score in chosen if (t := score_table(spec, series, setting.label,
                                                               score))]
        if tables:
            lines += [f"### {setting.label}", ""]
            for table in tables:
                lines += table
    return lines
