"""Keep every process a launcher starts on a leash, even when the launcher itself is SIGKILLed.

``python -m fedlora.runtime.reaper -- CMD ...`` makes itself a *child subreaper* (Linux), starts
CMD and
waits. Flower's SuperExec and Ray start their own sessions and process groups, so signalling
CMD's group does not reach them; as a subreaper, this process becomes the parent of every
orphaned descendant instead of ``init``, so it can always find and stop all of them.

It stops CMD and every descendant (SIGTERM, then SIGKILL after a grace period) when

* its stdin reaches end-of-file: the launcher closed the pipe or died, however it died (the
  kernel closes a dead process's end of the pipe; unlike PR_SET_PDEATHSIG this does not depend
  on which thread started the reaper);
* it receives SIGTERM or SIGINT;
* CMD exits on its own: the leftovers CMD did not clean up are stopped too.

It exits with CMD's exit status (or 0 when it stopped CMD on request). Only processes descended
from this reaper are ever signalled — never anything found by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value, 0, 0, 0)


def descendants(root: int) -> list[int]:
    """PIDs of every live process below ``root`` (from /proc; zombies excluded)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Reaper:
    """CMD as a child of this process (a child subreaper once :func:`main` set it): collects
    exited orphans, and stops the whole tree when asked."""
    def __init__(self, cmd: list[str], grace: float) -> None:
        self.grace = grace
        self.stop_requested = threading.Event()
        self.child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.child_status: int | None = None

    def reap(self) -> None:
        """Collect every exited child (orphans are ours now); remember CMD's status."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child.pid:
                self.child_status = os.waitstatus_to_exitcode(status)
                self.child.returncode = self.child_status  # keep Popen from waiting again

    def stop_all(self) -> None:
        """SIGTERM every descendant, SIGKILL what is left after the grace period.

        Each pass re-reads the tree: a process that forks while being stopped (Ray's raylet
        starts its agents lazily) leaves children that were not in the first snapshot, and a
        dying parent's children become ours only once it is gone. The SIGKILL pass repeats
        until nothing is left (or 30 s), so this reaper never exits before its tree does.
        """
        if not self._signal_until_gone(signal.SIGTERM, self.grace, repeat=False):
            self._signal_until_gone(signal.SIGKILL, 30.0, repeat=True)

    def _signal_until_gone(self, sig: int, seconds: float, repeat: bool) -> bool:
        """Send ``sig`` to every descendant as it appears (each pass re-reads the tree; with
        ``repeat`` every pass signals everything again) until none is left (True) or
        ``seconds`` pass (False)."""
        signalled: set[int] = set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.reap()
            alive = descendants(os.getpid())
            if not alive:
                return True
            for pid in alive:
                if repeat or pid not in signalled:
                    signalled.add(pid)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
            time.sleep(0.1)
        return False

    def run(self) -> int:
        """Reap until CMD exits or a stop is requested, then stop every descendant; CMD's exit
        status (0 when stopped on request).
        """
        while not self.stop_requested.is_set() and self.child_status is None:
            self.reap()
            self.stop_requested.wait(0.2)
        self.stop_all()
        self.reap()
        return self.child_status if self.child_status is not None and \
            not self.stop_requested.is_set() else 0


class Guarded:
    """A command started under a reaper: :meth:`stop` (or our death) stops its whole tree."""

    def __init__(self, cmd: list[str], *, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, log_path: Path | None = None,
                 grace: float = 10.0) -> None:
        self.cmd, self.log_path, self.grace = cmd, log_path, grace
        log = log_path.open("ab") if log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fedlora.runtime.reaper", "--grace", str(grace), "--", *cmd],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                start_new_session=True)  # Ctrl-C in the terminal goes to the launcher only
        finally:
            if log_path:
                log.close()

    @property
    def pid(self) -> int:
        """The reaper process's pid."""
        return self.process.pid

    def poll(self) -> int | None:
        """The reaper's exit status (CMD's), or ``None`` while it runs."""
        return self.process.poll()

    def stop(self) -> None:
        """Stop the command and everything it started; wait until they are gone."""
        if self.process.stdin and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()  # the reaper's signal to stop everything
        try:
            self.process.wait(self.grace + 35)  # stop_all: grace + up to 30 s of SIGKILL passes
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def main(argv: list[str]) -> int:
    """``python -m fedlora.runtime.reaper [--grace S] -- CMD ...``: run CMD until it exits or
    stdin closes, then stop all it started; CMD's exit status (2 on a usage error).
    """
    if "--" not in argv:
        print("usage: python -m fedlora.runtime.reaper [--grace SECONDS] -- CMD ...",
        file=sys.stderr)
        return 2
    split = argv.index("--")
    options, cmd = argv[:split], argv[split + 1:]
    grace = float(options[options.index("--grace") + 1]) if "--grace" in options else 10.0
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    reaper = Reaper(cmd, grace)

    def request_stop(*_: object) -> None:
        reaper.stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    def watch_stdin() -> None:
        # raw fd reads: a daemon thread blocked in sys.stdin's buffered reader would make the
        # interpreter abort at exit ("could not acquire lock ... at interpreter shutdown")
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        request_stop()

    threading.Thread(target=watch_stdin, daemon=True).start()
    return reaper.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
