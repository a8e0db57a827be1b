"""Local training and evaluation loops (plain torch, no Flower)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlora.data import collate


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
    """Train the model's trainable parameters for ``spec.steps`` AdamW steps.

    With ``proximal_mu > 0`` (FedProx) the loss adds mu/2 * ||theta - theta_global||^2 over the
    trainable parameters, ``global_params`` holding theta_global by parameter name.
    Returns the mean training loss, the number of examples and the wall time.
    """
    device = next(model.parameters()).device
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=spec.lr, weight_decay=spec.weight_decay)
    anchors = ({n: global_params[n].to(device) for n in params} if spec.proximal_mu > 0
               and global_params is not None else None)
    torch.manual_seed(spec.seed)  # LoRA dropout
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for batch in _batches(examples, spec.batch_size, spec.steps, spec.seed):
        inputs = {k: v.to(device) for k, v in collate(batch, pad_token_id).items()}
        loss = model(**inputs).loss
        losses.append(float(loss.detach()))
        if anchors is not None:
            prox = sum(((p - anchors[n]) ** 2).sum() for n, p in params.items())
            loss = loss + 0.5 * spec.proximal_mu * prox
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params.values(), spec.max_grad_norm)
        optimizer.step()
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
