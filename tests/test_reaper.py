"""The reaper stops a whole process tree, including descendants that left the session."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedlora.runtime.reaper import Guarded, descendants

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")

# a parent that starts a grandchild in its own session (as Flower's SuperExec and Ray do)
TREE = ["sh", "-c", "setsid sleep 300 & sleep 300 & wait"]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def sessions_of(pids: list[int]) -> set[int]:
    out = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            out.add(os.getsid(pid))
    return out


def test_stop_ends_every_descendant_including_other_sessions():
    guarded = Guarded(TREE, grace=2)
    # sh, 2 × sleep, and the setsid'd one already in a session of its own (a forked child
    # may not have called setsid() yet)
    assert wait_for(lambda: len(descendants(guarded.pid)) >= 3 and
                    len(sessions_of(descendants(guarded.pid))) == 2)
    tree = descendants(guarded.pid)
    guarded.stop()
    assert guarded.poll() is not None
    assert not any(alive(pid) for pid in tree)


def test_command_exit_stops_its_leftovers_and_keeps_its_status():
    guarded = Guarded(["sh", "-c", "setsid sleep 300 & sleep 0.5; exit 3"], grace=2)
    assert wait_for(lambda: guarded.poll() is not None)
    assert guarded.poll() == 3
    # the orphaned sleep was re-parented to the reaper and stopped with it
    assert not [pid for pid in descendants(guarded.pid) if alive(pid)]


def test_sigkilled_launcher_leaves_nothing_behind(tmp_path):
    """The launcher is SIGKILLed: its end of the pipe closes and the reaper cleans up."""
    pid_file = tmp_path / "reaper.pid"
    script = textwrap.dedent(f"""
        import time
        from fedlora.runtime.reaper import Guarded
        g = Guarded({TREE!r}, grace=2)
        open({str(pid_file)!r}, "w").write(str(g.pid))
        time.sleep(300)
    """)
    launcher = subprocess.Popen([sys.executable, "-c", script])
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text() != "")
    reaper = int(pid_file.read_text())
    assert wait_for(lambda: len(descendants(reaper)) >= 3)
    tree = [reaper, *descendants(reaper)]
    launcher.kill()
    launcher.wait()
    assert wait_for(lambda: not any(alive(pid) for pid in tree)), \
        [Path(f"/proc/{p}/cmdline").read_bytes() for p in tree if alive(p)]


FORKER = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a busy raylet that keeps starting agents
    with open(sys.argv[1], "a") as log:
        while True:
            child = subprocess.Popen(["sleep", "300"], start_new_session=True)
            log.write(f"{child.pid}\\n")
            log.flush()
            time.sleep(0.002)
""")


def test_children_forked_while_the_tree_is_being_stopped_are_stopped_too(tmp_path):
    """A process that ignores SIGTERM and keeps forking: every child it ever started is gone
    when stop() returns, including those forked after the reaper's first look at the tree."""
    log = tmp_path / "pids"
    guarded = Guarded([sys.executable, "-c", FORKER, str(log)], grace=1)
    assert wait_for(lambda: log.exists() and len(log.read_text().split()) >= 20)
    try:
        guarded.stop()
        assert guarded.poll() is not None
        started = [int(pid) for pid in log.read_text().split()]
        assert [pid for pid in started if alive(pid)] == []
    finally:  # never leave our own children behind, even when the claim fails
        for pid in (int(p) for p in log.read_text().split()):
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)


def test_usage_error_without_a_command():
    res = subprocess.run([sys.executable, "-m", "fedlora.runtime.reaper", "sleep", "1"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "usage" in res.stderr
