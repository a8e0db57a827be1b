"""Local training and evaluation loops (plain torch, no Flower)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlora.errors import ConfigError
from fedlora.learning import hetlora_prune
from fedlora.learning.data import collate

# bitsandbytes optimizers behind train.optimizer (torch's AdamW is "adamw")
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                  "paged_adamw_32bit": "PagedAdamW32bit"}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainSpec:
    """Plain arguments of one local training run."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    proximal_mu: float = 0.0
    seed: int = 0
    grad_accum_steps: int = 1  # micro-batches of batch_size per optimizer step
    optimizer: str = "adamw"  # or a key of BNB_OPTIMIZERS
    autocast: str = "none"  # "bf16" / "fp16"
    prune_lambda: float = 0.0  # HetLoRA self-pruning: λ of the tail-norm regulariser (0 = off)
    prune_gamma: float = 0.99  # its decay factor γ (fedlora.learning.hetlora_prune)


def check_support(spec: TrainSpec, device: torch.device | str) -> None:
    """Raise :class:`ConfigError` when ``spec`` asks for kernels ``device`` does not have.

    Called before the first forward pass, so a node that cannot run the run's memory knobs
    fails its first round at once, with the key to change, instead of mid-training.

    * bitsandbytes 0.50 has CPU and CUDA kernels for its 8-bit AdamW; paging (CUDA unified
      memory, evicting optimizer state to host memory under GPU memory pressure) exists on CUDA
      only (on CPU bitsandbytes silently falls back to unpaged state: refused here, since the
      run would not get what it asked for).
    * bf16 autocast needs a GPU with bfloat16 support (compute capability >= 8.0) on CUDA;
      CPU autocast runs bf16 and fp16.
    """
    kind = torch.device(device).type
    if spec.optimizer != "adamw":
        if spec.optimizer not in BNB_OPTIMIZERS:
            raise ConfigError(f"train.optimizer must be adamw or one of "
                              f"{', '.join(BNB_OPTIMIZERS)}; got {spec.optimizer!r}")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"train.optimizer={spec.optimizer} needs bitsandbytes, which is not installed "
                f"on this node: pip install 'fedlora[qlora]' (or set train.optimizer=adamw)"
            ) from None
        if spec.optimizer.startswith("paged_") and kind != "cuda":
            raise ConfigError(
                f"train.optimizer={spec.optimizer} pages optimizer state between GPU and host "
                f"memory, which bitsandbytes does only on CUDA; this node trains on {kind}. "
                f"Use train.optimizer=adamw_8bit (8-bit state, runs on CPU) or adamw")
        if kind not in ("cpu", "cuda"):
            raise ConfigError(f"train.optimizer={spec.optimizer}: bitsandbytes has CPU and "
                              f"CUDA kernels, this node trains on {kind}; use adamw")
    if spec.autocast != "none":
        if spec.autocast not in AUTOCAST_DTYPES:
            raise ConfigError(f"train.autocast must be none, bf16 or fp16; got "
                              f"{spec.autocast!r}")
        if kind == "cuda" and spec.autocast == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.autocast=bf16 needs a GPU with bfloat16 support "
                              "(compute capability >= 8.0); use train.autocast=fp16 or none")
        if kind not in ("cpu", "cuda"):
            raise ConfigError(f"train.autocast={spec.autocast} is supported on CPU and CUDA; "
                              f"this node trains on {kind}: use train.autocast=none")


def make_optimizer(params: Sequence[torch.nn.Parameter], spec: TrainSpec
                   ) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, decoupled weight decay) over ``params``: torch's, or
    bitsandbytes' 8-bit / paged variant (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
    Quantization"; paging: Dettmers et al. 2023, QLoRA). All use betas (0.9, 0.999) and
    eps 1e-8. Deviation: bitsandbytes keeps the state of tensors with fewer than 4,096
    elements in 32 bits (its ``min_8bit_size``), so a small model's rank-8 factors get 32-bit
    state even with adamw_8bit; a 7B model's (8 x 4,096 and up) get 8-bit state.
    """
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    import bitsandbytes as bnb

    cls = getattr(bnb.optim, BNB_OPTIMIZERS[spec.optimizer])
    return cls(params, lr=spec.lr, betas=(0.9, 0.999), eps=1e-8,
               weight_decay=spec.weight_decay)


def _process_group(model: Any) -> tuple[int, int]:
    """(rank, world size) when ``model`` is wrapped in DistributedDataParallel, else (0, 1)."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def _shard(batch: Sequence[dict], rank: int, world: int) -> list[dict]:
    """Rank ``rank``'s contiguous share of a step batch (sizes differ by at most one)."""
    if len(batch) < world:
        raise ConfigError(f"a step of {len(batch)} examples cannot be shared by {world} "
                          f"processes: raise train.batch-size x train.grad-accum-steps to at "
                          f"least procs-per-node")
    bounds = np.linspace(0, len(batch), world + 1).round().astype(int)
    return list(batch[bounds[rank]:bounds[rank + 1]])


def _loss_items(inputs: Mapping[str, torch.Tensor]) -> int:
    """What a model's mean loss averages over: examples (class labels, 1-D) or predicted tokens
    (causal LM labels, 2-D: the labels after the first position that are not -100)."""
    labels = inputs["labels"]
    if labels.dim() == 1:
        return int(labels.shape[0])
    return int((labels[:, 1:] != -100).sum())


def _batches(examples: Sequence[dict], batch_size: int, steps: int, seed: int):
    """``steps`` batches drawn by cycling through seeded permutations of the examples."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order.extend(rng.permutation(len(examples)).tolist())
        idx, order = order[:batch_size], order[batch_size:]
        yield [examples[i] for i in idx]


def train(model: Any, examples: Sequence[dict], spec: TrainSpec, pad_token_id: int,
          global_params: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Train the model's trainable parameters for ``spec.steps`` optimizer steps.

    Each step draws ``grad_accum_steps * batch_size`` examples and runs them as
    ``grad_accum_steps`` micro-batches of ``batch_size``, whose gradients add up before the
    step. A micro-batch's mean loss is weighted by its share of the step's loss items
    (examples, or predicted tokens for a causal LM), so the step's gradient is that of the mean
    loss over the whole step batch: with dropout 0, accumulation changes only float rounding
    and the padding width of each micro-batch (masked), never the update. With dropout > 0 the
    masks are drawn per micro-batch (the same distribution, other draws).

    With ``proximal_mu > 0`` (FedProx) the loss adds mu/2 * ||theta - theta_global||^2 over the
    trainable parameters once per step, ``global_params`` holding theta_global by parameter
    name. With ``prune_lambda > 0`` (HetLoRA's rank self-pruning) it adds
    ``prune_lambda * Σ_modules ‖B[:, tail] A[tail]‖_F`` once per step
    (:func:`fedlora.learning.hetlora_prune.tail_penalty`). ``autocast`` runs forward and backward
    under :func:`torch.autocast` (fp16 with a
    dynamic loss scale: a step whose gradients overflow is skipped and the scale halved).
    Returns the mean training loss, the number of examples and the wall time.
    """
    device = next(model.parameters()).device
    check_support(spec, device)
    inner = getattr(model, "module", model)  # a DistributedDataParallel wrapper's model
    params = {n: p for n, p in inner.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(list(params.values()), spec)
    anchors = ({n: global_params[n].to(device) for n in params} if spec.proximal_mu > 0
               and global_params is not None else None)
    amp = AUTOCAST_DTYPES.get(spec.autocast)
    scaler = torch.amp.GradScaler(device.type, enabled=spec.autocast == "fp16")
    torch.manual_seed(spec.seed)  # LoRA dropout
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    k, micro = spec.grad_accum_steps, spec.batch_size
    rank, world = _process_group(model)
    for batch in _batches(examples, micro * k, spec.steps, spec.seed):
        if world == 1:
            parts = [collate(batch[i * micro:(i + 1) * micro], pad_token_id) for i in range(k)]
            items = [_loss_items(part) for part in parts]
            total = max(sum(items), 1)
        else:  # every rank draws the whole step batch (same seed) and trains its own shard
            total = max(_loss_items(collate(batch, pad_token_id)), 1)
            shard = _shard(batch, rank, world)
            parts = [collate(shard[i:i + micro], pad_token_id)
                     for i in range(0, len(shard), micro)]
            items = [_loss_items(part) for part in parts]
        optimizer.zero_grad(set_to_none=True)
        step_loss, proximal = 0.0, anchors is not None
        prune = spec.prune_lambda > 0
        for index, (part, n) in enumerate(zip(parts, items, strict=True)):
            if world == 1 and k > 1 and n == 0:
                continue  # nothing to predict (its mean loss would be 0/0)
            inputs = {key: v.to(device) for key, v in part.items()}
            last = index == len(parts) - 1  # DDP all-reduces the gradients on the last part
            sync = contextlib.nullcontext() if world == 1 or last else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp or torch.float32,
                                    enabled=amp is not None):
                    loss = model(**inputs).loss
                if world > 1:  # DDP averages over ranks: scale the shard's share back up
                    loss = torch.nan_to_num(loss) * (n * world / total)
                elif k > 1:
                    loss = loss * (n / total)
                step_loss += float(loss.detach()) / world
                if proximal and rank == 0:  # once per step (its gradient reaches every rank)
                    prox = sum(((p - anchors[name]) ** 2).sum() for name, p in params.items())
                    loss = loss + 0.5 * spec.proximal_mu * prox * world
                    proximal = False
                if prune and rank == 0:  # once per step, like the proximal term
                    penalty = hetlora_prune.tail_penalty(params, spec.prune_gamma)
                    if penalty is not None:
                        loss = loss + spec.prune_lambda * penalty * world
                    prune = False
                scaler.scale(loss).backward()
        losses.append(step_loss)
        if spec.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params.values(), spec.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    if world > 1:  # each rank holds its shard's share of every step's loss
        import torch.distributed as dist

        shares = torch.tensor(losses, dtype=torch.float64, device=device)
        dist.all_reduce(shares)
        losses = shares.tolist()
    model.eval()
    return {"train-loss": float(np.mean(losses)), "num-examples": len(examples),
            "train-steps": spec.steps, "train-seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model: Any, examples: Sequence[dict], batch_size: int, pad_token_id: int,
             task: str) -> dict[str, float]:
    """Held-out loss, plus accuracy (classification) or perplexity (causal LM)."""
    device = next(model.parameters()).device
    model.eval()
    total_loss, total_weight, correct = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        inputs = {k: v.to(device) for k, v in collate(examples[i : i + batch_size],
                                                      pad_token_id).items()}
        out = model(**inputs)
        if task == "seq-cls":
            n = inputs["labels"].shape[0]
            correct += int((out.logits.argmax(-1) == inputs["labels"]).sum())
        else:
            # loss is a mean over predicted tokens: weight it by their count
            n = int((inputs["labels"][:, 1:] != -100).sum())
        total_loss += float(out.loss) * n
        total_weight += n
    loss = total_loss / max(total_weight, 1)
    metrics = {"eval-loss": loss, "eval-examples": len(examples)}
    if task == "seq-cls":
        metrics["eval-accuracy"] = correct / max(len(examples), 1)
    else:
        metrics["eval-perplexity"] = math.exp(min(loss, 50.0))
    return metrics
