"""Experiment sweeps: spec validation, cell layering, baselines, report files, resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora import config
from fedlora.experiments import baselines, report
from fedlora.experiments import sweep as experiment
from fedlora.experiments.sweep import SpecError, parse_spec

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "simulations" / "experiments" / "smoke.toml"

MINIMAL = """
name = "t"
preset = "bbc-minilm"
seeds = [0, 1]
[base]
num-clients = 2
num-server-rounds = 2
[[strategies]]
strategy = "fedit"
[[strategies]]
label = "fedit+adam"
strategy = "fedit"
server-optimizer = "fedadam"
"""


def test_cells_are_settings_times_strategies_times_seeds():
    spec = parse_spec(MINIMAL + """
[[settings]]
label = "iid"
data.partitioner = "iid"
[[settings]]
label = "skew"
data.partitioner = "dirichlet"
[grid]
data.dirichlet-alpha = [1.0, 0.1]
""")
    assert [s.label for s in spec.settings] == [
        "iid dirichlet-alpha=1.0", "iid dirichlet-alpha=0.1",
        "skew dirichlet-alpha=1.0", "skew dirichlet-alpha=0.1"]
    cells = spec.cells()
    assert len(cells) == 4 * 2 * 2
    assert len({c.id for c in cells}) == len(cells)
    assert spec.strategies[0].label == "fedit"  # label defaults to the strategy name


def test_layers_apply_in_order_and_strategies_share_data_and_seed(tmp_path):
    spec = parse_spec(MINIMAL + """
[[settings]]
label = "mixed"
rank-by-partition = "4,8"
data.partitioner = "dirichlet"
[[strategies]]
label = "equal"
strategy = "fedit"
rank-by-partition = ""
""")
    setting = spec.settings[0]
    flat, clients = spec.flat_config(setting, spec.strategies[2], 1, tmp_path)
    assert clients == 2
    assert flat["rank-by-partition"] == ""  # the strategy's layer comes last
    assert flat["seed"] == 1 and flat["output-dir"] == str(tmp_path)
    other, _ = spec.flat_config(setting, spec.strategies[1], 1, tmp_path)
    data_keys = {k: v for k, v in flat.items() if k.startswith("data.")}
    assert data_keys == {k: v for k, v in other.items() if k.startswith("data.")}
    assert other["server-optimizer"] == "fedadam" and flat["server-optimizer"] == "none"


@pytest.mark.parametrize(
    ("extra", "message"),
    [("[[strategies]]\nstrategy = 'fedit'\nlora.rank = 4\n", "did you mean 'lora.r'"),
     ("colour = 'blue'\n", "unknown top-level key(s) ['colour']"),
     ("[grid]\nseed = 3\n", "must be a non-empty list"),
     ("[[strategies]]\nlabel = 'fedit'\nstrategy = 'ffa'\n", "labels must be unique"),
     ("[[strategies]]\nlabel = 'x'\nstrategy = 'fedit'\ntrain.lr = -1.0\n", "train.lr"),
     ("baselines = ['oracle']\n", "unknown baseline(s) ['oracle']")],
)
def test_bad_specs_fail_before_anything_runs(extra, message):
    top_level = extra.startswith(("colour", "baselines"))
    text = extra + MINIMAL if top_level else MINIMAL + extra
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        parse_spec(text)


def test_shipped_specs_parse():
    names = {p.stem for p in (ROOT / "simulations" / "experiments").glob("*.toml")}
    assert {"smoke", "hetero-ranks", "non-iid", "chatterbot"} <= names
    for name in names:
        spec = experiment.load_spec(ROOT / "simulations" / "experiments" / f"{name}.toml")
        assert spec.cells()


def test_hetero_ranks_spec_compares_rank_aware_rules_with_equal_rank_fedit():
    spec = experiment.load_spec(ROOT / "simulations" / "experiments" / "hetero-ranks.toml")
    assert {s.keys["strategy"] for s in spec.strategies} == {"hetlora", "flora", "flexlora",
                                                            "fedit"}
    (setting,) = spec.settings
    assert setting.keys["rank-by-partition"] == "4,8,16"
    assert setting.keys["data.dirichlet-alpha"] == 0.3


# ------------------------------------------------------------------------------- baselines


def tiny_cfg(tmp_path: Path, **extra) -> config.RunConfig:
    flat = config.defaults()
    flat.update({"model.num-hidden-layers": 1, "data.samples-per-client": 16,
                 "data.eval-samples": 24, "data.max-length": 24, "train.local-steps": 2,
                 "train.batch-size": 4, "num-server-rounds": 2, "output-dir": str(tmp_path)})
    flat.update(extra)
    return config.from_flat(flat)


def test_centralized_baseline_spends_the_federations_step_budget(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"fraction-train": 0.5, "min-train-nodes": 1})
    assert cfg.fl.clients_per_round(4) == 2
    records = baselines.run("centralized", cfg, 4, tmp_path / "c")
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in records)
    assert records[1]["train_loss"] > 0 and records[0].get("train_loss") is None
    assert [json.loads(x)["round"] for x in (tmp_path / "c" / "metrics.jsonl")
            .read_text().splitlines()] == [0, 1, 2]


def test_local_baseline_trains_each_client_alone_at_its_own_rank(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"rank-by-partition": "2,4"})
    records = baselines.run("local", cfg, 2, tmp_path / "l")
    assert [r["round"] for r in records] == [0, 1, 2]
    assert "eval_accuracy_std" in records[1]  # mean over the two clients, with its spread
    # the untrained start is the same adapter for everyone: no spread at round 0
    assert records[0]["eval_accuracy_std"] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------- report


def fake_cell(out: Path, cell: experiment.Cell, accs: list[float], status: str = "done",
              error: str = "") -> None:
    directory = out / "cells" / cell.id
    directory.mkdir(parents=True)
    lines = [{"round": i, "strategy": cell.strategy.keys["strategy"], "eval_accuracy": a,
              "eval_loss": 1.0 - a, "bytes_up": 100 * (i > 0), "bytes_down": 200 * (i > 0),
              "agg_error_mean": 0.1 if i else None, "rejected": {}} for i, a in enumerate(accs)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (directory / "cell.json").write_text(json.dumps({"cell": cell.id, "status": status,
                                                     "error": error, "wall_s": 10.0}))


def test_report_from_finished_and_failed_cells(tmp_path):
    spec = parse_spec(MINIMAL.replace("seeds = [0, 1]",
                                      "seeds = [0, 1]\ntarget = 0.5\nbaselines = []"))
    c = spec.cells()  # (fedit, seed 0), (fedit, seed 1), (fedit+adam, 0), (fedit+adam, 1)
    fake_cell(tmp_path, c[0], [0.2, 0.4, 0.6])
    fake_cell(tmp_path, c[1], [0.2, 0.5, 0.8])
    fake_cell(tmp_path, c[2], [0.2, 0.3, 0.4])
    fake_cell(tmp_path, c[3], [0.2], status="failed", error="RunFailed: boom\nmore")
    result = report.write(spec, tmp_path)
    with (tmp_path / "runs.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 + 3 + 3 + 1 == result["rows"]  # one row per cell × round
    assert set(report.FIRST_COLUMNS) <= set(rows[0]) and "agg_error_mean" in rows[0]
    summary = (tmp_path / "summary.md").read_text()
    # final accuracy mean ± sample std over the two seeds: 0.7 ± 0.1414; target 0.5 at rounds 2, 1
    assert "| fedit | 0.7000 ± 0.1414 (n=2) | 1.5 | 0.00 | 0.00 | 1.00e-01 | 10 |" in summary
    assert "| fedit+adam | 0.4000 (n=1) | not reached (1/1) |" in summary
    assert "## Failed cells" in summary and "RunFailed: boom" in summary
    for name in ("metric_vs_round.png", "metric_vs_bytes.png", "agg_error_vs_round.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_rounds_to_target_for_losses_counts_down():
    recs = [{"round": 0, "eval_loss": 2.0}, {"round": 1, "eval_loss": 1.2},
            {"round": 2, "eval_loss": 0.9}]
    assert report.rounds_to_target(recs, "eval_loss", 1.0, higher_is_better=False) == 2
    assert report.rounds_to_target(recs, "eval_loss", 0.5, higher_is_better=False) is None


# ------------------------------------------------------------------------- end to end (CLI)


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlora", "experiment", *args],
                          capture_output=True, text=True, timeout=timeout)


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


TRACKED = _have("mlflow") and _have("tensorboard")  # the extras fedlora[mlflow,tensorboard]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "out"
    trackers = ["--tracker", "mlflow", "--tracker", "tensorboard"] if TRACKED else []
    res = cli(str(SMOKE), "--out", str(out), *trackers)
    return out, res


@pytest.mark.slow  # a real sweep: four federated runs in process (make test-fast skips it)
@pytest.mark.skipif(not TRACKED, reason="needs the extras fedlora[mlflow] and [tensorboard]")
def test_smoke_experiment_is_tracked_in_mlflow_and_tensorboard(smoke_run):
    """The real sweep's cells and baselines, read back from the MLflow file store and the
    TensorBoard event files: one run per cell under the sweep, a metric point per round."""
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.7 refuses it else
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, res = smoke_run
    assert res.returncode == 0, res.stderr[-3000:]
    spec = experiment.load_spec(SMOKE)
    rounds = spec.base["num-server-rounds"]
    mlflow.set_tracking_uri(f"file:{out / 'mlruns'}")
    runs = mlflow.search_runs(experiment_names=[spec.name])
    cells = runs[runs["tags.fedlora.kind"] == "federated"]
    assert set(cells["tags.mlflow.runName"]) == {c.id for c in spec.cells()}
    assert set(cells["status"]) == {"FINISHED"}
    assert len(runs[runs["tags.fedlora.kind"] == "baseline"]) == len(spec.baselines)
    client = mlflow.tracking.MlflowClient(f"file:{out / 'mlruns'}")
    for run_id in cells["run_id"]:
        steps = sorted(m.step for m in client.get_metric_history(run_id, "eval_accuracy"))
        assert steps == list(range(rounds + 1))
        assert [a.path for a in client.list_artifacts(run_id)] == ["adapter"]
    for cell in spec.cells():
        acc = EventAccumulator(str(out / "tensorboard" / cell.id))
        acc.Reload()
        assert [e.step for e in acc.Scalars("eval_accuracy")] == list(range(rounds + 1))


@pytest.mark.slow  # a real sweep: four federated runs in process (make test-fast skips it)
def test_smoke_experiment_end_to_end(smoke_run):
    out, res = smoke_run
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    spec = experiment.load_spec(SMOKE)
    with (out / "runs.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    rounds = spec.base["num-server-rounds"]
    fed = [r for r in rows if r["kind"] == "federated"]
    assert len(fed) == len(spec.cells()) * (rounds + 1)  # one row per cell × round (+ round 0)
    assert {r["label"] for r in fed} == {"fedit", "ffa"}
    assert {"round", "eval_accuracy", "eval_loss", "bytes_up", "bytes_down", "agg_error_mean",
            "train_loss", "num_accepted"} <= set(rows[0])
    assert {r["label"] for r in rows if r["kind"] == "baseline"} == {
        "centralized (baseline)", "local (baseline)"}
    summary = (out / "summary.md").read_text()
    assert "| strategy | final eval_accuracy |" in summary
    for label in ("fedit", "ffa", "*centralized (baseline)*", "*local (baseline)*"):
        assert f"| {label} | " in summary
    for name in ("metric_vs_round.png", "metric_vs_bytes.png", "agg_error_vs_round.png"):
        assert (out / name).stat().st_size > 10_000
    # identical data split and initial model across strategies: same round-0 evaluation
    zero = {r["label"]: r["eval_loss"] for r in rows if r["round"] == "0"}
    assert len(set(zero.values())) == 1


@pytest.mark.slow  # a real sweep (shared with the tests above) (make test-fast skips it)
def test_resume_skips_finished_cells_and_a_rerun_needs_resume(smoke_run):
    out, res = smoke_run
    assert res.returncode == 0
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/cell.json")}
    again = cli(str(SMOKE), "--out", str(out), timeout=120)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = cli(str(SMOKE), "--out", str(out), "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing ran again


@pytest.mark.slow  # its other cell is a real federated run (make test-fast skips it)
def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path):
    """fedit with mixed ranks fails its preflight; the report lists it with the reason."""
    spec_file = tmp_path / "bad.toml"
    spec_file.write_text(SMOKE.read_text().replace(
        'baselines = ["centralized", "local"]', "baselines = []").replace(
        '[[strategies]]\nlabel = "ffa"\nstrategy = "ffa"\n',
        '[[strategies]]\nlabel = "mixed"\nstrategy = "fedit"\nrank-by-partition = "2,4"\n'))
    res = cli(str(spec_file), "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-2000:]
    status = json.loads((tmp_path / "out" / "cells" / "iid--mixed--seed0" / "cell.json")
                        .read_text())
    assert status["status"] == "failed" and "needs equal LoRA ranks" in status["error"]
    ok = json.loads((tmp_path / "out" / "cells" / "iid--fedit--seed0" / "cell.json").read_text())
    assert ok["status"] == "done"
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| mixed | failed: strategy 'fedit' needs equal LoRA ranks" in summary


def test_cell_directory_names_spell_greek_letters_out():
    assert experiment.slug("central σ=0.1") == "central-sigma=0.1"
    assert experiment.slug("Dirichlet α = 0.3") == "dirichlet-alpha-=-0.3"
    assert experiment.slug("fedit+fedadam (lr 1e-3)") == "fedit+fedadam-lr-1e-3"
    assert experiment.slug("σ") != experiment.slug("τ")


def test_hetero_sampled_spec_is_the_realistic_mixed_rank_regime():
    """≥ 30 clients in rank tiers {4, 8, 16}, Dirichlet α = 0.3, 10–20 % sampled, ≥ 20 rounds,
    ≥ 5 seeds; every rule that accepts mixed ranks except the Byzantine `robust` (compared in
    robustness.toml), FedIT at equal r = 8 as the reference, both baselines."""
    from fedlora.aggregation import available_strategies, strategy_info

    spec = experiment.load_spec(ROOT / "simulations" / "experiments" / "hetero-sampled.toml")
    (setting,) = spec.settings
    flat, clients = spec.flat_config(setting, None, 0, Path("/tmp"))
    cfg = config.from_flat(flat)
    assert clients >= 30 and set(cfg.fl.ranks()) == {4, 8, 16}
    assert flat["data.partitioner"] == "dirichlet" and flat["data.dirichlet-alpha"] == 0.3
    assert 0.10 <= cfg.fl.clients_per_round(clients) / clients <= 0.20
    assert flat["num-server-rounds"] >= 20 and len(spec.seeds) >= 5
    mixed = {n for n in available_strategies() if not strategy_info(n).equal_ranks}
    rules = {s.keys["strategy"] for s in spec.strategies if s.label != spec.reference}
    assert rules == mixed - {"robust"}
    ref = next(s for s in spec.strategies if s.label == spec.reference)
    assert ref.keys == {"strategy": "fedit", "rank-by-partition": "", "lora.r": 8}
    assert set(spec.baselines) == {"centralized", "local"}


def test_non_iid_spec_runs_five_seeds_of_the_equal_rank_claims():
    spec = experiment.load_spec(ROOT / "simulations" / "experiments" / "non-iid.toml")
    assert len(spec.seeds) >= 5 and spec.reference == "fedit"
    assert {"ffa", "fedex", "fedsvd", "lora-fair"} <= {s.keys["strategy"]
                                                       for s in spec.strategies}


def test_chatterbot_peft_spec_crosses_lora_dora_pissa_with_fedit_and_flexlora():
    """LoRA, DoRA and PiSSA under FedIT and FlexLoRA at one rank, 3 seeds, against LoRA +
    FedIT, with both shipped lm-eval tasks; DoRA × FlexLoRA is left out because the config
    refuses it (FlexLoRA re-factorises ΔW by SVD, changing the norm DoRA trained against)."""
    path = ROOT / "simulations" / "experiments" / "chatterbot-peft.toml"
    spec = experiment.load_spec(path)
    variant = {s.label: (s.keys["strategy"], s.keys.get("lora.use-dora", False),
                         s.keys.get("lora.init", "default")) for s in spec.strategies}
    assert variant == {"lora fedit": ("fedit", False, "default"),
                       "dora fedit": ("fedit", True, "default"),
                       "pissa fedit": ("fedit", False, "pissa"),
                       "lora flexlora": ("flexlora", False, "default"),
                       "pissa flexlora": ("flexlora", False, "pissa")}
    assert spec.reference == "lora fedit" and spec.seeds == [0, 1, 2]
    assert spec.metric == "eval_loss" and not spec.higher_is_better
    flat, _ = spec.flat_config(spec.settings[0], spec.strategies[0], 0, Path("/tmp"))
    cfg = config.from_flat(flat)
    assert set(cfg.eval.task_list()) == {"fedlora-chatterbot-qa", "fedlora-bbc-topic"}
    assert cfg.eval.tasks_limit > 0 and not cfg.fl.ranks()  # every client at lora.r
    dora_flex = path.read_text().replace('label = "pissa flexlora"\nstrategy = "flexlora"\n'
                                         'lora.init = "pissa"',
                                         'label = "dora flexlora"\nstrategy = "flexlora"\n'
                                         'lora.use-dora = true')
    with pytest.raises(SpecError, match="use-dora: strategy 'flexlora'"):
        parse_spec(dora_flex, path)
