"""StatusPoller: `flwr ls` (a second of CPU each) only when the run may have ended."""

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
