"""The report's lm-eval section: task scores of synthetic cells, paired against the reference."""

from __future__ import annotations

import csv
import json
import math
import shutil

from fedlora.experiments import report, task_scores
from fedlora.experiments.sweep import parse_spec

SPEC = """
name = "tasks"
preset = "chatterbot-smollm2"
seeds = [0, 1, 2]
metric = "eval_loss"
reference = "ref"
baselines = []
[base]
num-clients = 3
num-server-rounds = 2
[[strategies]]
label = "ref"
strategy = "fedit"
[[strategies]]
label = "other"
strategy = "flexlora"
"""

# per seed 0, 1, 2: final eval_loss, bbc-topic acc, chatterbot-qa lm-eval perplexity (exp(-ll))
RUNS = {"ref": ([2.0, 2.2, 2.1], [0.40, 0.60, 0.50], [30.0, 32.0, 31.0]),
        "other": ([1.9, 2.0, 2.0], [0.50, 0.72, 0.58], [28.0, 31.0, 29.0])}


def fake_cell(out, cell, loss, acc, neg_loglik, tasks=True):
    """A finished cell: 3 rounds of metrics.jsonl and, with ``tasks``, the two eval files
    :func:`fedlora.learning.lmeval.write` writes."""
    directory = out / "cells" / cell.id
    directory.mkdir(parents=True)
    records = [{"round": r, "eval_loss": loss + 1.0 - 0.5 * r, "bytes_up": 1.0,
                "bytes_down": 1.0} for r in range(3)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    (directory / "cell.json").write_text(json.dumps({"cell": cell.id, "status": "done",
                                                     "wall_s": 5.0}))
    if not tasks:
        return
    (directory / "eval").mkdir()
    (directory / "eval" / "round-2").mkdir()  # per-round files are not read
    for task, metrics in (("fedlora-bbc-topic", {"acc": acc, "acc_norm": 0.2, "n-samples": 40}),
                          ("fedlora-chatterbot-qa", {"perplexity": math.exp(neg_loglik),
                                                     "acc": 0.0, "n-samples": 40})):
        payload = {"task": task, "metrics": metrics, "time": 0.0, "limit": 40}
        (directory / "eval" / f"{task}.json").write_text(json.dumps(payload))
        (directory / "eval" / "round-2" / f"{task}.json").write_text(json.dumps(
            {**payload, "metrics": {k: 99.0 for k in metrics}}))


def sweep(tmp_path, tasks=True):
    spec = parse_spec(SPEC)
    for cell in spec.cells():
        loss, acc, nll = RUNS[cell.strategy.label]
        fake_cell(tmp_path, cell, loss[cell.seed], acc[cell.seed], nll[cell.seed], tasks)
    return spec


def section(summary: str) -> str:
    start = summary.index("## lm-eval tasks")
    end = summary.find("\n## ", start + 1)
    return summary[start:] if end < 0 else summary[start:end]


def row(text: str, title: str, label: str) -> list[str]:
    start = text.index(title)
    for line in text[start:].splitlines():
        if line.startswith(f"| {label} |") or line.startswith(f"| **{label}** "):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {label!r} under {title!r}")


def test_task_section_pairs_each_task_score_against_the_reference(tmp_path):
    """bbc-topic acc: Δ per seed +0.10, +0.12, +0.08 → mean +0.10, s = 0.02, t(0.975, 2) =
    4.3027 → ±0.0497: [+0.0503, +0.1497], a win. chatterbot-qa answer log-likelihood
    (−ln perplexity): Δ +2, +1, +2 → +1.6667 ± 4.3027·0.5774/√3 = [+0.2324, +3.1009], a win
    (a higher likelihood, i.e. a lower lm-eval perplexity)."""
    spec = sweep(tmp_path)
    report.write(spec, tmp_path, plots=False)
    text = section((tmp_path / "summary.md").read_text())
    bbc = "`fedlora-bbc-topic` `acc`"
    assert row(text, bbc, "other") == ["other", "3", "0.6000 ± 0.1114",
                                      "+0.1000 [+0.0503, +0.1497]", "win"]
    assert row(text, bbc, "ref")[:3] == ["**ref** (reference)", "3", "0.5000 ± 0.1000"]
    assert "higher is better; 40 examples per run" in text
    qa = "`fedlora-chatterbot-qa` answer log-likelihood"
    assert row(text, qa, "other") == ["other", "3", "-29.3333 ± 1.5275",
                                     "+1.6667 [+0.2324, +3.1009]", "win"]


def test_perplexity_of_the_final_loss_is_paired_too(tmp_path):
    spec = sweep(tmp_path)
    report.write(spec, tmp_path, plots=False)
    text = section((tmp_path / "summary.md").read_text())
    diffs = [math.exp(a) - math.exp(b) for a, b in zip(RUNS["other"][0], RUNS["ref"][0],
                                                       strict=True)]
    mean = sum(diffs) / 3  # -0.70, -1.64, -0.78: lower on every seed, but spread
    half = 4.302653 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    cells = row(text, "perplexity = exp(final `eval_loss`)", "other")
    assert cells[3] == f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"
    assert mean + half > 0 and cells[4] == "tie"  # the 95 % CI still reaches above 0
    assert "lower is better" in text.split("perplexity = exp", 1)[1].splitlines()[0]


def test_task_scores_are_runs_csv_columns_and_survive_a_rebuild_from_it(tmp_path):
    spec = sweep(tmp_path)
    report.write(spec, tmp_path, plots=False)
    first = section((tmp_path / "summary.md").read_text())
    with (tmp_path / "runs.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    key = "lmeval.fedlora-bbc-topic.acc"
    last = [r for r in rows if r["round"] == "2"]
    assert {float(r[key]) for r in last if r["label"] == "other"} == {0.50, 0.72, 0.58}
    assert all(r[key] == "" for r in rows if r["round"] != "2")  # final scores: last row only
    assert "lmeval.fedlora-chatterbot-qa.perplexity" in rows[0]
    shutil.rmtree(tmp_path / "cells")  # committed results keep runs.csv only
    report.write(spec, tmp_path, plots=False)
    assert section((tmp_path / "summary.md").read_text()) == first


def test_a_sweep_without_task_files_gets_no_task_section(tmp_path):
    spec = sweep(tmp_path, tasks=False)
    report.write(spec, tmp_path, plots=False)
    summary = (tmp_path / "summary.md").read_text()
    assert "lm-eval" not in summary and "perplexity = exp" not in summary
    with (tmp_path / "runs.csv").open() as fh:
        assert not any(k.startswith("lmeval.") for k in next(csv.DictReader(fh)))


def test_main_metric_is_acc_or_the_log_likelihood_of_a_loglikelihood_task():
    assert task_scores.main_metric({"acc", "acc_norm"}) == "acc"
    assert task_scores.main_metric({"perplexity", "acc"}) == "perplexity"
    assert task_scores.main_metric({"word_perplexity", "bits_per_byte"}) == "bits_per_byte"
    score = task_scores._task_score("t", "perplexity")
    assert score.higher_is_better
    assert score.value([{"round": 1, "lmeval.t.perplexity": math.exp(12.5)}]) == -12.5
    assert not task_scores._task_score("t", "bits_per_byte").higher_is_better
