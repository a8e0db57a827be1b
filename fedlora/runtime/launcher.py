"""Run the Flower App on Flower's simulation engine, with everything handled for the user.

:func:`run_simulation` starts a private ``flower-superlink --simulation`` on a free loopback
port (its PID is ours: it and its children are stopped when the run ends, however it ends),
submits the app with ``flwr run``, follows ``metrics.jsonl`` for progress, and reads the run's
real final status with ``flwr ls`` (``flwr run --stream`` exits 0 even when a run fails).
:class:`Placement` says where the virtual clients run: Ray resources per worker and, optionally,
the address of a Ray cluster to run them on.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.errors import FedLoraError
from fedlora.federation.outputs import read_metrics
from fedlora.runtime.reaper import Guarded

CONNECTION = "fedlora-sim"


class RunFailed(FedLoraError):
    """The federated run did not complete."""


def _whole_cpus(value: float) -> int:
    if value < 1 or not float(value).is_integer():
        raise FedLoraError(f"cpus per client must be a whole number >= 1 (Flower 1.41 sends "
                           f"client-resources-num-cpus to the simulation as an integer); "
                           f"got {value}")
    return int(value)


def _gpus(value: float) -> int | float:
    if value < 0 or (value > 1 and not float(value).is_integer()):
        raise FedLoraError(f"gpus per client must be >= 0 and, above 1, a whole number (Ray "
                           f"shares a GPU only in fractions below 1); got {value}")
    return int(value) if float(value).is_integer() else float(value)


@dataclass(frozen=True)
class Placement:
    """Where a simulation's virtual clients run (Flower's Ray backend settings).

    Each Ray actor — a worker process that serves many virtual clients in turn, with one cached
    frozen base model — reserves ``cpus`` CPUs and ``gpus`` GPUs. Ray starts as many actors per
    machine as fit: ``gpus = 0.25`` puts four actors (four model copies) on each GPU.
    ``ray_address`` (``host:port`` of a ``ray start --head``) runs the actors on that Ray
    cluster's machines; empty starts a private Ray instance on this machine.
    """

    cpus: int = 1
    gpus: float = 0.0
    ray_address: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cpus", _whole_cpus(self.cpus))
        object.__setattr__(self, "gpus", _gpus(self.gpus))

    def federation_config(self, num_supernodes: int) -> str:
        """``flwr run --federation-config`` value: virtual nodes and each actor's resources."""
        return (f"num-supernodes={num_supernodes} client-resources-num-cpus={self.cpus} "
                f"client-resources-num-gpus={self.gpus}")

    def environment(self) -> dict[str, str]:
        """Variables for the SuperLink, whose simulation process calls ``ray.init()``.

        Flower 1.41 passes only ``num_cpus``, ``num_gpus``, ``logging_level`` and
        ``log_to_driver`` from the federation config to ``ray.init``, not an address; Ray reads
        ``RAY_ADDRESS`` instead. ``local`` always starts a private instance, where Ray would
        otherwise join the last cluster ``ray start`` recorded on this machine.
        """
        return {"RAY_ADDRESS": self.ray_address or "local"}


def app_dir() -> Path:
    """The Flower App directory (the checkout holding pyproject.toml with [tool.flwr.app])."""
    here = Path(__file__).resolve().parents[2]
    pyproject = here / "pyproject.toml"
    if pyproject.exists() and "flwr" in tomllib.loads(pyproject.read_text()).get("tool", {}):
        return here
    raise FedLoraError(f"cannot find the fedlora Flower App next to {here}; install fedlora from "
                       f"a checkout with `pip install -e .`")


def flwr_env(home: Path) -> dict[str, str]:
    """Environment for every Flower process: project-local home, offline, quiet."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # no `uv sync` per run
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "RAY_DEDUP_LOGS": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    })
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Set by the test suite for every test not marked `slow` (tests/conftest.py), so that
# `make test-fast` cannot start a real simulation or deployment without saying so.
FAST_TEST_ENV = "FEDLORA_FAST_TEST"
SERVERS = ("flower-superlink", "flower-supernode")


def refuse_in_fast_tests(cmd: Sequence[str]) -> None:
    """Raise :class:`RunFailed` before a SuperLink or SuperNode starts under ``FEDLORA_FAST_TEST``
    (a test not marked ``slow``); every other command, and every other time, passes."""
    test = os.environ.get(FAST_TEST_ENV)
    name = Path(cmd[0]).name if cmd else ""
    if test and name in SERVERS:
        raise RunFailed(f"{test} starts {name} (a real Flower simulation or deployment) but is "
                        f"not marked slow; mark it @pytest.mark.slow (make test-fast skips those)")


def console_script(name: str) -> str:
    """Console script next to this interpreter (works inside venvs not on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class ManagedSuperLink:
    """A ``flower-superlink --simulation`` we started, under a
    :class:`~fedlora.runtime.reaper.Guarded`
    reaper: it, SuperExec, the simulation and Ray are all stopped when the run ends, however the
    launcher ends (return, exception, Ctrl-C, SIGTERM or SIGKILL)."""

    process: Guarded
    port: int
    log_path: Path

    @classmethod
    def start(cls, home: Path, env: Mapping[str, str], timeout: float = 60.0) -> ManagedSuperLink:
        """Start a simulation SuperLink on a free port with its log in ``home``; wait up to
        ``timeout`` seconds until it listens (:class:`RunFailed` if it exits or never does).
        """
        port = free_port()
        home.mkdir(parents=True, exist_ok=True)
        log_path = home / "superlink.log"
        log_path.write_text("")
        cmd = [console_script("flower-superlink"), "--insecure", "--simulation",
               "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
               "--disable-runtime-dependency-installation"]
        refuse_in_fast_tests(cmd)
        link = cls(Guarded(cmd, env=dict(env), log_path=log_path), port, log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if link.process.poll() is not None:
                raise RunFailed(f"flower-superlink exited ({link.process.poll()}); see {log_path}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return link
            except OSError:
                time.sleep(0.2)
        link.stop()
        raise RunFailed(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout}s")

    def stop(self) -> None:
        """Stop the SuperLink and everything it started."""
        self.process.stop()


def write_connection(home: Path, port: int, *, connection: str = CONNECTION,
                     root_certificates: Path | None = None) -> None:
    """Register our SuperLink as a connection in ``$FLWR_HOME/config.toml``.

    With ``root_certificates`` (the CA that signed the SuperLink's certificate) the ``flwr``
    CLI talks TLS to it; otherwise the connection is insecure (loopback only).
    """
    home.mkdir(parents=True, exist_ok=True)
    security = (f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}\n"
                if root_certificates else "insecure = true\n")
    (home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{connection}"\n\n'
        f"[superlink.{connection}]\n"
        f'address = "127.0.0.1:{port}"\n'
        + security
    )


def flwr_cli(args: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 120
          ) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI with ``args`` in ``cwd`` (output captured, ``timeout`` seconds)."""
    return subprocess.run([console_script("flwr"), *args], env=dict(env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def json_tail(text: str) -> Any:
    """The JSON object that ends ``text`` (``flwr --format json`` output after its log lines);
    :class:`RunFailed` when there is none.
    """
    start = text.find("{")
    if start < 0:
        raise RunFailed(f"unexpected flwr output: {text.strip()[-500:]}")
    return json.loads(text[start:])


def submit_run(run_config: Path, env: Mapping[str, str], cwd: Path, *extra: str,
               connection: str = CONNECTION) -> int:
    """Submit the app in ``cwd`` with ``flwr run`` (``extra``: more flags); return the run id."""
    submitted = flwr_cli(["run", ".", connection, "--run-config", str(run_config), *extra,
                          "--format", "json"], env, cwd)
    if submitted.returncode != 0:
        raise RunFailed(f"flwr run failed: {(submitted.stdout + submitted.stderr)[-2000:]}")
    payload = json_tail(submitted.stdout)
    if "run-id" not in payload:
        raise RunFailed(f"flwr run was refused: {payload.get('error-message', payload)}")
    return int(payload["run-id"])


def run_status(run_id: int, env: Mapping[str, str], cwd: Path,
               connection: str = CONNECTION) -> str:
    """The run's status from ``flwr ls``; "unknown" when that fails or times out (a loaded
    machine), so that the caller asks again instead of losing the run."""
    try:
        res = flwr_cli(["ls", connection, "--run-id", str(run_id), "--format", "json"], env,
                       cwd)
    except subprocess.TimeoutExpired:
        return "unknown"
    if res.returncode != 0:
        return "unknown"
    payload = json_tail(res.stdout)
    runs = payload.get("runs") or []
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


class StatusPoller:
    """The run's final status, without paying for a ``flwr ls`` process every poll.

    Each ``flwr ls`` starts a Python process that imports Flower (~1.1 s of CPU here): on a
    2-core machine, asking often takes CPU the clients train on. The ServerApp writes
    ``summary.json`` when it completes or fails, so the status is asked for every
    ``after_marker`` seconds once that file exists, and otherwise only every ``every`` seconds
    (to notice a run that died without writing it, e.g. a simulation that could not start).
    """

    def __init__(self, run_id: int, env: Mapping[str, str], cwd: Path, output_dir: Path,
                 connection: str = CONNECTION, every: float = 30.0,
                 after_marker: float = 1.0) -> None:
        self.run_id, self.env, self.cwd, self.connection = run_id, env, cwd, connection
        self.marker = output_dir / "summary.json"
        self.every, self.after_marker = every, after_marker
        self.last = time.monotonic()
        self.status = "unknown"

    def finished(self) -> bool:
        """Whether the run has finished, asking ``flwr ls`` at most every ``every`` seconds (more
        often once the ServerApp's marker file exists); the status is kept in ``status``.
        """
        wait = self.after_marker if self.marker.exists() else self.every
        if time.monotonic() - self.last >= wait:
            self.status = run_status(self.run_id, self.env, self.cwd, self.connection)
            self.last = time.monotonic()
        return self.status.startswith("finished")


def run_logs(run_id: int, env: Mapping[str, str], cwd: Path,
             connection: str = CONNECTION, timeout: float = 60) -> str:
    """The run's log from ``flwr log``. The log is a record, not the result: when fetching it
    times out (``flwr log`` on a loaded machine), a line saying so is returned instead of
    failing a run whose metrics and adapter are already written."""
    try:
        res = flwr_cli(["log", str(run_id), connection, "--show"], env, cwd, timeout=timeout)
    except subprocess.TimeoutExpired:
        return (f"fedlora: `flwr log {run_id}` did not answer within {timeout:g} s; the run's "
                f"log was not kept (its metrics, summary and adapter are in the output "
                f"directory)\n")
    return res.stdout + res.stderr


class SharedSuperLink:
    """One ``flower-superlink --simulation`` that many runs are submitted to in turn (a sweep).

    Starting a SuperLink, and stopping it with everything under it, costs seconds per run; a
    sweep of tens of cells pays that once here. Each run still gets its own simulation process
    (SuperExec starts one per submitted run, with its own Ray instance), so a run's results do
    not depend on the runs before it. :meth:`link` starts the SuperLink on first use and
    starts a fresh one whenever the last has exited, so a cell that kills it costs only
    itself. Use as a context manager, or call :meth:`stop`.
    """

    def __init__(self, home: Path, placement: Placement) -> None:
        self.home, self.placement = home, placement
        self.env = flwr_env(home)
        self._link: ManagedSuperLink | None = None
        self.starts = 0  # SuperLinks started so far (one, unless a run took one down)

    def link(self) -> ManagedSuperLink:
        """The running SuperLink, (re)started when there is none or it exited."""
        if self._link is not None and self._link.process.poll() is not None:
            self._link.stop()
            self._link = None
        if self._link is None:
            self._link = ManagedSuperLink.start(self.home,
                                                {**self.env, **self.placement.environment()})
            write_connection(self.home, self._link.port)
            self.starts += 1
        return self._link

    def stop(self) -> None:
        """Stop the shared SuperLink, if one runs."""
        if self._link is not None:
            self._link.stop()
            self._link = None

    def __enter__(self) -> SharedSuperLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_simulation(run_config_file: Path, output_dir: Path, num_supernodes: int,
                   placement: Placement, home: Path,
                   on_round: Callable[[dict[str, Any]], None] | None = None,
                   poll_s: float = 0.25, shared: SharedSuperLink | None = None
                   ) -> list[dict[str, Any]]:
    """Run one simulation to completion; return the metrics records.

    With ``shared``, the run is submitted to that sweep-wide SuperLink (``home`` and
    ``placement`` are then the shared link's, and it stays up after the run); otherwise a
    private SuperLink is started in ``home`` and stopped when the run ends.

    Raises :class:`RunFailed` with the reason (and the tail of the run's log) on failure.
    """
    if shared is not None and shared.placement != placement:
        raise FedLoraError(f"a shared SuperLink runs its clients with {shared.placement}; this "
                           f"run asks for {placement}: give it its own SuperLink instead")
    home = shared.home if shared is not None else home
    env = flwr_env(home)
    cwd = app_dir()
    link = shared.link() if shared is not None else ManagedSuperLink.start(
        home, {**env, **placement.environment()})
    try:
        if shared is None:
            write_connection(home, link.port)
        (output_dir / "summary.json").unlink(missing_ok=True)  # written when the run completes
        run_id = submit_run(run_config_file, env, cwd, "--federation-config",
                            placement.federation_config(num_supernodes))
        (output_dir / "flwr-run-id").write_text(str(run_id))
        records: list[dict[str, Any]] = []

        def forward_new_rounds() -> None:
            fresh = read_metrics(output_dir)
            for record in fresh[len(records):]:
                if on_round:
                    on_round(record)
            records[:] = fresh

        poller = StatusPoller(run_id, env, cwd, output_dir)
        while not poller.finished():
            forward_new_rounds()
            if link.process.poll() is not None:
                raise RunFailed(f"the SuperLink exited during the run; see {link.log_path}")
            time.sleep(poll_s)
        status = poller.status
        forward_new_rounds()
        logs = run_logs(run_id, env, cwd)
        (output_dir / "run.log").write_text(logs)
        if status != "finished:completed":
            raise RunFailed(f"run {run_id} ended with status {status!r}:\n{failure_reason(logs)}")
        return records
    finally:
        if shared is None:
            link.stop()


def failure_reason(logs: str, lines: int = 12) -> str:
    """The exception that ended the run (from the run's log), with the lines before it."""
    kept = [line for line in logs.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(kept)
              if re.match(r"^[\w.]+(Error|Exception|Exit\w*): ", line.strip())]
    end = errors[-1] + 1 if errors else len(kept)
    return "\n".join(kept[max(0, end - lines):end])
