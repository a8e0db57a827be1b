"""Runs an experiment: every cell (setting × strategy × seed) as a real federated run (in this
process, or on Flower's simulation engine: the spec's ``engine``) and the baselines, into
``OUT``, rewriting the report after each cell (:mod:`fedlora.experiments.report`).

The spec itself (parsing, cells, status files) is :mod:`fedlora.experiments.sweep`; this module is
the
one that both runs and reports, so that the report, which reads specs, never imports the runner.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlora import config
from fedlora.errors import FedLoraError
from fedlora.experiments import baselines, report
from fedlora.experiments.sweep import Arm, Cell, Spec, SpecError, cell_status, slug
from fedlora.runtime import run_setup


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)



class Runner:
    """Runs a spec's cells and baselines into ``out``; the report is rewritten after each."""

    def __init__(self, spec: Spec, out: Path, resume: bool = False,
                 progress: Callable[[str, dict[str, Any]], None] | None = None,
                 trackers: Any = None, share_superlink: bool = True) -> None:
        """``trackers``: a :class:`fedlora.experiments.trackers.Trackers`; every cell and baseline
        is a
        tracked run (config as params, each metrics record as it arrives, the adapter).

        ``share_superlink`` (``engine = "simulation"`` only): submit every cell to one SuperLink
        per sweep (:class:`fedlora.runtime.launcher.SharedSuperLink`, home ``OUT/.flwr``)
        instead of starting one per cell; each cell still runs in its own simulation process
        and output directory."""
        from fedlora.experiments.trackers import Trackers

        self.spec, self.out, self.resume = spec, out, resume
        self.share_superlink = share_superlink
        self.shared: Any = None  # the sweep's SharedSuperLink while run() runs
        self.cells_started = 0  # in-process cells get run ids 1, 2, ... (as Flower numbers runs)
        self.baselines_run = 0  # baseline runs finished by this invocation (timing.json)
        self.after_run: Callable[[], None] = lambda: None  # run() sets it: rewrite timing.json
        self.progress = progress or (lambda event, info: None)
        self.trackers = trackers if trackers is not None else Trackers()

    def prepare(self) -> None:
        """Create the output directory with ``spec.toml`` (and ``overrides.json`` for changed
        seeds); raise :class:`SpecError` if it holds results and ``resume`` is off.
        """
        cells_dir = self.out / "cells"
        if cells_dir.exists() and any(cells_dir.iterdir()) and not self.resume:
            raise SpecError(f"{self.out} already holds results of an experiment; pass --resume "
                            f"to continue it (finished cells are skipped) or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "spec.toml").write_text(self.spec.path.read_text() if self.spec.path
                                            else json.dumps(self.spec.raw))
        overrides = self.out / "overrides.json"
        if self.spec.seeds != self.spec.raw.get("seeds", [0]):
            _write_json(overrides, {"seeds": self.spec.seeds})
        else:
            overrides.unlink(missing_ok=True)

    def pending(self) -> list[Cell]:
        """The cells whose ``cell.json`` does not say ``done`` (all in a fresh directory)."""
        return [c for c in self.spec.cells()
                if (cell_status(self.out / "cells" / c.id) or {}).get("status") != "done"]

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        """Run one cell on the spec's engine into ``cells/<id>/``, logging it to the trackers;
        its status (``done`` or ``failed`` with the error, and ``wall_s``), also in ``cell.json``.
        """
        from fedlora.experiments.engine import CellFailed, run_in_process
        from fedlora.runtime.launcher import Placement, RunFailed, run_simulation

        directory = self.out / "cells" / cell.id
        if directory.exists():  # a failed or interrupted attempt: start the cell afresh
            for stale in ("metrics.jsonl", "cell.json"):
                (directory / stale).unlink(missing_ok=True)
        directory.mkdir(parents=True, exist_ok=True)
        status: dict[str, Any] = {"cell": cell.id, "setting": cell.setting.label,
                                  "strategy": cell.strategy.label, "seed": cell.seed,
                                  "engine": self.spec.engine}
        started = time.perf_counter()
        try:
            flat, clients = self.spec.flat_config(cell.setting, cell.strategy, cell.seed,
                                                  directory)
            run_setup.finalize(flat, clients)
            run_config = run_setup.write_run_config(flat, directory)
            status["num_clients"] = clients
            self.trackers.start(cell.id, flat, {"kind": "federated", "setting": cell.setting.label,
                                                "strategy": cell.strategy.label,
                                                "seed": str(cell.seed)})

            def on_round(rec: dict[str, Any]) -> None:
                self.trackers.log(rec)
                self.progress("round", {"cell": cell, "record": rec})

            if self.spec.engine == "inprocess":
                self.cells_started += 1
                run_in_process(run_config, directory, clients, on_round=on_round,
                               run_id=self.cells_started,
                               threads=Placement(self.spec.cpus_per_client).cpus)
            else:
                run_simulation(run_config, directory, clients,
                               Placement(self.spec.cpus_per_client), directory / ".flwr",
                               on_round=on_round, shared=self.shared)
            status["status"] = "done"
            self.trackers.artifact(directory / "adapter")
        except (FedLoraError, RunFailed, CellFailed) as exc:
            status.update(status="failed", error=str(exc))
        self.trackers.end(status["status"])
        status["wall_s"] = round(time.perf_counter() - started, 2)
        _write_json(directory / "cell.json", status)
        return status

    def run_baselines(self, setting: Arm, seed: int) -> None:
        """Run the spec's baselines (e.g. central, local) of ``setting`` and ``seed`` that are not
        done yet, into ``baselines/<setting>--seed<seed>/<kind>/``.
        """
        directory = self.out / "baselines" / f"{slug(setting.label)}--seed{seed}"
        for kind in self.spec.baselines:
            target = directory / kind
            if (cell_status(target) or {}).get("status") == "done":
                continue
            target.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            status: dict[str, Any] = {"baseline": kind, "setting": setting.label, "seed": seed}
            try:
                flat, clients = self.spec.flat_config(setting, None, seed, target)
                self.trackers.start(f"{directory.name}--{kind}", flat, {
                    "kind": "baseline", "setting": setting.label, "strategy": kind,
                    "seed": str(seed)})

                def on_round(rec: dict[str, Any], k: str = kind) -> None:
                    self.trackers.log(rec)
                    self.progress("baseline-round", {"kind": k, "record": rec})

                records = baselines.run(kind, config.from_flat(flat), clients, target,
                                        on_round=on_round)
                status.update(status="done", rounds=len(records) - 1)
            except FedLoraError as exc:
                status.update(status="failed", error=str(exc))
            self.trackers.end(status["status"])
            status["wall_s"] = round(time.perf_counter() - started, 2)
            _write_json(target / "cell.json", status)
            self.baselines_run += 1
            self.after_run()

    def run(self) -> list[dict[str, Any]]:
        """Run every pending cell and the baselines of its setting and seed, rewriting the report
        and ``timing.json`` after each; the statuses of the cells run.
        """
        started = time.perf_counter()
        reporting = 0.0

        from fedlora.runtime.launcher import Placement, SharedSuperLink

        results: list[dict[str, Any]] = []

        def timing(complete: bool) -> dict[str, Any]:
            return {"wall_s": round(time.perf_counter() - started, 2),
                    "report_s": round(reporting, 2), "cells_run": len(results),
                    "baselines_run": self.baselines_run,
                    "engine": self.spec.engine,
                    "superlinks_started": (0 if self.spec.engine == "inprocess" else
                                           self.shared.starts if self.shared else len(results)),
                    "fresh": fresh, "complete": complete}

        def save_timing() -> None:
            if fresh:  # a sweep cut short still reports the overhead of what it ran
                _write_json(self.out / "timing.json", timing(False))

        def write_report() -> None:
            nonlocal reporting
            save_timing()
            began = time.perf_counter()
            report.write(self.spec, self.out)
            reporting += time.perf_counter() - began

        fresh = not (self.out / "cells").is_dir() and not (self.out / "baselines").is_dir()
        if not fresh:
            (self.out / "timing.json").unlink(missing_ok=True)  # it timed another invocation
        self.prepare()
        self.after_run = save_timing  # after every baseline run too, not only after cells
        todo = self.pending()
        self.progress("start", {"cells": todo, "total": len(self.spec.cells())})
        if self.share_superlink and self.spec.engine == "simulation":
            self.shared = SharedSuperLink(self.out / ".flwr", Placement(self.spec.cpus_per_client))
        try:
            for setting in self.spec.settings:
                # seed by seed, and the baselines after the setting's cells: a sweep cut short
                # holds whole seeds of the compared rules, which the paired statistics need
                # (a local baseline of many clients evaluates every client every round: slow)
                for seed in self.spec.seeds:
                    for cell in [c for c in todo if c.setting == setting and c.seed == seed]:
                        self.progress("cell-start", {"cell": cell})
                        status = self.run_cell(cell)
                        results.append(status)
                        self.progress("cell-end", {"cell": cell, "status": status})
                        write_report()
                for seed in self.spec.seeds:
                    self.progress("baselines", {"setting": setting.label, "seed": seed})
                    self.run_baselines(setting, seed)
                write_report()
        finally:
            if self.shared:
                self.shared.stop()
        write_report()
        self.trackers.close()
        _write_json(self.out / "timing.json", timing(True))
        self.shared = None
        report.write(self.spec, self.out, plots=False)  # summary.md with the overhead section
        return results

