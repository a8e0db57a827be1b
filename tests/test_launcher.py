"""StatusPoller: `flwr ls` (a second of CPU each) only when the run may have ended; `flwr ls`
and `flwr log` timing out on a loaded machine do not end a finished run."""

from __future__ import annotations

import pytest

from fedlora.runtime import launcher


@pytest.fixture
def asked(monkeypatch):
    """Every `flwr ls` the poller would run; the run is 'running' until the marker exists."""
    calls: list[float] = []
    clock = {"now": 1000.0}
    monkeypatch.setattr(launcher.time, "monotonic", lambda: clock["now"])

    def status(run_id, env, cwd, connection):
        calls.append(clock["now"])
        return "finished:completed" if len(calls) > 1 else "running"

    monkeypatch.setattr(launcher, "run_status", status)
    return calls, clock


def test_without_the_marker_the_status_is_asked_every_30_s(tmp_path, asked):
    calls, clock = asked
    poller = launcher.StatusPoller(1, {}, tmp_path, tmp_path)

    for _ in range(59):  # a poll every 0.5 s for 29.5 s
        clock["now"] += 0.5
        assert not poller.finished()
    assert calls == []
    clock["now"] += 0.5
    assert not poller.finished()
    assert calls == [1030.0]


def test_once_the_marker_exists_it_is_asked_every_second(tmp_path, asked):
    calls, clock = asked
    poller = launcher.StatusPoller(1, {}, tmp_path, tmp_path)
    (tmp_path / "summary.json").write_text('{"status": "failed"}')

    clock["now"] += 1.0
    assert not poller.finished()  # the run is still winding down
    clock["now"] += 0.5
    assert not poller.finished() and len(calls) == 1
    clock["now"] += 0.5
    assert poller.finished() and poller.status == "finished:completed"
    assert calls == [1001.0, 1002.0]


def test_a_flwr_log_that_times_out_leaves_a_note_instead_of_failing_the_run(tmp_path,
                                                                          monkeypatch):
    """The robustness experiment died after a finished cell when `flwr log` took over 60 s on
    a loaded machine: the log is a record, so its timeout must not end the sweep."""
    slow = tmp_path / "flwr"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    monkeypatch.setattr(launcher, "console_script", lambda name: str(slow))

    text = launcher.run_logs(42, {"PATH": "/usr/bin:/bin"}, tmp_path, timeout=0.3)

    assert "`flwr log 42` did not answer within 0.3 s" in text


def test_a_flwr_ls_that_times_out_reads_as_unknown_so_the_poller_asks_again(tmp_path,
                                                                           monkeypatch):
    def timed_out(args, env, cwd, timeout=120):
        raise launcher.subprocess.TimeoutExpired(["flwr", *args], timeout)

    monkeypatch.setattr(launcher, "flwr_cli", timed_out)

    assert launcher.run_status(42, {}, tmp_path) == "unknown"
