"""What :func:`fedlora.runtime.deploy.launch` checks before it starts any process: node count,
GPU indices, LoRA ranks, data files, the requested port and the TLS setting."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

from fedlora.errors import FedLoraError
from fedlora.runtime.deploy_nodes import HOST
from fedlora.runtime.launcher import free_port


class DeployError(FedLoraError):
    """A launch cannot start; found before any process was started."""


def node_count(nodes: int | None, gpus: Sequence[int] | None) -> int:
    """The number of SuperNodes: ``nodes``, or one per GPU in ``gpus``; :class:`DeployError`
    when both disagree, neither is given or the count is < 1.
    """
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
    """One LoRA rank per node (a single rank applies to all), or ``None``; :class:`DeployError`
    when the count matches neither.
    """
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
    """Raise :class:`DeployError` unless ``port`` is in 1..65535 and free on 127.0.0.1."""
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


def distinct_free_ports(count: int, taken: set[int]) -> list[int]:
    """``count`` distinct free ports, none of them in ``taken``."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in taken and port not in ports:
            ports.append(port)
    return ports
