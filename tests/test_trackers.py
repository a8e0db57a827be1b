"""MLflow and TensorBoard trackers, read back with the real libraries; failures only warn."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from fedlora.experiments import runner as experiment_runner
from fedlora.experiments import trackers
from fedlora.experiments.sweep import parse_spec

# engine = simulation: these tests fake the cells at that engine's entry point (run_simulation)
SPEC = """
name = "tracked"
preset = "bbc-minilm"
seeds = [0, 1]
baselines = []
engine = "simulation"
[base]
num-clients = 2
num-server-rounds = 3
[[strategies]]
strategy = "fedit"
[[strategies]]
strategy = "ffa"
"""

RECORDS = [{"round": r, "strategy": "fedit", "eval_accuracy": 0.2 + 0.2 * r,
            "bytes_up": 1000 * r, "agg_error": {"layer.q": 0.1 / (r + 1)}, "rejected": {}}
           for r in range(4)]


def fake_simulation(seen: list[tuple[str, int]], check=None):
    """Stands in for launcher.run_simulation: writes metrics.jsonl and an adapter, calls
    ``on_round`` per record (``check`` runs right after each, to see what was logged)."""

    def run(run_config, directory, clients, placement, home, on_round=None, shared=None):
        (directory / "adapter").mkdir(exist_ok=True)
        (directory / "adapter" / "adapter_config.json").write_text('{"r": 8}')
        records = []
        with (directory / "metrics.jsonl").open("w") as fh:
            for rec in RECORDS:
                fh.write(json.dumps(rec) + "\n")
                records.append(rec)
                on_round(rec)
                seen.append((directory.name, rec["round"]))
                if check:
                    check(directory.name, rec["round"])
        return records

    return run


def mlflow_runs(uri: str, name: str):
    mlflow = pytest.importorskip("mlflow")
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[name])


def test_mlflow_logs_each_cell_as_it_arrives_grouped_under_the_sweep(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from fedlora.runtime import launcher

    spec = parse_spec(SPEC)
    out = tmp_path / "out"
    tracked = trackers.make(["mlflow"], out, spec.name)
    client = MlflowClient(tracking_uri=f"file:{out / 'mlruns'}")
    lags = []

    def check(cell: str, round_: int) -> None:  # the record is in the store already
        run_id = tracked.items[0].tracker.run_id
        steps = [m.step for m in client.get_metric_history(run_id, "eval_accuracy")]
        lags.append(round_ in steps)

    monkeypatch.setattr(launcher, "run_simulation", fake_simulation([], check))
    experiment_runner.Runner(spec, out, trackers=tracked).run()
    assert lags and all(lags)
    runs = mlflow_runs(f"file:{out / 'mlruns'}", spec.name)
    parent = runs[runs["tags.fedlora.kind"] == "sweep"]
    cells = runs[runs["tags.fedlora.kind"] == "federated"]
    assert len(parent) == 1 and len(cells) == len(spec.cells()) == 4
    assert set(cells["tags.mlflow.parentRunId"]) == {parent["run_id"].iloc[0]}
    assert set(cells["tags.mlflow.runName"]) == {c.id for c in spec.cells()}
    assert set(cells["status"]) == {"FINISHED"}
    assert list(cells["metrics.eval_accuracy"]) == pytest.approx([0.8] * 4)  # the last value
    assert set(cells["params.strategy"]) == {"fedit", "ffa"}
    assert set(cells["params.seed"]) == {"0", "1"}
    one = cells["run_id"].iloc[0]
    history = client.get_metric_history(one, "eval_accuracy")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [
        (r, round(0.2 + 0.2 * r, 6)) for r in range(4)]
    assert [m.step for m in client.get_metric_history(one, "agg_error/layer.q")] == [0, 1, 2, 3]
    artifacts = [a.path for a in client.list_artifacts(one, "adapter")]
    assert artifacts == ["adapter/adapter_config.json"]


def test_tensorboard_scalars_per_cell_read_back_with_event_accumulator(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedlora.runtime import launcher

    spec = parse_spec(SPEC)
    out = tmp_path / "out"
    monkeypatch.setattr(launcher, "run_simulation", fake_simulation([]))
    tracked = trackers.make(["tensorboard"], out, spec.name)
    experiment_runner.Runner(spec, out, trackers=tracked).run()
    logdirs = sorted(p.name for p in (out / "tensorboard").iterdir())
    assert logdirs == sorted(c.id for c in spec.cells())
    acc = EventAccumulator(str(out / "tensorboard" / logdirs[0]),
                           size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"eval_accuracy", "bytes_up", "agg_error/layer.q"} <= set(scalars)
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("eval_accuracy")] == [
        (r, round(0.2 + 0.2 * r, 6)) for r in range(4)]
    texts = set(acc.Tags()["tensors"])
    assert {"config/text_summary", "adapter/text_summary"} <= texts
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| strategy | " in config_text and "| num-server-rounds | 3 |" in config_text


class Broken:
    """A tracker whose every log fails (e.g. its disk is full)."""

    def __init__(self) -> None:
        self.calls = 0

    def start(self, *args):
        pass

    def log(self, record):
        self.calls += 1
        raise OSError("No space left on device")

    def artifact(self, path):
        pass

    def end(self, status):
        pass

    def close(self):
        pass


def test_a_failing_tracker_warns_once_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from fedlora.runtime import launcher

    spec = parse_spec(SPEC)
    out = tmp_path / "out"
    broken = Broken()
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(launcher, "run_simulation", fake_simulation(seen))
    tracked = trackers.Trackers([trackers.Safe("broken", lambda: broken)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = experiment_runner.Runner(spec, out, trackers=tracked).run()
    mine = [w for w in caught if issubclass(w.category, trackers.TrackerWarning)]
    assert len(mine) == 1
    assert "'broken' failed (log: OSError: No space left on device)" in str(mine[0].message)
    assert "goes on without it" in str(mine[0].message)
    assert broken.calls == 1  # switched off after its first failure
    assert [r["status"] for r in results] == ["done"] * 4
    assert len(seen) == 4 * len(RECORDS)
    assert (out / "summary.md").exists()


def test_a_tracker_whose_library_is_missing_warns_once(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ModuleNotFoundError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.warns(trackers.TrackerWarning, match="No module named 'mlflow'") as caught:
        tracked = trackers.make(["mlflow"], tmp_path, "x")
        tracked.start("cell", {"a": 1})
        tracked.log({"round": 1, "eval_accuracy": 0.5})
        tracked.end("done")
        tracked.close()
    assert len([w for w in caught if issubclass(w.category, trackers.TrackerWarning)]) == 1


def test_numbers_keep_finite_values_and_flatten_dicts():
    assert trackers._numbers({"round": 2, "a": 1, "b": float("nan"), "c": "x", "ok": True,
                              "d": {"m": 0.5, "n": {"k": 2}}}) == {
        "a": 1.0, "ok": 1.0, "d/m": 0.5, "d/n/k": 2.0}


def test_unknown_tracker_is_an_error(tmp_path):
    from fedlora.errors import FedLoraError

    with pytest.raises(FedLoraError, match="unknown tracker 'wandb'; available: mlflow"):
        trackers.make(["wandb"], Path(tmp_path), "x")


def test_run_and_experiment_accept_trackers_and_experiment_seeds():
    from fedlora.cli.main import build_parser

    parser = build_parser()
    run = parser.parse_args(["run", "--tracker", "mlflow", "--tracker", "tensorboard",
                             "--tracking-dir", "/tmp/t"])
    assert run.tracker == ["mlflow", "tensorboard"] and run.tracking_dir == "/tmp/t"
    exp = parser.parse_args(["experiment", "spec.toml", "--tracker", "mlflow", "--seeds", "5"])
    assert exp.tracker == ["mlflow"] and exp.seeds == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--tracker", "wandb"])
