"""One SuperLink per sweep: cells submitted to it in turn give the results a private SuperLink
per cell gives, and a SuperLink that a cell took down is replaced for the next cell."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest

from fedlora.errors import FedLoraError
from fedlora.experiments import runner as experiment_runner
from fedlora.experiments import sweep as experiment
from fedlora.runtime.launcher import Placement, SharedSuperLink, run_simulation

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "simulations" / "experiments" / "smoke.toml"
TIMING_KEYS = ("_s", "time", "rss", "cpu")  # clocks and memory differ between any two runs


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.slow  # starts real SuperLinks (make test-fast skips it)
def test_a_shared_superlink_is_reused_and_replaced_once_it_has_exited(tmp_path):
    with SharedSuperLink(tmp_path / ".flwr", Placement()) as shared:
        first = shared.link()
        assert shared.link() is first and shared.starts == 1
        assert f"127.0.0.1:{first.port}" in (tmp_path / ".flwr" / "config.toml").read_text()
        first.stop()  # what a cell that kills the SuperLink leaves behind
        second = shared.link()
        assert second is not first and shared.starts == 2 and _listening(second.port)
        assert f"127.0.0.1:{second.port}" in (tmp_path / ".flwr" / "config.toml").read_text()
    assert second.process.poll() is not None  # the context stops it


def test_a_run_with_other_placement_is_refused_by_a_shared_superlink(tmp_path):
    shared = SharedSuperLink(tmp_path / ".flwr", Placement(cpus=1))
    with pytest.raises(FedLoraError, match="shared SuperLink runs its clients with"):
        run_simulation(tmp_path / "run-config.toml", tmp_path, 2, Placement(cpus=2),
                       tmp_path / "home", shared=shared)
    assert shared.starts == 0  # refused before anything started


def _numbers(cell: Path) -> list[dict]:
    records = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING_KEYS)}
            for r in records]


def _digest(cell: Path) -> str:
    return hashlib.sha256((cell / "adapter" / "adapter_model.safetensors").read_bytes()
                          ).hexdigest()


@pytest.mark.slow  # three real Flower simulations
def test_a_cell_on_the_sweeps_superlink_equals_the_cell_on_its_own(tmp_path):
    """ffa run second on a SuperLink that already ran fedit, against ffa with a private
    SuperLink: the same metrics numbers every round and the same adapter bytes."""
    text = SMOKE.read_text().replace('baselines = ["centralized", "local"]',
                                     'baselines = []\nengine = "simulation"')
    both = tmp_path / "both.toml"
    both.write_text(text)
    alone = tmp_path / "alone.toml"
    alone.write_text(text.replace('reference = "fedit"', 'reference = "ffa"').replace(
        '[[strategies]]\nlabel = "fedit"\nstrategy = "fedit"\n', ""))
    old = experiment_runner.Runner(experiment.load_spec(alone), tmp_path / "old",
                            share_superlink=False)
    new = experiment_runner.Runner(experiment.load_spec(both), tmp_path / "new")
    assert [s["status"] for s in old.run()] == ["done"]
    assert [s["status"] for s in new.run()] == ["done", "done"]
    assert json.loads((tmp_path / "new" / "timing.json").read_text())["superlinks_started"] == 1
    cell = "cells/iid--ffa--seed0"
    assert _numbers(tmp_path / "new" / cell) == _numbers(tmp_path / "old" / cell)
    assert _digest(tmp_path / "new" / cell) == _digest(tmp_path / "old" / cell)
