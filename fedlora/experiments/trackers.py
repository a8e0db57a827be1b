"""Experiment trackers: every ``metrics.jsonl`` record to MLflow or TensorBoard as it arrives.

``--tracker mlflow`` (extra ``fedlora[mlflow]``) writes an MLflow **file store**
(``file:<dir>``; default ``OUT/mlruns``): one MLflow experiment per sweep (or per ``fedlora run``)
with a parent run for the sweep (tag ``fedlora.kind = sweep``) and one nested run per cell and
baseline (tags ``mlflow.parentRunId``, ``fedlora.kind``, ``fedlora.setting``,
``fedlora.strategy``, ``fedlora.seed``), the cell's flat config as params, every numeric value
of every record as a metric at ``step = round`` (nested dicts such as ``agg_error`` per module
as ``agg_error/<module>``), and the final adapter directory as the artifact ``adapter/``.
MLflow ≥ 3.7 refuses the file store unless ``MLFLOW_ALLOW_FILE_STORE=true``; this module sets
that (and ``MLFLOW_DISABLE_TELEMETRY=true``) unless the environment already says otherwise, so
nothing is sent anywhere and no server is started. Read it back with
``mlflow.search_runs(experiment_names=[...])`` after ``mlflow.set_tracking_uri("file:...")``.

``--tracker tensorboard`` (extra ``fedlora[tensorboard]``) writes event files with
``torch.utils.tensorboard.SummaryWriter`` into ``<dir>/<cell>/`` (default ``OUT/tensorboard``):
scalars per record key at ``step = round``, the config as a text summary and the adapter's path
as text (TensorBoard has no artifact store). ``tensorboard --logdir OUT/tensorboard`` shows them.

A tracker that fails (library missing, disk full, a bug) never stops the run: the first error
of each tracker is reported once as a :class:`TrackerWarning` and that tracker is switched off.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedlora.errors import FedLoraError

TRACKERS = ("mlflow", "tensorboard")


class TrackerWarning(UserWarning):
    """A tracker failed; the run goes on without it."""


def _numbers(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The record's finite numbers, nested dicts flattened with ``/`` (bools as 0/1)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "round":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_numbers(value, f"{name}/"))
        elif isinstance(value, int | float) and math.isfinite(value):
            out[name] = float(value)
    return out


class MlflowTracker:
    """One MLflow experiment per sweep, a parent run for it, a nested run per cell."""

    name = "mlflow"

    def __init__(self, directory: Path, experiment: str) -> None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        directory.mkdir(parents=True, exist_ok=True)
        self.uri = f"file:{directory.resolve()}"
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (found.experiment_id if found
                              else self.client.create_experiment(experiment))
        self.parent = self.client.create_run(self.experiment_id, run_name=experiment,
                                             tags={"fedlora.kind": "sweep"}).info.run_id
        self.run_id: str | None = None

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        """Open a nested run ``run_name`` under the sweep's parent run, with ``tags`` (prefixed
        ``fedlora.``) and ``params`` (the flat config, values cut to 6000 characters).
        """
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
            "mlflow.parentRunId": self.parent, **{f"fedlora.{k}": str(v) for k, v in tags.items()}})
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, record: Mapping[str, Any]) -> None:
        """Log every finite number of ``record`` as a metric at ``step = record["round"]``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record.get("round", 0))
        metrics = [Metric(k, v, now, step) for k, v in _numbers(record).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def artifact(self, path: Path) -> None:
        """Log the directory ``path`` (the final adapter) as an artifact of the current run."""
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)

    def end(self, status: str) -> None:
        """Terminate the current run, FINISHED when ``status`` is ``"done"`` else FAILED."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FINISHED" if status == "done" else "FAILED")
            self.run_id = None

    def close(self) -> None:
        """Terminate the sweep's parent run (FINISHED)."""
        self.client.set_terminated(self.parent, "FINISHED")


class TensorBoardTracker:
    """Event files per cell under one log directory."""

    name = "tensorboard"

    def __init__(self, directory: Path, experiment: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer_cls = SummaryWriter
        self.directory = directory
        self.experiment = experiment
        self.writer: Any = None

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        """Open an event-file writer in ``<dir>/<run_name>``; write ``params`` as a Markdown
        table and ``tags`` as text.
        """
        self.writer = self._writer_cls(log_dir=str(self.directory / run_name))
        table = "| key | value |\n|---|---|\n" + "".join(
            f"| {k} | {v} |\n" for k, v in sorted(params.items()))
        self.writer.add_text("config", table, 0)
        if tags:
            self.writer.add_text("tags", ", ".join(f"{k}={v}" for k, v in tags.items()), 0)

    def log(self, record: Mapping[str, Any]) -> None:
        """Write every finite number of ``record`` as a scalar at ``step = record["round"]``."""
        step = int(record.get("round", 0))
        for key, value in _numbers(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def artifact(self, path: Path) -> None:
        """Record the absolute path of ``path`` as text (TensorBoard has no artifact store)."""
        if path.exists():
            self.writer.add_text("adapter", str(path.resolve()), 0)

    def end(self, status: str) -> None:
        """Write ``status`` as text and close the current run's writer."""
        if self.writer is not None:
            self.writer.add_text("status", status, 0)
            self.writer.close()
            self.writer = None

    def close(self) -> None:
        """End a run still open, with status ``"closed"``."""
        if self.writer is not None:
            self.end("closed")


class Safe:
    """Wraps a tracker: its first failure warns once, then it is switched off."""

    def __init__(self, name: str, factory: Any) -> None:
        self.name = name
        self.tracker: Any = None
        self.failed = False
        self._call(lambda: setattr(self, "tracker", factory()), "start")

    def _call(self, fn: Any, what: str) -> None:
        if self.failed:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 — a tracker never stops the run
            self.failed = True
            warnings.warn(f"tracker {self.name!r} failed ({what}: {type(exc).__name__}: "
                          f"{exc}); the run goes on without it", TrackerWarning, stacklevel=3)

    def start(self, run_name: str, params: Mapping[str, Any],
              tags: Mapping[str, str] | None = None) -> None:
        """Start a run on the wrapped tracker (no ``tags``: none), unless it failed before."""
        self._call(lambda: self.tracker.start(run_name, params, tags or {}), "start run")

    def log(self, record: Mapping[str, Any]) -> None:
        """Log ``record`` on the wrapped tracker, unless it failed before."""
        self._call(lambda: self.tracker.log(record), "log")

    def artifact(self, path: Path) -> None:
        """Log ``path`` as an artifact on the wrapped tracker, unless it failed before."""
        self._call(lambda: self.tracker.artifact(path), "artifact")

    def end(self, status: str) -> None:
        """End the run on the wrapped tracker with ``status``, unless it failed before."""
        self._call(lambda: self.tracker.end(status), "end run")

    def close(self) -> None:
        """Close the wrapped tracker, unless it failed before."""
        self._call(lambda: self.tracker.close(), "close")


class Trackers:
    """All requested trackers as one; each call goes to every tracker that still works."""

    def __init__(self, trackers: Iterable[Safe] = ()) -> None:
        self.items = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.items)

    def start(self, run_name: str, params: Mapping[str, Any],
              tags: Mapping[str, str] | None = None) -> None:
        """Start a run ``run_name`` with ``params`` and ``tags`` on every tracker."""
        for t in self.items:
            t.start(run_name, params, tags)

    def log(self, record: Mapping[str, Any]) -> None:
        """Log one ``metrics.jsonl`` record on every tracker."""
        for t in self.items:
            t.log(record)

    def artifact(self, path: Path) -> None:
        """Log ``path`` (the final adapter directory) on every tracker."""
        for t in self.items:
            t.artifact(path)

    def end(self, status: str) -> None:
        """End the current run on every tracker (``status``: ``"done"`` or why it stopped)."""
        for t in self.items:
            t.end(status)

    def close(self) -> None:
        """Close every tracker (the sweep is over)."""
        for t in self.items:
            t.close()


def make(names: Iterable[str] | None, out: Path, experiment: str,
         directory: str | Path | None = None) -> Trackers:
    """The trackers ``names`` (each of :data:`TRACKERS`) writing under ``directory`` (default
    ``out/mlruns`` and ``out/tensorboard``)."""
    items = []
    for name in dict.fromkeys(names or []):
        if name not in TRACKERS:
            raise FedLoraError(f"unknown tracker {name!r}; available: {', '.join(TRACKERS)}")
        base = Path(directory) / name if directory else out / (
            "mlruns" if name == "mlflow" else "tensorboard")
        cls = MlflowTracker if name == "mlflow" else TensorBoardTracker
        items.append(Safe(name, lambda cls=cls, base=base: cls(base, experiment)))
    return Trackers(items)
