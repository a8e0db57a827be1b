"""Multi-process clients: one node's local training on N ``torch.distributed`` processes.

With ``procs-per-node = N`` in a node's config, the ClientApp process is rank 0 of a process
group of N (gloo on CPU, NCCL on GPUs: rank r uses the node's r-th visible GPU). Rank 0 alone
talks to Flower: it starts N - 1 helper processes (``torch.multiprocessing`` spawn, the
``torchrun`` environment contract: ``MASTER_ADDR``/``MASTER_PORT``, rank, world size), sends them
the incoming adapter by ``torch.distributed.broadcast``, and trains under
:class:`~torch.nn.parallel.DistributedDataParallel` over the trainable LoRA parameters (the
frozen base is excluded from DDP's synchronisation). The helpers return nothing.

Every rank draws the same step batches (the same seeded sampler as one process) and trains its
contiguous shard of each; each shard's mean loss is weighted by its share of the step's loss
items, so the all-reduced gradient is that of the whole step batch: N processes take the
node's usual steps with the same global batch (:func:`fedlora.learning.training.train`).

Failure: a helper that dies breaks rank 0's next collective (gloo reports the closed peer, or
the group's ``timeout`` expires); rank 0 then stops the other helpers and raises, so the node
sends an error reply and takes the next round. Helpers are daemonic children of the ClientApp
process and exit with it; each also stops when its group is destroyed.

Deviations: helpers load the base model in every round (the warm worker keeps rank 0's only);
base-modifying rules (``flora``, ``fedex``) are refused, as helpers do not hold the base
correction; rank 0's optimizer state is the one every rank computes (identical gradients).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

TIMEOUT_S = 120.0  # a collective waiting this long for a lost process fails
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _join(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world)})
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _adapter_params(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """Every parameter of the active adapter (factors and saved heads), trainable or not."""
    active = model.active_adapter
    return [(n, p) for n, p in model.named_parameters()
            if f".{active}." in n and ("lora_" in n or "modules_to_save" in n)]


def _train(model: Any, tokenizer: Any, examples: list[dict], spec: Any, trainable: str
           ) -> dict[str, float]:
    """The collective part, the same on every rank: broadcast, wrap, train."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from fedlora.learning import lora, training

    lora.set_trainable(model, train_a="a" in trainable, train_b="b" in trainable)
    with torch.no_grad():
        for _, param in _adapter_params(model):  # rank 0's incoming adapter, to every rank
            dist.broadcast(param.data, src=0)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device = next(model.parameters()).device
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None, init_sync=False, broadcast_buffers=False)
    anchors = None
    if spec.proximal_mu > 0:
        anchors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return training.train(wrapped, examples, spec, tokenizer.pad_token_id, anchors)


def helper(flat: Mapping[str, Any], node_config: Mapping[str, Any], spec: Any, trainable: str,
           port: int, rank: int, world: int) -> None:
    """Rank ``rank`` > 0: load the node's model and data, join, train, leave."""
    import torch.distributed as dist

    from fedlora import config
    from fedlora.learning import client_round as client

    cfg = config.from_flat(flat)
    node = client.Node.from_configs(cfg, node_config)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    model, tokenizer = client.load_model(cfg, node)
    examples = client.train_examples(cfg, node, tokenizer)
    _join(rank, world, port)
    try:
        _train(model, tokenizer, examples, spec, trainable)
    finally:
        dist.destroy_process_group()


def train_round(flat: Mapping[str, Any], node_config: Mapping[str, Any], model: Any,
                tokenizer: Any, examples: list[dict], arrays: Mapping[str, np.ndarray],
                spec: Any, trainable: str, procs: int, target: Any = None
                ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Rank 0 (this process): start the helpers, train with them, return the adapter.

    ``target`` replaces :func:`helper` (tests: a helper that dies)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from fedlora.learning import lora

    lora.load_adapter_arrays(model, arrays)
    port = _free_port()
    context = mp.get_context("spawn")
    helpers = [context.Process(target=target or helper, daemon=True,
                               args=(dict(flat), dict(node_config), spec, trainable, port, r,
                                     procs)) for r in range(1, procs)]
    for proc in helpers:
        proc.start()
    joined = False
    try:
        _join(0, procs, port)
        joined = True
        metrics = _train(model, tokenizer, examples, spec, trainable)
    except Exception as exc:
        dead = [f"rank {r} (exit {p.exitcode})" for r, p in enumerate(helpers, 1)
                if p.exitcode is not None and p.exitcode != 0]
        raise RuntimeError(
            f"procs-per-node = {procs}: distributed training failed"
            + (f"; {', '.join(dead)} died" if dead else "") + f": {exc}") from exc
    finally:
        if joined:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        for proc in helpers:  # after the last collective a helper has nothing left to give
            proc.join(timeout=60 if joined else 0)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    model.eval()
    return lora.adapter_arrays(model), {**metrics, "procs-per-node": procs}
