"""The peer of P3, P5 and P6: a plain single-process PEFT training loop.

Only transformers, peft and torch — nothing from fedlora — written the way a user would write
it: load the base model, wrap it with ``get_peft_model``, tokenize once, then for every step
pad a batch with the tokenizer (dynamic padding), forward, backward, clip, AdamW step. Batches
are drawn by cycling through seeded permutations of the examples (a reshuffle every epoch), so
with the same seeds and initial adapter it trains exactly what fedlora's client trains.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class PlainSetup:
    """The model and LoRA settings of the preset being compared (plain arguments)."""

    model_dir: str
    num_labels: int
    num_hidden_layers: int = 0  # 0 = all of the model's layers
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")


def build(setup: PlainSetup, seed: int = 0) -> tuple[Any, Any]:
    """A sequence-classification base with a fresh LoRA adapter, and its tokenizer."""
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()  # no load report for the new classifier head
    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)  # the new classifier head and the LoRA init
    overrides: dict[str, Any] = {"num_labels": setup.num_labels}
    if setup.num_hidden_layers:
        overrides["num_hidden_layers"] = setup.num_hidden_layers
    config = AutoConfig.from_pretrained(setup.model_dir, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(setup.model_dir, config=config)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=setup.r, lora_alpha=setup.alpha,
                      lora_dropout=setup.dropout, target_modules=list(setup.target_modules))
    return get_peft_model(base, lora), tokenizer


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated, unpadded."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def adapter(model: Any) -> dict[str, np.ndarray]:
    """The adapter's trainable state (LoRA factors + classifier) as float32 arrays."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().numpy().copy()
            for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def load_adapter(model: Any, arrays: Mapping[str, np.ndarray]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, {k: torch.from_numpy(v) for k, v in arrays.items()})


def train(model: Any, tokenizer: Any, ids: Sequence[list[int]], labels: Sequence[int], *,
          steps: int, batch_size: int, lr: float, seed: int, weight_decay: float = 0.0,
          max_grad_norm: float = 1.0) -> tuple[list[float], list[float]]:
    """``steps`` AdamW steps on the trainable parameters; (losses, seconds of each step).

    The first step's seconds include building the optimizer."""
    start = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses, seconds = [], []
    torch.manual_seed(seed)  # dropout
    model.train()
    for _ in range(steps):
        while len(order) < batch_size:
            order.extend(rng.permutation(len(ids)).tolist())
        batch, order = order[:batch_size], order[batch_size:]
        inputs = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
        loss = model(**inputs, labels=torch.tensor([labels[i] for i in batch])).loss
        losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
    model.eval()
    return losses, seconds


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, ids: Sequence[list[int]], labels: Sequence[int],
             batch_size: int) -> float:
    """Accuracy on held-out examples."""
    model.eval()
    correct = 0
    for i in range(0, len(ids), batch_size):
        inputs = tokenizer.pad({"input_ids": list(ids[i:i + batch_size])}, return_tensors="pt")
        predicted = model(**inputs).logits.argmax(-1)
        correct += int((predicted == torch.tensor(labels[i:i + batch_size])).sum())
    return correct / max(len(ids), 1)
