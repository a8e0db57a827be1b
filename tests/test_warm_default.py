"""`fedlora launch` runs warm workers by default (on the Flower versions they were tested with):
the fallback outside that range, restarting a worker that exits, warm = cold bit for bit, and
a warm worker's memory over many rounds."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_deploy import TINY, WIDE, fedlora_cli
from test_simulation import our_processes

from fedlora.cli.deploy import add_commands
from fedlora.federation.outputs import read_metrics
from fedlora.runtime import deploy
from fedlora.runtime.reaper import Guarded
from fedlora.runtime.run_setup import WARM_TESTED_FLOWER


@pytest.mark.parametrize("version", ["1.41.0", "1.42.3"])
def test_launch_is_warm_by_default_on_the_tested_flower_versions(version):
    assert deploy.warm_setting(None, version) == (True, None)
    assert deploy.warm_setting(False, version) == (False, None)  # --cold


@pytest.mark.parametrize("version", ["1.40.0", "1.43.0", "2.0.1"])
def test_launch_falls_back_to_cold_outside_them_with_a_warning_naming_the_versions(version):
    warm, note = deploy.warm_setting(None, version)
    assert warm is False
    assert f"Flower {version}" in note and "1.41.x and 1.42.x" in note and "--warm" in note
    warm, note = deploy.warm_setting(True, version)  # --warm: warm anyway, warned
    assert warm is True and "1.41.x and 1.42.x" in note and "--cold" in note


def test_the_installed_flower_is_a_tested_one():
    """pyproject pins flwr to the tested range, so the default here is warm."""
    assert deploy.warm_setting(None)[0] is True
    assert ".".join(deploy.flower_version().split(".")[:2]) in WARM_TESTED_FLOWER


def test_launch_cli_maps_warm_cold_and_neither():
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    for argv, want in (([], None), (["--warm"], True), (["--cold"], False)):
        args = parser.parse_args(["launch", *argv])
        assert (True if args.warm else False if args.cold else None) is want
    with pytest.raises(SystemExit):
        parser.parse_args(["launch", "--warm", "--cold"])


def test_a_worker_that_exits_is_restarted_then_its_node_is_reported_lost(tmp_path, monkeypatch):
    """Real processes: node 0's worker exits at once every time; node 1's keeps running."""
    script = ("import os, sys, time\n"
              "if os.environ['NODE'] == '0': print('worker', os.getpid()); sys.exit(3)\n"
              "time.sleep(60)\n")
    monkeypatch.setattr(deploy.NodeSpec, "worker_command",
                        lambda self: [sys.executable, "-c", script])
    monkeypatch.setattr(deploy.NodeSpec, "worker_env",
                        lambda self, base: dict(base, NODE=str(self.index)))
    specs = [deploy.NodeSpec(index=i, num_nodes=2, port=0, home=tmp_path,
                             log_path=tmp_path / f"supernode-{i}.log", warm=True)
             for i in range(2)]
    processes = deploy.Processes()
    warnings: list[str] = []
    try:
        workers = deploy.Workers(specs, dict(os.environ), processes, max_restarts=2)
        lost = []
        deadline = time.monotonic() + 60
        while not lost and time.monotonic() < deadline:
            lost = workers.check(warnings.append)
            time.sleep(0.2)
        assert [gone.node for gone in lost] == ["supernode-0"]
        assert "exited 3 times (last status 3)" in lost[0].reason
        assert lost[0].log_path == tmp_path / "worker-0.log"
        assert len(warnings) == 2 and all("supernode-0 exited with status 3" in w and
                                          "restarted" in w for w in warnings)
        assert workers.procs["supernode-1"].poll() is None  # untouched
        # the log continues across restarts: one line per start
        assert (tmp_path / "worker-0.log").read_text().count("worker ") == 3
        assert workers.check(warnings.append) == []  # reported once
    finally:
        processes.stop()
    assert all(isinstance(p, Guarded) and p.poll() is not None for p in processes.started)


def _worker_pid(out: Path, index: int) -> int:
    """The `fedlora worker` process of node ``index`` of the launch writing to ``out``."""
    port = json.loads((out / "deployment.json").read_text())["nodes"][index]["port"]
    want = f"127.0.0.1:{port}".encode()
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # the worker itself, not the reaper that started it (whose command line contains it)
        if cmdline[1:3] == [b"-m", b"fedlora"] and b"worker" in cmdline and want in cmdline:
            return int(proc.name)
    raise AssertionError(f"no fedlora worker for node {index} of {out}")


@pytest.mark.slow
@pytest.mark.long  # minutes of real launches/training: `make test-long` runs it
def test_a_warm_worker_killed_mid_run_is_restarted_and_the_run_completes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedlora", "launch", "--nodes", "2",
                             "--rounds", "3", "--out", str(out), "-c", TINY + " round-timeout=90"
                             " min-accepted=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=WIDE)
    try:
        deadline = time.monotonic() + 300
        while not any(r["round"] >= 1 for r in read_metrics(out)) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        assert any(r["round"] >= 1 for r in read_metrics(out)), "the run never reached round 1"
        first = _worker_pid(out, 1)
        os.kill(first, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = stdout + stderr
    assert proc.returncode == 0, output[-3000:]
    assert "the fedlora worker of supernode-1 exited with status" in output
    assert "restarted it (1 of 3)" in output
    records = read_metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["num_accepted"] == 2  # the restarted worker serves its node again
    assert our_processes(str(out)) == []


@pytest.mark.long  # 1-3.5 min on 2 cores: make test-long (CI budget)
@pytest.mark.slow
def test_warm_and_cold_launches_end_bit_identical(tmp_path):
    """The same 2-node, 2-round launch: default (warm: one `fedlora worker` per node) and
    --cold (a fresh flwr-clientapp per message) end with the same adapter, byte for byte."""
    from safetensors.numpy import load_file

    args = ["--nodes", "2", "--rounds", "2", "-c", TINY + " server-optimizer=fedadam"]
    adapters = {}
    for name, flags in (("warm", []), ("cold", ["--cold"])):
        out = tmp_path / name
        res = fedlora_cli("launch", *flags, "--out", str(out), *args)
        assert res.returncode == 0, res.stderr[-2000:]
        assert (out / "logs" / "worker-0.log").exists() is (name == "warm")
        adapters[name] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        assert our_processes(str(out)) == []
    worker_log = (tmp_path / "warm" / "logs" / "worker-0.log").read_text()
    assert worker_log.count("(completed)") == 3  # capabilities + 2 train messages, one process
    assert adapters["warm"].keys() == adapters["cold"].keys()
    for key in adapters["warm"]:
        assert adapters["warm"][key].tobytes() == adapters["cold"][key].tobytes(), key


@pytest.mark.slow
@pytest.mark.long  # minutes of real launches/training: `make test-long` runs it
def test_a_warm_workers_memory_stays_flat_over_20_rounds(tmp_path):
    """The ClientApp runs inside the long-lived worker, so ``client_rss_mb_max`` is the
    worker's resident memory after each round: round 20 within +5 % of round 3."""
    out = tmp_path / "run"
    res = fedlora_cli("launch", "--nodes", "2", "--rounds", "20", "--out", str(out), "-c",
                      TINY + " checkpoint-every=0", timeout=1500)
    assert res.returncode == 0, res.stderr[-2000:]
    records = {r["round"]: r for r in read_metrics(out)}
    assert sorted(records) == list(range(21))
    worker_log = (out / "logs" / "worker-0.log").read_text()
    assert worker_log.count("(completed)") == 21  # one process served every round
    third, last = records[3]["client_rss_mb_max"], records[20]["client_rss_mb_max"]
    assert last <= 1.05 * third, {r: records[r]["client_rss_mb_max"] for r in range(1, 21)}


def test_worker_prints_each_flower_log_line_once():
    """A worker's log had every Flower line twice (Flower's own handler and the root's)."""
    code = ("import logging; from fedlora.runtime.warm import configure_logging; "
            "configure_logging(); logging.getLogger('flwr').warning('retrying in 0.29 seconds')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])

    assert done.returncode == 0, done.stderr
    assert done.stderr.count("retrying in 0.29 seconds") == 1, done.stderr
    assert " flwr retrying" in done.stderr  # the root handler's format: time, logger, message
