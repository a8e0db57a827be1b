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

import json
import logging
import socket
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
from fedlora.runtime.deploy_checks import (
    DeployError,
    distinct_free_ports,
    ensure_port_free,
    node_count,
    node_data_paths,
    node_ranks,
    tls_setting,
    visible_devices,
)
from fedlora.runtime.deploy_nodes import (  # noqa: F401 - flower_version, MAX_... re-exported
    HOST,
    MAX_WORKER_RESTARTS,
    NodeExit,
    NodeSpec,
    Processes,
    Workers,
    exit_reason,
    first_exit,
    flower_version,
    sleep_watching,
    warm_setting,
)
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
    run_logs,
    submit_run,
    write_connection,
)
from fedlora.runtime.reaper import Guarded

CONNECTION = "fedlora-deploy"

log = logging.getLogger(__name__)


class SupernodeFailed(RunFailed):
    """A SuperNode exited before it joined the federation (e.g. its key is not registered)."""

    def __init__(self, node: str, status: int, log_path: Path, reason: str) -> None:
        super().__init__(f"{node} exited before joining the federation (exit status {status}):"
                         f"\n{reason}\nsee {log_path}")
        self.node, self.status, self.log_path = node, status, log_path


@dataclass
class LaunchResult:
    """What a completed launch returns: every ``metrics.jsonl`` record, the Flower run id and
    the SuperNodes lost on the way.
    """
    records: list[dict[str, Any]]
    run_id: int
    lost_nodes: list[NodeExit] = field(default_factory=list)


def superlink_command(port: int, creds: certs.Credentials | None, auth: bool) -> list[str]:
    """The ``flower-superlink`` command line of a deployment on 127.0.0.1:``port``: TLS from
    ``creds`` (insecure without), SuperNode authentication with ``auth``.
    """
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



# ---------------------------------------------------------------------- processes


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
    """The ids of the SuperNodes the SuperLink lists as online (empty when ``flwr`` fails)."""
    res = flwr_cli(["supernode", "list", CONNECTION, "--format", "json"], env, cwd)
    if res.returncode != 0:
        return set()
    try:
        nodes = json_tail(res.stdout).get("nodes") or []
    except (RunFailed, ValueError):
        return set()
    return {int(n["node-id"]) for n in nodes if n.get("status") == "online"}


def _wait_online(specs: Sequence[NodeSpec], procs: Sequence[Guarded], link: Guarded,
                 link_log: Path, env: Mapping[str, str], cwd: Path, timeout: float,
                 poll_s: float) -> None:
    deadline = time.monotonic() + timeout
    online: set[int] = set()
    while True:
        gone = first_exit(specs, procs, set())
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
        sleep_watching([*procs, link], poll_s)


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
    from fedlora.runtime.run_setup import write_run_config

    try:
        refuse_in_deployment(flat)
    except FedLoraError as exc:
        raise DeployError(str(exc)) from None
    plan = _plan(flat, out=out, nodes=nodes, gpus=gpus, tls=tls, auth=auth, certs_dir=certs_dir,
                 data_paths=data_paths, ranks=ranks, port=port, procs_per_node=procs_per_node)
    warn = on_warning or log.warning
    warm, warm_note = warm_setting(warm)
    if warm_note:
        warn(warm_note)
    if settings_record is not None:  # what `fedlora launch --resume` relaunches with
        plan.out.mkdir(parents=True, exist_ok=True)
        record = {**settings_record, "warm": warm}  # as resolved: a resume runs the same way
        (plan.out / "launch-settings.json").write_text(json.dumps(record, default=str))
    creds, signing_keys = _credentials(plan)
    run_config = write_run_config(plan.flat, plan.out)
    link_port = port or free_port()
    specs = _node_specs(plan, creds, signing_keys, warm, distinct_free_ports(plan.n, {link_port}))
    return _start_and_follow(plan, creds, specs, run_config, link_port, on_round, warn, poll_s,
                             startup_timeout)


@dataclass
class _Plan:
    """A launch's checked inputs: node count, per-node values and the final flat config."""

    n: int
    out: Path
    flat: dict[str, Any]
    tls: bool
    auth: bool
    creds: certs.Credentials | None  # from certs_dir; generated later when TLS needs them
    devices: list[str | None]
    rank_list: list[int] | None
    paths: list[str] | None
    procs_per_node: int


def _plan(flat: Mapping[str, Any], *, out: str | Path, nodes: int | None,
          gpus: Sequence[int] | None, tls: bool | None, auth: bool,
          certs_dir: str | Path | None, data_paths: Sequence[str | Path] | None,
          ranks: Sequence[int] | None, port: int | None, procs_per_node: int) -> _Plan:
    """Check every input :func:`launch` can check before any process starts (its step 1)."""
    from fedlora.runtime.run_setup import finalize

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
    creds = None  # set exactly when TLS is on
    if certs_dir is not None:
        creds = certs.Credentials.at(certs_dir, n)
        creds.require(tls=tls, auth=auth, signing=bool(flat["sign-updates"]))
    if port is not None:
        ensure_port_free(port)
    return _Plan(n, out, flat, tls, auth, creds, devices, rank_list, paths, procs_per_node)


def _credentials(plan: _Plan) -> tuple[certs.Credentials | None, tuple[Path, ...]]:
    """The TLS credentials (generated into ``OUT/certs`` when none were given) and each node's
    update-signing key; sets ``signing-keys`` in ``plan.flat`` when updates are signed."""
    (plan.out / "logs").mkdir(parents=True, exist_ok=True)
    creds = plan.creds
    signing = bool(plan.flat["sign-updates"])
    if plan.tls and creds is None:
        creds = certs.generate(plan.out / "certs", nodes=plan.n if plan.auth or signing else 0,
                               force=True)
    signing_keys: tuple[Path, ...] = ()
    if signing:
        keys = creds or certs.generate_signing_keys(plan.out / "certs", nodes=plan.n, force=True)
        signing_keys = keys.signing_keys
        plan.flat["signing-keys"] = plan.flat["signing-keys"] or str(keys.directory)
    return creds, signing_keys


def _node_specs(plan: _Plan, creds: certs.Credentials | None, signing_keys: Sequence[Path],
                warm: bool, node_ports: Sequence[int]) -> list[NodeSpec]:
    """One :class:`NodeSpec` per SuperNode (its FLWR_HOME directory created)."""
    logs, home, auth = plan.out / "logs", plan.out / ".flwr", plan.auth
    specs = [NodeSpec(index=i, num_nodes=plan.n, port=node_ports[i],
                      home=home / f"supernode-{i}", log_path=logs / f"supernode-{i}.log",
                      rank=plan.rank_list[i] if plan.rank_list else None,
                      data_path=plan.paths[i] if plan.paths else None, gpu=plan.devices[i],
                      private_key=creds.node_keys[i] if auth and creds else None,
                      public_key=creds.node_public_keys[i] if auth and creds else None,
                      signing_key=signing_keys[i] if signing_keys else None, warm=warm,
                      procs=plan.procs_per_node)
             for i in range(plan.n)]
    for spec in specs:
        spec.home.mkdir(parents=True, exist_ok=True)
    return specs


def _start_and_follow(plan: _Plan, creds: certs.Credentials | None, specs: Sequence[NodeSpec],
                      run_config: Path, link_port: int,
                      on_round: Callable[[dict[str, Any]], None] | None,
                      warn: Callable[[str], None], poll_s: float,
                      startup_timeout: float) -> LaunchResult:
    """Steps 2 to 6 of :func:`launch`: start the SuperLink and SuperNodes, submit the run,
    follow it, and stop every process started, however it ends."""
    out, home = plan.out, plan.out / ".flwr"
    env, cwd = flwr_env(home), app_dir()
    processes = Processes()
    try:
        link_log = out / "logs" / "superlink.log"
        link = processes.start(superlink_command(link_port, creds, plan.auth), env, link_log)
        _wait_listening(link, link_port, link_log, startup_timeout)
        ca_cert = creds.ca_cert if creds else None
        write_connection(home, link_port, connection=CONNECTION, root_certificates=ca_cert)
        node_ids = register_keys(specs, env, cwd)
        node_procs = [processes.start(s.command(f"{HOST}:{link_port}", ca_cert), s.env(env),
                                      s.log_path) for s in specs]
        workers = Workers(specs, env, processes)
        _wait_online(specs, node_procs, link, link_log, env, cwd, startup_timeout, poll_s)
        _write_deployment(out, link_port, plan.tls, plan.auth, creds, specs, node_ids)
        (out / "summary.json").unlink(missing_ok=True)  # written when the run completes
        run_id = submit_run(run_config, env, cwd, connection=CONNECTION)
        (out / "flwr-run-id").write_text(str(run_id))
        return _follow(run_id, out, plan.flat, specs, node_procs, link, link_log, env, cwd,
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
        while gone := first_exit(specs, node_procs, lost):
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
        sleep_watching([*node_procs, link, *(workers.procs.values() if workers else ())],
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
