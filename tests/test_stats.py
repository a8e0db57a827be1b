"""Paired statistics of experiment reports: intervals, calls at their stated rate, targets."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from fedlora.experiments import report, stats
from fedlora.experiments import runner as experiment_runner
from fedlora.experiments import sweep as experiment
from fedlora.experiments.sweep import parse_spec

SPEC = """
name = "synthetic"
preset = "bbc-minilm"
seeds = [{seeds}]
metric = "{metric}"
target = {target}
reference = "ref"
baselines = []
[base]
num-clients = 2
num-server-rounds = 4
[[strategies]]
label = "better"
strategy = "fedit"
[[strategies]]
label = "ref"
strategy = "fedit"
[[strategies]]
label = "same"
strategy = "ffa"
[[strategies]]
label = "worse"
strategy = "fedsa"
"""


def curve(final: float, rounds: int = 4) -> list[float]:
    """A run that rises linearly from 0.2 to ``final``."""
    return [0.2 + (final - 0.2) * r / rounds for r in range(rounds + 1)]


def write_runs_csv(path, spec, effects, rng, seed_sd=0.15, noise_sd=0.01, rounds=4):
    """runs.csv of a finished sweep: per seed a shared difficulty (large) plus per-rule noise
    (small) on top of each rule's true effect; 1 MB up and down per round."""
    rows = []
    setting = spec.settings[0].label
    for seed in spec.seeds:
        difficulty = rng.normal(0, seed_sd)
        for arm in spec.strategies:
            final = 0.7 + difficulty + effects[arm.label] + rng.normal(0, noise_sd)
            cell = experiment.Cell(spec.settings[0], arm, seed).id
            for r, value in enumerate(curve(final, rounds)):
                rows.append({"kind": "federated", "setting": setting, "label": arm.label,
                             "strategy": arm.keys["strategy"], "seed": seed, "cell": cell,
                             "status": "done", "round": r, "eval_accuracy": value,
                             "eval_loss": 1 - value, "bytes_up": 5e5 * (r > 0),
                             "bytes_down": 5e5 * (r > 0)})
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def synthetic_sweep(tmp_path, seeds=5, metric="eval_accuracy", target=0.6, **kw):
    text = SPEC.format(seeds=", ".join(map(str, range(seeds))), metric=metric, target=target)
    (tmp_path / "spec.toml").write_text(text)
    spec = experiment.load_output_spec(tmp_path)
    effects = {"better": 0.05, "ref": 0.0, "same": 0.0, "worse": -0.05}
    write_runs_csv(tmp_path / "runs.csv", spec, effects, np.random.default_rng(7), **kw)
    return spec


def paired_row(summary: str, label: str) -> list[str]:
    start = summary.index("| rule | seeds | Δ final")
    for line in summary[start:].splitlines():
        if line.startswith(f"| {label} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no paired row for {label!r}")


def test_t_interval_is_the_textbook_one():
    iv = stats.mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} · s / √n
    assert iv.method == "t" and iv.n == 3
    assert iv.mean == pytest.approx(2.0)
    assert (iv.low, iv.high) == pytest.approx((2.0 - half, 2.0 + half))


def test_ten_seeds_or_more_use_the_bootstrap_and_one_seed_has_no_interval():
    rng = np.random.default_rng(0)
    assert stats.mean_ci(rng.normal(size=9)).method == "t"
    ten = stats.mean_ci(rng.normal(1.0, 0.1, size=10))
    assert ten.method == "bootstrap-t" and ten.low < ten.mean < ten.high
    one = stats.mean_ci([0.3])
    assert one.method == "none" and stats.call(one, True) == "—"


def test_bootstrap_interval_is_reproducible_and_close_to_t_for_normal_data():
    x = np.random.default_rng(3).normal(0.02, 0.01, size=30)
    a, b = stats.mean_ci(x), stats.mean_ci(x)
    assert a == b  # seeded generator
    half_t = stats.t_quantile(0.975, 29) * x.std(ddof=1) / math.sqrt(30)
    assert a.high - a.low == pytest.approx(2 * half_t, rel=0.2)


@pytest.mark.parametrize("seeds", [3, 5, 10])
def test_a_zero_difference_is_called_a_tie_at_the_stated_rate(seeds):
    """Many synthetic paired experiments with no true difference (large seed effects shared
    by both rules): a false win and a false loss each happen at the one-sided 2.5 %, within a
    4-sigma binomial bound of the number of experiments."""
    rng = np.random.default_rng(100 + seeds)
    trials = 3000
    calls = []
    for _ in range(trials):
        difficulty = rng.normal(0, 0.2, size=seeds)
        runs = {}
        for label in ("rule", "ref"):
            finals = 0.7 + difficulty + rng.normal(0, 0.01, size=seeds)
            runs[label] = {s: [{"round": r, "eval_accuracy": v} for r, v in
                               enumerate(curve(finals[s]))] for s in range(seeds)}
        c = stats.paired(runs["rule"], runs["ref"], "eval_accuracy", True)
        calls.append(c.final_call)
    p = 0.025
    bound = 4 * math.sqrt(p * (1 - p) / trials)
    wins, losses = calls.count("win") / trials, calls.count("loss") / trials
    assert abs(wins - p) < bound, (wins, bound)
    assert abs(losses - p) < bound, (losses, bound)
    assert calls.count("tie") / trials == pytest.approx(0.95, abs=2 * bound)


def test_a_real_difference_is_a_win_a_zero_one_a_tie_from_runs_csv(tmp_path):
    """A +0.05 rule, a −0.05 rule and an equal one against the reference, with a seed spread
    (0.15) three times the effect: paired by seed the calls are right; the unpaired spread of
    the final values (mean ± std column) would not separate them."""
    spec = synthetic_sweep(tmp_path)
    report.write(spec, tmp_path, plots=False)
    summary = (tmp_path / "summary.md").read_text()
    assert "reference `ref`" in summary and "t-interval over seeds" in summary
    better, same, worse = (paired_row(summary, k) for k in ("better", "same", "worse"))
    assert better[1] == "5" and better[3] == "win" and better[5] == "win"
    assert same[3] == "tie" and same[5] == "tie"
    assert worse[3] == "loss" and worse[5] == "loss"
    assert "**ref** (reference)" in summary
    low, high = (float(v) for v in better[2].split("[")[1].rstrip("]").split(","))
    assert low < 0.05 < high and low > 0


def test_a_lower_is_better_metric_calls_a_lower_loss_a_win(tmp_path):
    spec = synthetic_sweep(tmp_path, metric="eval_loss", target=0.4)
    assert not spec.higher_is_better
    report.write(spec, tmp_path, plots=False)
    summary = (tmp_path / "summary.md").read_text()
    assert paired_row(summary, "better")[3] == "win"  # its loss is 0.05 lower
    assert paired_row(summary, "worse")[3] == "loss"


def test_bootstrap_calls_from_ten_seeds_in_the_summary(tmp_path):
    spec = synthetic_sweep(tmp_path, seeds=12)
    report.write(spec, tmp_path, plots=False)
    summary = (tmp_path / "summary.md").read_text()
    assert "bootstrap-t over seeds" in summary
    assert paired_row(summary, "better")[3] == "win"
    assert paired_row(summary, "same")[3] == "tie"


def test_rounds_and_bytes_to_target_with_their_spread(tmp_path):
    recs = [{"round": r, "eval_accuracy": v, "bytes_up": 1e6 * (r > 0), "bytes_down": 1e6 * (r > 0)}
            for r, v in enumerate([0.1, 0.5, 0.7, 0.9])]
    assert stats.to_target(recs, "eval_accuracy", 0.7, True) == (2, 4.0)
    assert stats.to_target(recs, "eval_accuracy", 0.95, True) is None
    assert stats.spread([2.0, 3.0, 5.0]) == "3 [2, 5]"
    spec = synthetic_sweep(tmp_path, seed_sd=0.0, noise_sd=0.0)
    report.write(spec, tmp_path, plots=False)
    summary = (tmp_path / "summary.md").read_text()
    # curves rise linearly 0.2 → final over 4 rounds: "better" (0.75) passes 0.6 at round 3,
    # "worse" (0.65) only at round 4; 1 MB per round (up + down)
    assert paired_row(summary, "better")[6:8] == ["3 [3, 3]", "3 [3, 3]"]
    assert paired_row(summary, "worse")[6:8] == ["4 [4, 4]", "4 [4, 4]"]


def test_curve_area_is_the_mean_level_over_the_rounds():
    recs = [{"round": r, "m": v} for r, v in enumerate([0.0, 1.0, 1.0])]
    assert stats.curve_area(recs, "m") == pytest.approx((0.5 + 1.0) / 2)
    assert stats.curve_area(recs, "m", upto=1) == pytest.approx(0.5)
    assert stats.curve_area(recs[:1], "m") is None


def test_ranks_share_ties_and_stay_within_the_possible_ranks():
    finals = {"a": {0: 0.9, 1: 0.8, 2: 0.9}, "b": {0: 0.7, 1: 0.8, 2: 0.6},
              "c": {0: 0.5, 1: 0.4, 2: 0.8}}
    r = stats.ranks(finals, higher_is_better=True)
    assert r["a"].mean == pytest.approx((1 + 1.5 + 1) / 3)
    assert r["b"].mean == pytest.approx((2 + 1.5 + 3) / 3)
    assert all(1.0 <= iv.low <= iv.high <= 3.0 for iv in r.values())


def test_reference_must_be_a_strategy_label():
    with pytest.raises(experiment.SpecError, match="reference 'fedavg' is not a strategy"):
        parse_spec(SPEC.format(seeds="0", metric="eval_accuracy", target=0.5)
                   .replace('reference = "ref"', 'reference = "fedavg"'))
    spec = parse_spec(SPEC.format(seeds="0", metric="eval_accuracy", target=0.5)
                      .replace('reference = "ref"\n', ""))
    assert spec.reference == "better"  # default: the first strategy


def test_seeds_override_keeps_the_specs_own_seeds_first(tmp_path):
    spec = parse_spec(SPEC.format(seeds="3, 0", metric="eval_accuracy", target=0.5))
    assert experiment.with_seeds(spec, 4).seeds == [3, 0, 1, 2]
    assert experiment.with_seeds(spec, 1).seeds == [3]
    with pytest.raises(experiment.SpecError, match="--seeds must be >= 1"):
        experiment.with_seeds(spec, 0)


def test_report_of_a_seeds_override_uses_the_seeds_that_ran(tmp_path):
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(SPEC.format(seeds="0", metric="eval_accuracy", target=0.5))
    spec = experiment.with_seeds(experiment.load_spec(spec_file), 3)
    out = tmp_path / "out"
    experiment_runner.Runner(spec, out).prepare()
    again = experiment.load_output_spec(out)
    assert again.seeds == [0, 1, 2] and len(again.cells()) == 4 * 3


def test_sweep_overhead_is_the_wall_time_the_runs_do_not_clock(tmp_path):
    """Two cells of 100 s wall each that clock 60 s of rounds and evaluation, one failed cell
    of 30 s, reports 5 s, a sweep of 240 s: overhead 240 − 120 = 120 s = 50 %."""
    import json

    text = SPEC.format(seeds="0", metric="eval_accuracy", target=0.5)
    spec = parse_spec(text)
    cells = spec.cells()
    for cell, status in zip(cells[:3], ["done", "done", "failed"], strict=True):
        d = tmp_path / "cells" / cell.id
        d.mkdir(parents=True)
        recs = [{"round": 0, "duration_s": 0.0, "eval_s": 10.0, "eval_accuracy": 0.2},
                {"round": 1, "duration_s": 40.0, "eval_s": 10.0, "eval_accuracy": 0.6}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs)
                                         if status == "done" else "")
        (d / "cell.json").write_text(json.dumps({"status": status, "error": "x",
                                                 "wall_s": 100.0 if status == "done" else 30}))
    timing = {"wall_s": 240.0, "report_s": 5.0, "cells_run": len(cells)}
    o = report.overhead(spec, report.collect(spec, tmp_path), timing)
    assert o["work_s"] == pytest.approx(120.0) and o["overhead_s"] == pytest.approx(120.0)
    assert o["fraction"] == pytest.approx(0.5)
    assert o["cell_startup_s"] == pytest.approx(80.0) and o["failed_s"] == pytest.approx(30.0)
    assert o["other_s"] == pytest.approx(240 - 200 - 30 - 5)
    (tmp_path / "timing.json").write_text(json.dumps(timing))
    report.write(spec, tmp_path, plots=False)
    summary = (tmp_path / "summary.md").read_text()
    assert "## Sweep overhead" in summary and "**120.0 s = 50.0 %**" in summary
    assert "| 1 failed run(s), their whole wall time | 30.0 |" in summary
    # a resumed sweep (fewer cells run than the spec has) gets no overhead section
    assert report.overhead(spec, report.collect(spec, tmp_path), {**timing, "cells_run": 1}) \
        is None
