"""timing.json of a sweep cut short: the overhead of what it ran, and never of a resumed one."""

from __future__ import annotations

import json

import pytest

from fedlora.experiments import report
from fedlora.experiments.sweep import parse_spec

SPEC = """
name = "cut"
preset = "bbc-minilm"
seeds = [0, 1]
baselines = []
[base]
num-clients = 2
num-server-rounds = 1
[[strategies]]
strategy = "fedit"
[[strategies]]
strategy = "ffa"
"""


def _finished_cells(spec, out, count):
    """``count`` cells done, each 50 s of wall that clocks 40 s of rounds and evaluation."""
    for cell in spec.cells()[:count]:
        d = out / "cells" / cell.id
        d.mkdir(parents=True)
        recs = [{"round": 0, "duration_s": 0.0, "eval_s": 5.0, "eval_accuracy": 0.2},
                {"round": 1, "duration_s": 30.0, "eval_s": 5.0, "eval_accuracy": 0.5}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "cell.json").write_text(json.dumps({"status": "done", "wall_s": 50.0}))


def test_a_fresh_sweep_cut_short_reports_the_overhead_of_the_cells_it_ran(tmp_path):
    spec = parse_spec(SPEC)
    _finished_cells(spec, tmp_path, 2)  # 2 of 4 cells, then the sweep was stopped
    timing = {"wall_s": 120.0, "report_s": 4.0, "cells_run": 2, "fresh": True,
              "complete": False}
    o = report.overhead(spec, report.collect(spec, tmp_path), timing)
    assert o["work_s"] == pytest.approx(80.0) and o["fraction"] == pytest.approx(40 / 120)
    assert (o["cells_run"], o["cells"]) == (2, 4)
    (tmp_path / "timing.json").write_text(json.dumps(timing))
    report.write(spec, tmp_path, plots=False)
    summary = (tmp_path / "summary.md").read_text()
    assert "So far (the sweep was cut short after 2 of 4 cells)" in summary
    assert "**40.0 s = 33.3 %**" in summary


def test_a_resumed_sweep_reports_no_overhead(tmp_path):
    """A resumed sweep's clock misses the earlier invocation's cells: no overhead section."""
    spec = parse_spec(SPEC)
    _finished_cells(spec, tmp_path, 3)  # one cell from before, two from this invocation
    timing = {"wall_s": 120.0, "report_s": 4.0, "cells_run": 2, "fresh": False,
              "complete": False}
    assert report.overhead(spec, report.collect(spec, tmp_path), timing) is None


def test_the_lm_eval_tasks_of_a_cells_final_model_count_as_its_work_not_as_overhead(tmp_path):
    """A cell of 50 s wall whose rounds clock 40 s and whose final lm-eval tasks took 8 s
    (summary.json ``lm_eval_s``) leaves 2 s of overhead, also after a rebuild from runs.csv."""
    spec = parse_spec(SPEC)
    _finished_cells(spec, tmp_path, 4)
    for cell in spec.cells():
        (tmp_path / "cells" / cell.id / "summary.json").write_text(json.dumps(
            {"status": "completed", "lm_eval_s": 8.0}))
    timing = {"wall_s": 200.0, "report_s": 0.0, "cells_run": 4, "fresh": True,
              "complete": True, "engine": "inprocess"}
    o = report.overhead(spec, report.collect(spec, tmp_path), timing)
    assert o["work_s"] == pytest.approx(4 * 48.0) and o["cell_startup_s"] == pytest.approx(8.0)
    report.write_csv(report.collect(spec, tmp_path), tmp_path / "runs.csv")
    rebuilt = report.collect_csv(spec, tmp_path / "runs.csv")
    assert report.overhead(spec, rebuilt, timing)["work_s"] == pytest.approx(4 * 48.0)


def _finished_baselines(spec, out, seeds):
    for seed in seeds:
        d = out / "baselines" / f"default--seed{seed}" / "centralized"
        d.mkdir(parents=True)
        recs = [{"round": 1, "duration_s": 100.0, "eval_s": 0.0, "eval_accuracy": 0.9}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "cell.json").write_text(json.dumps({"status": "done", "wall_s": 110.0}))


def test_a_sweep_stopped_during_its_baselines_reports_the_overhead_of_what_its_clock_covers(
        tmp_path):
    """timing.json written after every cell only (the old runner): the baselines that ran
    after its last rewrite are left out; written after every baseline too: they count."""
    text = SPEC.replace("baselines = []", 'baselines = ["centralized"]')
    spec = parse_spec(text)
    _finished_cells(spec, tmp_path, 4)
    _finished_baselines(spec, tmp_path, [0, 1])
    series = report.collect(spec, tmp_path)
    old = {"wall_s": 210.0, "report_s": 0.0, "cells_run": 4, "fresh": True, "complete": False}
    o = report.overhead(spec, series, old)
    assert o["work_s"] == pytest.approx(160.0) and o["overhead_s"] == pytest.approx(50.0)
    new = {**old, "wall_s": 440.0, "baselines_run": 2}
    o = report.overhead(spec, series, new)
    assert o["work_s"] == pytest.approx(360.0) and o["baseline_setup_s"] == pytest.approx(20.0)
    assert o["overhead_s"] == pytest.approx(80.0)
