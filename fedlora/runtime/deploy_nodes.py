"""The processes of one deployment launch: each SuperNode's command line and environment
(:class:`NodeSpec`), the reaped processes (:class:`Processes`) and the warm nodes' restarted
``fedlora worker`` executors (:class:`Workers`). Used by :mod:`fedlora.runtime.deploy`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedlora.runtime.launcher import console_script, refuse_in_fast_tests
from fedlora.runtime.reaper import Guarded
from fedlora.runtime.run_setup import WARM_TESTED_FLOWER

HOST = "127.0.0.1"


@dataclass(frozen=True)
class NodeSpec:
    """One SuperNode of a launch: its node config, port, home, GPU and key."""

    index: int
    num_nodes: int
    port: int
    home: Path
    log_path: Path
    rank: int | None = None
    data_path: str | None = None
    gpu: str | None = None  # the CUDA_VISIBLE_DEVICES value
    private_key: Path | None = None
    public_key: Path | None = None
    signing_key: Path | None = None  # its update-signing key (sign-updates)
    warm: bool = False  # ClientApp tasks run in one long-lived `fedlora worker` process
    procs: int = 1  # procs-per-node: torch.distributed processes per client (fedlora.learning.ddp)

    @property
    def name(self) -> str:
        """``supernode-<index>``: the node's name in logs, warnings and ``deployment.json``."""
        return f"supernode-{self.index}"

    @property
    def worker_log_path(self) -> Path:
        """The log of the node's warm ``fedlora worker``, next to its SuperNode log."""
        return self.log_path.with_name(f"worker-{self.index}.log")

    def node_config(self) -> str:
        """``--node-config`` as Flower parses it (TOML values; strings quoted)."""
        items = [f"partition-id={self.index}", f"num-partitions={self.num_nodes}"]
        if self.rank is not None:
            items.append(f"lora-rank={self.rank}")
        if self.data_path:
            items.append(f"data-path={json.dumps(self.data_path)}")
        if self.signing_key:
            items.append(f"signing-key={json.dumps(str(self.signing_key))}")
        if self.procs > 1:
            items.append(f"procs-per-node={self.procs}")
        return " ".join(items)

    def command(self, superlink: str, ca_cert: Path | None) -> list[str]:
        """The ``flower-supernode`` command line connecting to ``superlink`` (TLS with ``ca_cert``,
        else insecure; authenticated when the node has a private key).
        """
        cmd = [console_script("flower-supernode"), "--superlink", superlink,
               "--isolation", "process" if self.warm else "subprocess",
               "--host", HOST, "--port", str(self.port),
               "--node-config", self.node_config()]
        cmd += ["--root-certificates", str(ca_cert)] if ca_cert else ["--insecure"]
        if self.private_key:
            cmd += ["--auth-supernode-private-key", str(self.private_key)]
        return cmd

    def worker_command(self) -> list[str]:
        """The long-lived executor of a warm node (its Runtime API stays on loopback)."""
        return [sys.executable, "-m", "fedlora", "worker", "--runtime-api-address",
                f"{HOST}:{self.port}", "--insecure"]

    def worker_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The node's environment, importing the same ``fedlora`` as this launcher."""
        env = self.env(base)
        library = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (library, env.get("PYTHONPATH")) if p)
        return env

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` with the node's own FLWR_HOME and, with a GPU, its ``CUDA_VISIBLE_DEVICES``."""
        env = dict(base, FLWR_HOME=str(self.home))
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        return env


@dataclass(frozen=True)
class NodeExit:
    """A SuperNode process that ended on its own."""

    node: str
    status: int
    log_path: Path
    reason: str = ""

    def __str__(self) -> str:
        why = f": {self.reason.splitlines()[0]}" if self.reason else ""
        return f"{self.node} exited with status {self.status}{why} (log: {self.log_path})"


class Processes:
    """Every process of one launch, each under its own reaper; :meth:`stop` stops all."""

    def __init__(self) -> None:
        self.started: list[Guarded] = []

    def start(self, cmd: list[str], env: Mapping[str, str], log_path: Path,
              fresh_log: bool = True) -> Guarded:
        """Start ``cmd`` under a reaper, logging to ``log_path`` (emptied unless ``fresh_log`` is
        false); refused in fast tests.
        """
        if fresh_log:
            log_path.write_text("")
        refuse_in_fast_tests(cmd)
        proc = Guarded(cmd, env=dict(env), log_path=log_path)
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        """Stop every process started: signal all reapers first, then wait for each."""
        for proc in self.started:  # signal all reapers first: they stop their trees in parallel
            if proc.process.stdin:
                with contextlib.suppress(OSError):
                    proc.process.stdin.close()
        for proc in self.started:
            proc.stop()


MAX_WORKER_RESTARTS = 3  # per node and run; then the node is reported lost


def flower_version() -> str:
    """The installed ``flwr`` version string."""
    from importlib.metadata import version

    return version("flwr")


def warm_setting(warm: bool | None, version: str | None = None) -> tuple[bool, str | None]:
    """Whether a launch runs warm workers, and a warning to show (or ``None``).

    ``None`` (the default) is warm on the tested Flower versions and cold elsewhere: the worker
    drives the SuperNode's Runtime API through Flower internals that other versions may have
    changed. An explicit ``True`` runs warm anyway, with a warning outside the tested range.
    """
    version = version or flower_version()
    minor = ".".join(version.split(".")[:2])
    tested = minor in WARM_TESTED_FLOWER
    names = " and ".join(f"{v}.x" for v in WARM_TESTED_FLOWER)
    if warm is None:
        if tested:
            return True, None
        return False, (f"fedlora worker (warm clients) was tested with Flower {names}; this is "
                       f"Flower {version}, so each message runs in a fresh flwr-clientapp "
                       f"process (cold). Pass --warm to try warm workers anyway")
    if warm and not tested:
        return True, (f"--warm on Flower {version}: fedlora worker was tested with Flower "
                      f"{names} only; pass --cold if its nodes fail")
    return warm, None


class Workers:
    """The ``fedlora worker`` of each warm node, restarted when it exits (its log continues).

    While a worker is down its SuperNode keeps the messages it receives; the one the worker was
    running when it died gets no reply and counts as a failed client, and the restarted worker
    takes the next. After :data:`MAX_WORKER_RESTARTS` restarts of one node the node is given
    up: :meth:`check` returns it as lost and stops its SuperNode, which the SuperLink then
    reports unavailable to the server.
    """

    def __init__(self, specs: Sequence[NodeSpec], env: Mapping[str, str],
                 processes: Processes, max_restarts: int = MAX_WORKER_RESTARTS) -> None:
        self.specs = [s for s in specs if s.warm]
        self.env, self.processes, self.max_restarts = env, processes, max_restarts
        self.procs = {s.name: processes.start(s.worker_command(), s.worker_env(env),
                                              s.worker_log_path) for s in self.specs}
        self.restarts = dict.fromkeys(self.procs, 0)
        self.given_up: set[str] = set()

    def check(self, warn: Callable[[str], None]) -> list[NodeExit]:
        """Restart the workers that exited; return the nodes given up on since the last call."""
        lost = []
        for spec in self.specs:
            status = self.procs[spec.name].poll()
            if status is None or spec.name in self.given_up:
                continue
            if self.restarts[spec.name] >= self.max_restarts:
                self.given_up.add(spec.name)
                lost.append(NodeExit(spec.name, status, spec.worker_log_path,
                                     f"its fedlora worker exited {self.restarts[spec.name] + 1} "
                                     f"times (last status {status}); the node was stopped"))
                continue
            self.restarts[spec.name] += 1
            warn(f"the fedlora worker of {spec.name} exited with status {status} (log: "
                 f"{spec.worker_log_path}); restarted it ({self.restarts[spec.name]} of "
                 f"{self.max_restarts}); the message it was running counts as a failed client")
            self.procs[spec.name] = self.processes.start(
                spec.worker_command(), spec.worker_env(self.env), spec.worker_log_path,
                fresh_log=False)
        return lost


def exit_reason(log_path: Path, lines: int = 8) -> str:
    """Why a Flower process ended, from its log: Flower's exit message (``Exit Code: N`` and
    what follows), a graceful stop, or the last exception lines ("" when there are none)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    start = text.rfind("Exit Code:")
    if start < 0:
        if "SuperNode terminated gracefully" in text:
            return "terminated gracefully (stopped by a signal from outside)"
        errors = [line.strip() for line in text.splitlines()
                  if re.match(r"^[\w.]+(Error|Exception): ", line.strip())]
        return "\n".join(errors[-lines:])
    block = text[start:].split("For more information", 1)[0]
    return "\n".join(line.strip() for line in block.splitlines() if line.strip())


def first_exit(specs: Sequence[NodeSpec], procs: Sequence[Guarded],
               known: set[str]) -> NodeExit | None:
    """The first SuperNode of ``specs`` whose process (in ``procs``) has exited and is not in
    ``known`` (names), with the reason from its log; ``None`` while all run."""
    for spec, proc in zip(specs, procs, strict=True):
        status = proc.poll()
        if status is not None and spec.name not in known:
            return NodeExit(spec.name, status, spec.log_path, exit_reason(spec.log_path))
    return None


def sleep_watching(procs: Sequence[Guarded], seconds: float) -> None:
    """Sleep up to ``seconds``, but return as soon as one of ``procs`` that runs now exits."""
    running = [p for p in procs if p.poll() is None]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and all(p.poll() is None for p in running):
        time.sleep(0.2)
