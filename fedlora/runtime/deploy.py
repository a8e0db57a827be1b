"""Run the Flower App on Flower's deployment engine: a real SuperLink and N SuperNode processes.

:func:`launch` does on one host what an operator does across machines (see
``docs/deployment.md``):

1. check everything it can before any process starts: node count, GPU indices, LoRA ranks,
   data files, credential files, a requested port, the run config;
2. start ``flower-superlink`` in deployment mode (``--isolation subprocess``, 127.0.0.1 only),
   with TLS (``--ssl-*``) and SuperNode authentication (``--enable-supernode-auth``) on request;
3. register each SuperNode's public key (``flwr supernode register``) when authentication is on;
4. start one ``flower-supernode`` per node with its own FLWR_HOME and Runtime API port,
   ``--node-config "partition-id=i num-partitions=N [lora-rank=r] [data-path=...]"`` and
   ``CUDA_VISIBLE_DEVICES`` when GPUs are given, and wait until every node is online;
5. submit the app with ``flwr run``, follow ``metrics.jsonl``, wait for the run's real final
   status (``flwr ls``) and save its log as ``run.log``;
6. stop every process it started, on success, failure and Ctrl-C. Each runs under a
   :class:`~fedlora.runtime.reaper.Guarded` reaper, so even a SIGKILLed launcher leaves nothing
   behind.

TLS and authentication: Flower refuses ``--enable-supernode-auth`` without TLS, so ``auth=True``
turns TLS on by itself; an explicit ``tls=False`` together with ``auth=True`` is refused. Without
``certs_dir`` a fresh CA, server certificate and SuperNode keys are generated into
``OUT/certs`` (:func:`fedlora.runtime.certs.generate`).

Signed updates (``sign-updates = true``): node ``i`` gets ``signing-key=DIR/signing-<i>.key`` in
its node config and the ServerApp reads the registered public keys from ``signing-keys``
(default ``DIR``), where ``DIR`` is ``certs_dir`` or ``OUT/certs`` (generated when absent).

Warm nodes (the default on the Flower versions in :data:`WARM_TESTED_FLOWER`): each SuperNode
runs with ``--isolation process`` beside one long-lived ``fedlora worker``
(:mod:`fedlora.runtime.warm`)
that runs its ClientApp messages, so imports and the loaded base model survive across rounds.
``warm=False`` (``--cold``) starts a fresh ``flwr-clientapp`` per message instead; on another
Flower version the launch falls back to that, with a warning. A worker that exits is restarted
(the message it was running fails and is counted as a failed client); one that exits more than
:data:`MAX_WORKER_RESTARTS` times in a run has its node reported lost and its SuperNode stopped.

A SuperNode that exits mid-run is reported through ``on_warning`` and the run goes on: the
SuperLink answers messages to the lost node with an error reply (at once when it shut down
cleanly, after about a minute of missed heartbeats when it was killed), and the ServerApp counts
it as a failed client and aggregates the others. Should a node be lost before the ServerApp has
found ``min-available-nodes`` nodes, the ServerApp waits up to ``round-timeout`` for them and
then goes on with those it has; the warning says so. The launch fails when no SuperNode is left.

Layout of ``OUT`` (besides what the ServerApp writes: ``metrics.jsonl``, ``adapter/``, ...)::

    run-config.toml  run.log  flwr-run-id  deployment.json
    logs/superlink.log  logs/supernode-<i>.log
    certs/                      generated credentials (no ``certs_dir`` given)
    .flwr/                      FLWR_HOME of the SuperLink and of the ``flwr`` CLI
    .flwr/supernode-<i>/        FLWR_HOME of SuperNode i
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora import config
from fedlora.errors import FedLoraError
from fedlora.federation.outputs import read_metrics
from fedlora.runtime import certs
from fedlora.runtime.launcher import (
    RunFailed,
    StatusPoller,
    app_dir,
    console_script,
    failure_reason,
    flwr_cli,
    flwr_env,
    free_port,
    json_tail,
    refuse_in_fast_tests,
    run_logs,
    submit_run,
    write_connection,
)
from fedlora.runtime.reaper import Guarded
from fedlora.runtime.run_setup import WARM_TESTED_FLOWER

CONNECTION = "fedlora-deploy"
HOST = "127.0.0.1"

log = logging.getLogger(__name__)


class DeployError(FedLoraError):
    """A launch cannot start; found before any process was started."""


class SupernodeFailed(RunFailed):
    """A SuperNode exited before it joined the federation (e.g. its key is not registered)."""

    def __init__(self, node: str, status: int, log_path: Path, reason: str) -> None:
        super().__init__(f"{node} exited before joining the federation (exit status {status}):"
                         f"\n{reason}\nsee {log_path}")
        self.node, self.status, self.log_path = node, status, log_path


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
        return f"supernode-{self.index}"

    @property
    def worker_log_path(self) -> Path:
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


@dataclass
class LaunchResult:
    records: list[dict[str, Any]]
    run_id: int
    lost_nodes: list[NodeExit] = field(default_factory=list)


def superlink_command(port: int, creds: certs.Credentials | None, auth: bool) -> list[str]:
    cmd = [console_script("flower-superlink"), "--isolation", "subprocess", "--host", HOST,
           "--port", str(port), "--disable-runtime-dependency-installation"]
    if creds is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile",
                str(creds.server_cert), "--ssl-keyfile", str(creds.server_key)]
    if auth:
        cmd.append("--enable-supernode-auth")
    return cmd


# ---------------------------------------------------------------------- warm workers

MAX_WORKER_RESTARTS = 3  # per node and run; then the node is reported lost


def flower_version() -> str:
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
                 processes: _Processes, max_restarts: int = MAX_WORKER_RESTARTS) -> None:
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


# ---------------------------------------------------------------------- checks before starting


def node_count(nodes: int | None, gpus: Sequence[int] | None) -> int:
    if gpus is not None:
        if nodes is not None and nodes != len(gpus):
            raise DeployError(f"give either --nodes or --gpus (one SuperNode per GPU); got "
                              f"--nodes {nodes} and {len(gpus)} GPU(s)")
        if not gpus:
            raise DeployError("--gpus needs at least one GPU index, e.g. --gpus 0,1")
        return len(gpus)
    if nodes is None:
        raise DeployError("give the number of SuperNodes (--nodes N) or their GPUs (--gpus 0,1)")
    if nodes < 1:
        raise DeployError(f"--nodes must be >= 1; got {nodes}")
    return nodes


def visible_devices(gpus: Sequence[int]) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` value of each requested GPU index, checked against the
    devices torch sees here (indices count within this process's own CUDA_VISIBLE_DEVICES)."""
    import torch

    count = torch.cuda.device_count()
    bad = sorted({g for g in gpus if not 0 <= g < count})
    if bad:
        seen = ("this host has no CUDA GPU (torch.cuda.device_count() is 0)" if count == 0
                else f"torch sees {count} CUDA device(s): indices 0..{count - 1}")
        raise DeployError(f"GPU index(es) {bad} do not exist: {seen}; use valid --gpus "
                          f"indices, or --nodes N to run the SuperNodes on CPU")
    parent = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
              if d.strip()]
    return [parent[g] if parent else str(g) for g in gpus]


def node_ranks(ranks: Sequence[int] | None, n: int) -> list[int] | None:
    if ranks is None:
        return None
    ranks = list(ranks)
    if len(ranks) == 1:
        ranks *= n
    if len(ranks) != n:
        raise DeployError(f"--ranks needs one rank per SuperNode ({n}) or a single rank; got "
                          f"{len(ranks)}: {','.join(map(str, ranks))}")
    return ranks


def node_data_paths(data_paths: Sequence[str | Path] | None, n: int) -> list[str] | None:
    """Absolute data paths, one per node; each must exist (the nodes run on this host)."""
    if data_paths is None:
        return None
    if len(data_paths) != n:
        raise DeployError(f"need one data path per SuperNode ({n}); got {len(data_paths)}")
    paths = [str(Path(p).expanduser().resolve()) for p in data_paths]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise DeployError(f"data path(s) {missing} do not exist; check --data-path (its "
                          f"{{partition-id}} is replaced by 0..{n - 1})")
    quoted = [p for p in paths if '"' in p]
    if quoted:
        raise DeployError(f"data path(s) {quoted} contain a double quote, which Flower's "
                          f"--node-config cannot carry; rename them")
    return paths


def ensure_port_free(port: int) -> None:
    if not 0 < port < 65536:
        raise DeployError(f"--port must be in 1..65535; got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((HOST, port))
        except OSError as exc:
            raise DeployError(f"port {port} on {HOST} is in use ({exc.strerror}); choose "
                              f"another --port, or leave it out to use a free one") from None


def tls_setting(tls: bool | None, auth: bool, certs_dir: str | Path | None) -> bool:
    """TLS is on when asked for, or when authentication or a credentials directory needs it."""
    if tls is None:
        return auth or certs_dir is not None
    if auth and not tls:
        raise DeployError("SuperNode authentication needs TLS (Flower refuses "
                          "--enable-supernode-auth without it); drop tls=False")
    if certs_dir is not None and not tls:
        raise DeployError("a credentials directory was given but TLS is off; drop tls=False")
    return tls


def _distinct_free_ports(count: int, taken: set[int]) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in taken and port not in ports:
            ports.append(port)
    return ports


# ---------------------------------------------------------------------- processes


class _Processes:
    """Every process of one launch, each under its own reaper; :meth:`stop` stops all."""

    def __init__(self) -> None:
        self.started: list[Guarded] = []

    def start(self, cmd: list[str], env: Mapping[str, str], log_path: Path,
              fresh_log: bool = True) -> Guarded:
        if fresh_log:
            log_path.write_text("")
        refuse_in_fast_tests(cmd)
        proc = Guarded(cmd, env=dict(env), log_path=log_path)
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.started:  # signal all reapers first: they stop their trees in parallel
            if proc.process.stdin:
                with contextlib.suppress(OSError):
                    proc.process.stdin.close()
        for proc in self.started:
            proc.stop()


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


def _wait_listening(proc: Guarded, port: int, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailed(f"flower-superlink exited (status {proc.poll()}):\n"
                            f"{exit_reason(log_path)}\nsee {log_path}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RunFailed(f"flower-superlink did not listen on {HOST}:{port} within {timeout:.0f}s; "
                    f"see {log_path}")


def register_key(public_key: Path, env: Mapping[str, str], cwd: Path) -> int:
    """Register a SuperNode's public key on the SuperLink; return its node id."""
    res = flwr_cli(["supernode", "register", str(public_key), CONNECTION, "--format", "json"],
                env, cwd)
    try:
        payload = json_tail(res.stdout)
    except (RunFailed, ValueError):
        payload = {}
    if res.returncode != 0 or "node-id" not in payload:
        raise RunFailed(f"could not register {public_key} on the SuperLink: "
                        f"{(res.stdout + res.stderr).strip()[-1500:]}")
    return int(payload["node-id"])


def register_keys(specs: Sequence[NodeSpec], env: Mapping[str, str], cwd: Path
                  ) -> dict[str, int]:
    """Register every node's public key (concurrently: each ``flwr`` call takes seconds)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = {s.name: pool.submit(register_key, s.public_key, env, cwd) for s in specs
               if s.public_key}
        return {name: future.result() for name, future in ids.items()}


def online_node_ids(env: Mapping[str, str], cwd: Path) -> set[int]:
    res = flwr_cli(["supernode", "list", CONNECTION, "--format", "json"], env, cwd)
    if res.returncode != 0:
        return set()
    try:
        nodes = json_tail(res.stdout).get("nodes") or []
    except (RunFailed, ValueError):
        return set()
    return {int(n["node-id"]) for n in nodes if n.get("status") == "online"}


def _first_exit(specs: Sequence[NodeSpec], procs: Sequence[Guarded],
                known: set[str]) -> NodeExit | None:
    for spec, proc in zip(specs, procs, strict=True):
        status = proc.poll()
        if status is not None and spec.name not in known:
            return NodeExit(spec.name, status, spec.log_path, exit_reason(spec.log_path))
    return None


def _sleep_watching(procs: Sequence[Guarded], seconds: float) -> None:
    """Sleep up to ``seconds``, but return as soon as one of ``procs`` that runs now exits."""
    running = [p for p in procs if p.poll() is None]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and all(p.poll() is None for p in running):
        time.sleep(0.2)


def _wait_online(specs: Sequence[NodeSpec], procs: Sequence[Guarded], link: Guarded,
                 link_log: Path, env: Mapping[str, str], cwd: Path, timeout: float,
                 poll_s: float) -> None:
    deadline = time.monotonic() + timeout
    online: set[int] = set()
    while True:
        gone = _first_exit(specs, procs, set())
        if gone:
            hint = ""
            if "Failed to activate SuperNode" in gone.reason:
                hint = ("\nthe SuperLink refused this node: with authentication on, the public "
                        "key of the node's private key must be registered first (`flwr "
                        "supernode register <key>.pub <connection>`)")
            raise SupernodeFailed(gone.node, gone.status, gone.log_path, gone.reason + hint)
        if link.poll() is not None:
            raise RunFailed(f"flower-superlink exited (status {link.poll()}) while the "
                            f"SuperNodes connected; see {link_log}")
        online = online_node_ids(env, cwd)
        if len(online) >= len(specs):
            return
        if time.monotonic() > deadline:
            raise RunFailed(f"only {len(online)} of {len(specs)} SuperNodes came online within "
                            f"{timeout:.0f}s; see their logs in {specs[0].log_path.parent}")
        _sleep_watching([*procs, link], poll_s)


# ---------------------------------------------------------------------- launch


def launch(flat: Mapping[str, Any], *, out: str | Path, nodes: int | None = None,
           gpus: Sequence[int] | None = None, tls: bool | None = None, auth: bool = False,
           certs_dir: str | Path | None = None, data_paths: Sequence[str | Path] | None = None,
           ranks: Sequence[int] | None = None, port: int | None = None,
           warm: bool | None = None, procs_per_node: int = 1,
           on_round: Callable[[dict[str, Any]], None] | None = None,
           on_warning: Callable[[str], None] | None = None,
           poll_s: float = 3.0, startup_timeout: float = 120.0,
           settings_record: Mapping[str, Any] | None = None) -> LaunchResult:
    """Run one federated job on real SuperLink/SuperNode processes on this host.

    Parameters
    ----------
    flat
        Flat run config (``fedlora config`` keys; missing ones take their defaults);
        ``output-dir`` is set to ``out``.
    out
        Output directory (see the module docstring for its layout).
    nodes, gpus
        Number of SuperNodes, or one SuperNode per listed GPU index (``CUDA_VISIBLE_DEVICES``).
    tls, auth, certs_dir
        TLS on the SuperLink; SuperNode authentication (implies TLS); credentials from
        :func:`fedlora.runtime.certs.generate` (default: fresh ones in ``OUT/certs``).
    data_paths, ranks
        Per node ``data-path`` and ``lora-rank`` node-config values (one per node; a single
        rank applies to all). Ranks are also written to ``rank-by-partition`` so the strategy
        and rank limits are checked before anything starts.
    port
        SuperLink port (Fleet, Control and ServerAppIo share it in Flower 1.41); default free.
    warm
        Run each node's ClientApp tasks in one long-lived ``fedlora worker`` process
        (SuperNodes with ``--isolation process``) instead of a new ``flwr-clientapp`` process
        per message, so imports and the loaded base model survive across rounds
        (:mod:`fedlora.runtime.warm`; log in ``logs/worker-<i>.log``). ``None``: warm on the tested
        Flower versions, cold with a warning elsewhere (:func:`warm_setting`); ``False``: cold.
    procs_per_node
        ``torch.distributed`` processes per node (node config ``procs-per-node``,
        :mod:`fedlora.learning.ddp`); with ``gpus``, each node needs that many visible GPUs.
    on_round, on_warning
        Called with each ``metrics.jsonl`` record, and with a message per lost SuperNode.

    Raises
    ------
    DeployError
        Bad input, before any process is started.
    SupernodeFailed
        A SuperNode exited before joining (e.g. its key is not registered).
    RunFailed
        The SuperLink failed or the run did not complete (with the reason from its log).
    """
    from fedlora.experiments.attack_catalog import refuse_in_deployment
    from fedlora.runtime.run_setup import finalize, write_run_config

    try:
        refuse_in_deployment(flat)
    except FedLoraError as exc:
        raise DeployError(str(exc)) from None
    n = node_count(nodes, gpus)
    if procs_per_node < 1:
        raise DeployError(f"--procs-per-node must be >= 1; got {procs_per_node}")
    if procs_per_node > 1 and gpus is not None:
        raise DeployError(f"--gpus pins each SuperNode to one GPU, and --procs-per-node "
                          f"{procs_per_node} needs {procs_per_node} GPUs per node: start such "
                          f"a node by hand with CUDA_VISIBLE_DEVICES listing its GPUs and "
                          f"procs-per-node={procs_per_node} in its --node-config "
                          f"(docs/deployment.md), or use --nodes on CPU")
    devices: list[str | None] = list(visible_devices(gpus)) if gpus is not None else [None] * n
    tls = tls_setting(tls, auth, certs_dir)
    rank_list = node_ranks(ranks, n)
    paths = node_data_paths(data_paths, n)
    out = Path(out).expanduser().resolve()
    flat = {**config.defaults(), **flat, "output-dir": str(out)}
    if rank_list:
        flat["rank-by-partition"] = ",".join(map(str, rank_list))
    flat = finalize(flat, n, paths)  # each node's file read: columns, rows, labels
    signing = bool(flat["sign-updates"])
    creds = None  # set exactly when TLS is on
    if certs_dir is not None:
        creds = certs.Credentials.at(certs_dir, n)
        creds.require(tls=tls, auth=auth, signing=signing)
    if port is not None:
        ensure_port_free(port)
    warn = on_warning or log.warning
    warm, warm_note = warm_setting(warm)
    if warm_note:
        warn(warm_note)

    logs, home = out / "logs", out / ".flwr"
    logs.mkdir(parents=True, exist_ok=True)
    if settings_record is not None:  # what `fedlora launch --resume` relaunches with
        record = {**settings_record, "warm": warm}  # as resolved: a resume runs the same way
        (out / "launch-settings.json").write_text(json.dumps(record, default=str))
    if tls and creds is None:
        creds = certs.generate(out / "certs", nodes=n if auth or signing else 0, force=True)
    signing_keys: tuple[Path, ...] = ()
    if signing:
        keys = creds or certs.generate_signing_keys(out / "certs", nodes=n, force=True)
        signing_keys = keys.signing_keys
        flat["signing-keys"] = flat["signing-keys"] or str(keys.directory)
    run_config = write_run_config(flat, out)
    env, cwd = flwr_env(home), app_dir()
    link_port = port or free_port()
    node_ports = _distinct_free_ports(n, {link_port})
    specs = [NodeSpec(index=i, num_nodes=n, port=node_ports[i], home=home / f"supernode-{i}",
                      log_path=logs / f"supernode-{i}.log",
                      rank=rank_list[i] if rank_list else None,
                      data_path=paths[i] if paths else None, gpu=devices[i],
                      private_key=creds.node_keys[i] if auth and creds else None,
                      public_key=creds.node_public_keys[i] if auth and creds else None,
                      signing_key=signing_keys[i] if signing_keys else None, warm=warm,
                      procs=procs_per_node)
             for i in range(n)]
    for spec in specs:
        spec.home.mkdir(parents=True, exist_ok=True)

    processes = _Processes()
    try:
        link_log = logs / "superlink.log"
        link = processes.start(superlink_command(link_port, creds, auth), env, link_log)
        _wait_listening(link, link_port, link_log, startup_timeout)
        ca_cert = creds.ca_cert if creds else None
        write_connection(home, link_port, connection=CONNECTION, root_certificates=ca_cert)
        node_ids = register_keys(specs, env, cwd)
        node_procs = [processes.start(s.command(f"{HOST}:{link_port}", ca_cert), s.env(env),
                                      s.log_path) for s in specs]
        workers = Workers(specs, env, processes)
        _wait_online(specs, node_procs, link, link_log, env, cwd, startup_timeout, poll_s)
        _write_deployment(out, link_port, tls, auth, creds, specs, node_ids)
        (out / "summary.json").unlink(missing_ok=True)  # written when the run completes
        run_id = submit_run(run_config, env, cwd, connection=CONNECTION)
        (out / "flwr-run-id").write_text(str(run_id))
        return _follow(run_id, out, flat, specs, node_procs, link, link_log, env, cwd,
                       on_round, warn, poll_s, workers)
    finally:
        processes.stop()


def _follow(run_id: int, out: Path, flat: Mapping[str, Any], specs: Sequence[NodeSpec],
            node_procs: Sequence[Guarded], link: Guarded, link_log: Path,
            env: Mapping[str, str], cwd: Path,
            on_round: Callable[[dict[str, Any]], None] | None,
            warn: Callable[[str], None], poll_s: float,
            workers: Workers | None = None) -> LaunchResult:
    """Forward new rounds, restart exited workers, report lost SuperNodes, and wait for the
    run's final status."""
    result = LaunchResult([], run_id)
    lost: set[str] = set()
    min_available = int(flat["min-available-nodes"])
    timeout = float(flat["round-timeout"])

    def forward_new_rounds() -> None:
        fresh = read_metrics(out)
        for record in fresh[len(result.records):]:
            if on_round:
                on_round(record)
        result.records[:] = fresh

    poller = StatusPoller(run_id, env, cwd, out, connection=CONNECTION)
    while not poller.finished():
        forward_new_rounds()
        if link.poll() is not None:
            raise RunFailed(f"the SuperLink exited during run {run_id}; see {link_log}")
        for gone in workers.check(warn) if workers else []:  # given up: stop its SuperNode
            node_procs[next(i for i, s in enumerate(specs) if s.name == gone.node)].stop()
            lost.add(gone.node)
            result.lost_nodes.append(gone)
            warn(f"{gone}; the run continues with {len(specs) - len(lost)} of {len(specs)} "
                 f"SuperNode(s)")
            if len(lost) == len(specs):
                raise RunFailed(f"{gone}; no SuperNode is left, so run {run_id} cannot "
                                f"continue (logs in {gone.log_path.parent})")
        while gone := _first_exit(specs, node_procs, lost):
            lost.add(gone.node)
            result.lost_nodes.append(gone)
            alive = len(specs) - len(lost)
            if not alive:
                raise RunFailed(f"{gone}; no SuperNode is left, so run {run_id} cannot "
                                f"continue (logs in {gone.log_path.parent})")
            note = (f"; if the ServerApp had not yet found min-available-nodes={min_available} "
                    f"nodes, it waits up to round-timeout={timeout:g}s for them"
                    if not result.records and alive < min_available else "")
            warn(f"{gone}; the run continues with {alive} of {len(specs)} SuperNode(s) (the "
                 f"server counts the lost node's missing replies as failures){note}")
        _sleep_watching([*node_procs, link, *(workers.procs.values() if workers else ())],
                        poll_s)
    status = poller.status
    forward_new_rounds()
    logs = run_logs(run_id, env, cwd, connection=CONNECTION)
    (out / "run.log").write_text(logs)
    if status != "finished:completed":
        raise RunFailed(f"run {run_id} ended with status {status!r}:\n{failure_reason(logs)}")
    return result


def _write_deployment(out: Path, port: int, tls: bool, auth: bool,
                      creds: certs.Credentials | None, specs: Sequence[NodeSpec],
                      node_ids: Mapping[str, int]) -> None:
    """What was started where: ``deployment.json`` (for people and scripts, not for resuming)."""
    info = {
        "superlink": {"address": f"{HOST}:{port}", "tls": tls, "auth": auth,
                      "connection": CONNECTION, "flwr-home": str(out / ".flwr"),
                      "ca-cert": str(creds.ca_cert) if creds else None},
        "nodes": [{"name": s.name, "partition-id": s.index, "port": s.port,
                   "node-config": s.node_config(), "cuda-visible-devices": s.gpu,
                   "node-id": node_ids.get(s.name), "log": str(s.log_path),
                   "flwr-home": str(s.home)} for s in specs],
    }
    (out / "deployment.json").write_text(json.dumps(info, indent=2) + "\n")
