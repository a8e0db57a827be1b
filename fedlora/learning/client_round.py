"""Client-side steps of a round, without Flower: load → train → select what leaves the node.

The ClientApp (``clients/app.py``) only moves records in and out of these functions. A process
caches the frozen base model (:class:`~fedlora.learning.lora.ModelCache`), the packaged corpus
split into
partitions (:class:`~fedlora.learning.data.Partitions`, rows selected per client on demand) and the
tokenized examples of the last :data:`CACHED_CLIENTS` clients it served (least recently used
evicted first): a worker serving 1,000 virtual clients holds a bounded amount of data. Nothing
client-specific (adapters, optimizer state) is cached here, because one simulation worker
serves many virtual clients; that lives in each client's Flower ``context.state``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from fedlora.aggregation import LoraFactors
from fedlora.config import RunConfig
from fedlora.errors import ConfigError, DataError
from fedlora.federation.global_adapter import stack
from fedlora.federation.wire_schema import DATA_ERROR, select_outgoing  # noqa: F401 — the ClientApp's names
from fedlora.learning import builders, data, lora, training
from fedlora.runtime.threads import single_threaded_blas

V = TypeVar("V")

CACHED_CLIENTS = 32  # tokenized training sets a process keeps (each ~ samples x max-length ids)


class Lru(Generic[V]):
    """At most ``capacity`` values; the least recently used one is evicted first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._values: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], V]) -> V:
        """The value of ``key``, built with ``build()`` and cached on a miss (evicting the least
        recently used value beyond ``capacity``).
        """
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        value = build()
        self._values[key] = value
        while len(self._values) > self.capacity:
            self._values.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        """Drop every cached value."""
        self._values.clear()


MODELS = lora.ModelCache()
_PARTITIONS: Lru[data.Partitions] = Lru(2)  # (data spec, num-partitions) -> split corpus
_TRAIN: Lru[list[dict]] = Lru(CACHED_CLIENTS)  # tokenized training examples per client
_HELDOUT: Lru[list[dict]] = Lru(4)  # tokenized held-out examples (one for packaged corpora)


def clear_caches() -> None:
    """Drop everything this process caches (base models, split corpora, tokenized examples):
    what a fresh client process starts with."""
    MODELS.clear()
    for cache in (_PARTITIONS, _TRAIN, _HELDOUT):
        cache.clear()


# rules that change the frozen base: under procs-per-node > 1 only rank 0 would hold the change
BASE_MODIFYING = ("flora", "fedex")


def check_procs(strategy: str, procs: int, init: str = "default") -> None:
    """Refuse a ``procs-per-node`` the node cannot run (:mod:`fedlora.learning.ddp` trains with
    it)."""
    if procs < 1:
        raise ConfigError(f"procs-per-node must be >= 1; got {procs}")
    if procs > 1 and (strategy in BASE_MODIFYING or lora.is_base_dependent(init)):
        what = f"lora.init = {init}" if lora.is_base_dependent(init) else f"strategy {strategy!r}"
        raise ConfigError(f"procs-per-node = {procs} cannot run {what}: its base "
                          f"correction lives in rank 0 only; use procs-per-node = 1")
    if procs > 1 and torch.cuda.is_available() and torch.cuda.device_count() < procs:
        raise ConfigError(f"procs-per-node = {procs} needs one GPU per process; this node sees "
                          f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES)")


@dataclass(frozen=True)
class Node:
    """Facts about this client, from the node config (deployment) or run config (simulation)."""

    partition_id: int
    num_partitions: int
    rank: int
    data_path: str = ""
    procs: int = 1  # procs-per-node: torch.distributed processes training this node's rounds

    @classmethod
    def from_configs(cls, cfg: RunConfig, node_config: Mapping[str, Any]) -> Node:
        """The node's facts from its node config (``partition-id``, ``num-partitions``, optional
        ``lora-rank``, ``data-path``, ``procs-per-node``); :class:`ConfigError` when they are
        missing or out of range.
        """
        try:
            pid = int(node_config["partition-id"])
            num = int(node_config["num-partitions"])
        except (KeyError, ValueError) as exc:
            raise ConfigError(
                f"node config needs integer partition-id and num-partitions; got "
                f"{dict(node_config)} (start SuperNodes with --node-config "
                f"\"partition-id=0 num-partitions=2\")"
            ) from exc
        rank = int(node_config.get("lora-rank", cfg.rank_for_partition(pid)))
        if not 0 < rank <= cfg.fl.max_rank:
            raise ConfigError(f"lora-rank {rank} of node {pid} is outside 1..{cfg.fl.max_rank}")
        procs = int(node_config.get("procs-per-node", 1))
        check_procs(cfg.fl.strategy, procs, cfg.lora.init)
        return cls(pid, num, rank, str(node_config.get("data-path", "")), procs)


def load_model(cfg: RunConfig, node: Node) -> tuple[Any, Any]:
    """The node's PEFT model (cached frozen base) and tokenizer.

    The run's memory knobs are checked against this node's device first: a knob without
    kernels here fails before the base model is loaded."""
    training.check_support(builders.train_spec(cfg, 0, node.partition_id), builders.device())
    single_threaded_blas()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    return MODELS.get(builders.model_spec(cfg), builders.adapter_spec(cfg, node.rank))


def _own_files(cfg: RunConfig, node: Node) -> bool:
    return cfg.data.source == "files" or bool(node.data_path)


def _partitions(spec: data.DataSpec, num_partitions: int) -> data.Partitions:
    return _PARTITIONS.get((spec, num_partitions), lambda: data.Partitions(spec, num_partitions))


def train_rows(cfg: RunConfig, node: Node) -> Any:
    """This node's training rows (a ``datasets.Dataset``), from the process's split corpus."""
    spec = builders.data_spec(cfg)
    if _own_files(cfg, node):
        return data.own_split(spec, node.partition_id, node.data_path or None)[0]
    return _partitions(spec, node.num_partitions).train(node.partition_id)


def data_problem(cfg: RunConfig, node: Node) -> str | None:
    """Why this node's own data cannot be trained on (its capability answer says so, and the
    server prints one line per node), or ``None``: the file exists and has the task's columns,
    rows, and labels in ``0..model.num-labels-1``. Packaged corpora are not checked here."""
    if not _own_files(cfg, node):
        return None
    try:
        if cfg.model.task == "seq-cls":
            builders.num_labels(cfg)  # own files need model.num-labels
        train_rows(cfg, node)
    except (DataError, ConfigError) as exc:
        return str(exc)
    return None


def train_examples(cfg: RunConfig, node: Node, tokenizer: Any) -> list[dict]:
    """Tokenized training examples of this node (cached for the last few clients)."""
    spec = builders.data_spec(cfg)
    key = (spec, node.partition_id, node.num_partitions, node.data_path,
           tokenizer.name_or_path, cfg.data.max_length)
    return _TRAIN.get(key, lambda: data.tokenize(train_rows(cfg, node), tokenizer, spec.task,
                                                 cfg.data.max_length))


def heldout_examples(cfg: RunConfig, node: Node, tokenizer: Any) -> list[dict]:
    """Tokenized held-out examples: the node's own split of its files, or the packaged
    corpus's held-out split (the same for every client, so tokenized once per process)."""
    spec = builders.data_spec(cfg)
    own = _own_files(cfg, node)
    key = (spec, node.partition_id if own else None, node.data_path, tokenizer.name_or_path,
           cfg.data.max_length)

    def build() -> list[dict]:
        rows = (data.own_split(spec, node.partition_id, node.data_path or None)[1] if own
                else _partitions(spec, node.num_partitions).heldout)
        return data.tokenize(rows, tokenizer, spec.task, cfg.data.max_length)

    return _HELDOUT.get(key, build)


@dataclass
class BaseState:
    """The base correction this client has applied (kept in ``context.state``)."""

    version: int = 0
    factors: dict[str, LoraFactors] | None = None

    def advance(self, increment: Mapping[str, tuple[np.ndarray, np.ndarray]], start: int,
                end: int) -> BaseState:
        """This state with the server's base-correction ``increment`` (versions ``start..end``)
        stacked on; :class:`ConfigError` when ``start`` is not the version applied here.
        """
        if start != self.version:
            raise ConfigError(f"base correction out of sync: the server sent versions "
                              f"{start}..{end}, this client has applied {self.version}")
        merged = dict(self.factors or {})
        for module, (b, a) in increment.items():
            parts = [merged[module]] if module in merged else []
            merged[module] = stack([*parts, LoraFactors(a=a, b=b, scale=1.0)])
        return BaseState(end, merged)

    def apply_to(self, model: Any, rank: int = 0, run: int = 0) -> None:
        """Give ``model``'s base these corrections (``rank``: the node's with a base-dependent
        init, whose residual depends on it; 0 otherwise). ``run`` (the Flower run id) is part of
        what names the correction: a process that serves several runs with one cached base (a
        warm worker, an in-process sweep) holds version 1 of two runs, which differ."""
        deltas = {m: (f.b, f.a) for m, f in (self.factors or {}).items()}
        lora.set_base_delta(model, deltas, tag=(run, self.version, rank))


def train_round(model: Any, tokenizer: Any, train_examples: list[dict],
                arrays: Mapping[str, np.ndarray], spec: training.TrainSpec,
                trainable: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Load the incoming adapter, train the ``trainable`` factors ("ab", "a" or "b").

    Returns the whole trained adapter (the caller selects what is sent) and the metrics.
    """
    lora.load_adapter_arrays(model, arrays)
    lora.set_trainable(model, train_a="a" in trainable, train_b="b" in trainable)
    anchors = None
    if spec.proximal_mu > 0:
        anchors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        metrics = training.train(model, train_examples, spec, tokenizer.pad_token_id, anchors)
    except torch.OutOfMemoryError as exc:
        free_memory()
        raise MemoryError(
            f"out of memory while training (batch size {spec.batch_size}): lower "
            f"train.batch-size (raise train.grad-accum-steps to keep the step's examples) or "
            f"data.max-length; or set train.gradient-checkpointing=on, "
            f"train.optimizer=paged_adamw_8bit, train.autocast=bf16, or load the base in "
            f"bfloat16 (model.dtype) or 4-bit (model.quantization=nf4); the node freed its "
            f"memory and will take the next round"
        ) from exc
    return lora.adapter_arrays(model), metrics


def free_memory() -> None:
    """Release what a failed step left behind (optimizer state, activations, CUDA cache)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
