"""Turn a :class:`~fedlora.config.RunConfig` into the plain arguments components take."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.learning import assets, data

if TYPE_CHECKING:  # torch, transformers and peft load lazily: `fedlora run` checks the data
    from fedlora.aggregation.patterns import ModulePattern
    from fedlora.learning.lora import (  # and keys before anything imports them
        AdapterSpec,
        ModelSpec,
    )
    from fedlora.learning.training import TrainSpec


def device() -> str:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def data_spec(cfg: RunConfig) -> data.DataSpec:
    """The run's data keys (and its seed and task) as a :class:`fedlora.learning.data.DataSpec`."""
    d = cfg.data
    return data.DataSpec(
        source=d.source, task=cfg.model.task, path=d.path, partitioner=d.partitioner,
        dirichlet_alpha=d.dirichlet_alpha, classes_per_partition=d.classes_per_partition,
        samples_per_client=d.samples_per_client, eval_samples=d.eval_samples,
        test_fraction=d.test_fraction, seed=cfg.fl.seed, heldout_path=d.heldout_path,
        num_labels=cfg.model.num_labels if cfg.model.task == "seq-cls" else 0,
    )


def num_labels(cfg: RunConfig) -> int:
    """Classes of a seq-cls run: ``model.num-labels``, else the labels of the corpus (0 for
    causal-lm); :class:`ConfigError` when neither gives any.
    """
    if cfg.model.task != "seq-cls":
        return 0
    if cfg.model.num_labels:
        return cfg.model.num_labels
    names = data.label_names(data_spec(cfg))
    if not names:
        raise ConfigError("classification on your own files needs model.num-labels (labels are "
                          "0..num-labels-1, or names given in the same sorted order everywhere)")
    return len(names)


def model_spec(cfg: RunConfig) -> ModelSpec:
    """The run's model keys as a :class:`fedlora.learning.lora.ModelSpec` (path resolved, device
    and gradient checkpointing decided here).
    """
    from fedlora.learning.lora import ModelSpec

    return ModelSpec(
        path=assets.resolve_model(cfg.model.name), task=cfg.model.task, dtype=cfg.model.dtype,
        num_labels=num_labels(cfg), num_hidden_layers=cfg.model.num_hidden_layers,
        device=device(), quantization=cfg.model.quantization,
        gradient_checkpointing=gradient_checkpointing(cfg),
    )


def gradient_checkpointing(cfg: RunConfig) -> bool:
    """``train.gradient-checkpointing``: on, off, or auto (on exactly when quantized)."""
    mode = cfg.train.gradient_checkpointing
    return mode == "on" or (mode == "auto" and cfg.model.quantization != "none")


def module_pattern(cfg: RunConfig) -> ModulePattern | None:
    """``lora.rank-pattern`` / ``lora.alpha-pattern`` as a
    :class:`~fedlora.aggregation.patterns.ModulePattern` (reference rank ``lora.r``), or
    ``None`` when neither is set."""
    from fedlora.aggregation.patterns import ModulePattern

    lo = cfg.lora
    if not (lo.rank_pattern or lo.alpha_pattern):
        return None
    return ModulePattern(lo.r, lo.rank_pattern_items(), lo.alpha_pattern_items())


def adapter_spec(cfg: RunConfig, rank: int) -> AdapterSpec:
    """The peft adapter of a client of LoRA rank ``rank`` (its rank pattern scaled to it)."""
    from fedlora.learning.lora import AdapterSpec

    lo = cfg.lora
    pattern = module_pattern(cfg)
    return AdapterSpec(
        r=rank, alpha=lo.alpha, dropout=lo.dropout,
        target_modules=lo.target_module_list if isinstance(lo.target_module_list, str)
        else tuple(lo.target_module_list),
        bias=lo.bias, modules_to_save=tuple(lo.modules_to_save_list),
        use_rslora=lo.use_rslora, use_dora=lo.use_dora, init=lo.init,
        rank_pattern=pattern.scaled_ranks(rank) if pattern else (),
        alpha_pattern=pattern.alphas if pattern else (),
    )


def train_spec(cfg: RunConfig, server_round: int, partition_id: int) -> TrainSpec:
    """The run's training keys as a :class:`fedlora.learning.training.TrainSpec` for one client
    round, seeded by (run seed, ``server_round``, ``partition_id``).
    """
    from fedlora.learning.training import TrainSpec

    t = cfg.train
    # local randomness depends on (run seed, round, partition), never on Flower's node ids
    seed = (cfg.fl.seed * 1_000_003 + server_round * 1_009 + partition_id) % 2**31
    return TrainSpec(steps=t.local_steps, batch_size=t.batch_size, lr=t.lr,
                     weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                     proximal_mu=t.proximal_mu, seed=seed, grad_accum_steps=t.grad_accum_steps,
                     optimizer=t.optimizer, autocast=t.autocast,
                     prune_lambda=cfg.fl.hetlora_prune_lambda if cfg.fl.hetlora_prune else 0.0,
                     prune_gamma=cfg.fl.hetlora_prune_gamma)
