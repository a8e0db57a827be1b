"""A private multi-process Ray cluster on loopback for tests: one head, N worker nodes.

Each node is a ``ray start --block`` process under a :class:`~fedlora.runtime.reaper.Guarded`
reaper,
so stopping it stops that node's GCS/raylet/agents/workers — and nothing else (``ray stop``
would stop every Ray process on the machine, other users' too). Every port Ray would
otherwise take at a fixed default (GCS 6379, client server 10001, dashboard agent 52365) is a
free one, and each node writes its sockets, logs and the cluster address file under its own
temporary directory, so another cluster on this machine is neither joined nor disturbed. That
directory must be short: Ray's Unix socket paths below it may not exceed 107 bytes.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.runtime.launcher import console_script, free_port
from fedlora.runtime.reaper import Guarded


@dataclass
class LocalRayCluster:
    """Start with :meth:`start`; ``address`` is what ``fedlora run --ray-address`` takes.

    Node ``name`` (``head``, ``worker-0``, ...) keeps its Ray files in ``root / name``; ``root``
    is a fresh directory under /tmp, removed by :meth:`remove`.
    """

    worker_cpus: list[int]
    head_cpus: int = 1  # CPUs for actors on the head node (0: it only coordinates)
    address: str = ""
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fl-ray-")))
    nodes: list[Guarded] = field(default_factory=list)

    def _node(self, name: str, cpus: int, join: list[str]) -> Guarded:
        temp = self.root / name
        temp.mkdir(parents=True, exist_ok=True)
        cmd = [console_script("ray"), "start", "--block", *join,
               "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--num-gpus", "0",
               "--temp-dir", str(temp), "--object-store-memory", str(100 * 2**20),
               "--dashboard-agent-listen-port", str(free_port()),
               "--disable-usage-stats"]
        return Guarded(cmd, log_path=self.root / f"{name}.log")

    def start(self, timeout: float = 120.0) -> LocalRayCluster:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.nodes.append(self._node("head", self.head_cpus, [
            "--head", "--port", str(port), "--ray-client-server-port", str(free_port()),
            "--include-dashboard", "false"]))
        self.wait_for_nodes(1, timeout)
        for i, cpus in enumerate(self.worker_cpus):
            self.nodes.append(self._node(f"worker-{i}", cpus, ["--address", self.address]))
        self.wait_for_nodes(1 + len(self.worker_cpus), timeout)
        return self

    def alive_nodes(self) -> int:
        """Nodes the cluster's GCS reports alive (asked through ``ray status``)."""
        done = subprocess.run([console_script("ray"), "status", "--address", self.address],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            return 0
        active = done.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return sum(1 for line in active.splitlines() if "node_" in line)

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n in self.nodes if n.poll() is not None]
            if dead:
                logs = "\n".join(n.log_path.read_text()[-2000:] for n in dead if n.log_path)
                self.stop()
                raise RuntimeError(f"a Ray node exited while starting:\n{logs}")
            if self.alive_nodes() >= count:
                return
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"the Ray cluster at {self.address} did not reach {count} nodes "
                           f"within {timeout}s; see {self.root}")

    def stop(self) -> None:
        """Stop the worker nodes, then the head (each with every process it started)."""
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()

    def remove(self) -> None:
        """Stop the cluster and delete its directory (logs included)."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
