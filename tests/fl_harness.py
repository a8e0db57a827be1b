"""Run the real ServerApp strategy against the real ClientApp, in process (no Ray, no SuperLink)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clients.app import app as client_app
from fedlora import config
from fedlora.learning.evaluator import ServerModel
from server.inprocess import InProcessGrid
from server.strategy import FederatedLora

TINY = {
    "model.num-hidden-layers": 1,
    "data.samples-per-client": 24,
    "data.eval-samples": 32,
    "data.max-length": 32,
    "train.local-steps": 2,
    "train.batch-size": 8,
    "num-server-rounds": 2,
}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    flat = {**config.defaults(), **TINY}
    flat.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return flat


def run_rounds(flat: dict[str, Any], num_nodes: int = 3, *,
               on_reply: Callable | None = None, fail: Callable | None = None,
               node_extra: Callable[[int], dict] | None = None,
               after_round: Callable | None = None):
    """Returns (records, grid, global adapter, server model). ``after_round(server_model)``
    builds the strategy's per-round hook (e.g. :class:`fedlora.learning.evaluator.RoundExtras`)."""
    cfg = config.from_flat(flat)
    nodes = [{"partition-id": i, "num-partitions": num_nodes, **(node_extra(i) if node_extra
                                                               else {})}
             for i in range(num_nodes)]
    grid = InProcessGrid(client_app, nodes, flat, on_reply=on_reply, fail=fail)
    server_model = ServerModel(cfg, cfg.fl.max_rank)
    glob = server_model.initial_global()
    records: list[dict] = []
    strategy = FederatedLora(cfg, glob, server_model.evaluate, records.append,
                             run_id=grid.run_id,
                             after_round=after_round(server_model) if after_round else None)
    strategy.run(grid)
    return records, grid, glob, server_model


def save_tiny_llama(path: Any, *, layers: int = 1, hidden: int = 32, heads: int = 4,
                    chat_template: str | None = None) -> str:
    """A seeded random Llama (``hidden`` wide, ``layers`` deep) with the packaged MiniLM
    tokenizer (EOS = [SEP]; optionally a chat template), saved under ``path``; returns it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedlora.learning import assets

    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_dir())
    tokenizer.eos_token = tokenizer.sep_token
    if chat_template:
        tokenizer.chat_template = chat_template
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)  # the random weights, so that "the loss goes down" is reproducible
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
