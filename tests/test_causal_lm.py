"""Causal-LM instruction tuning end to end on a tiny random Llama (in process)."""

from __future__ import annotations

import numpy as np
import pytest
from fl_harness import run_rounds, save_tiny_llama, tiny_config

from fedlora import config
from fedlora.learning import builders, data, training
from fedlora.learning.evaluator import load_exported


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize(("strategy", "ranks"), [("fedit", ""), ("flexlora", "2,4,8")])
def test_instruction_tuning_rounds_and_exported_adapter(tiny_llama, tmp_path, strategy, ranks):
    flat = tiny_config(**{"model.name": tiny_llama, "model.task": "causal-lm",
                          "data.source": "chatterbot", "data.partitioner": "natural",
                          "lora.target-modules": "q_proj,v_proj", "train.lr": 0.01,
                          "strategy": strategy, "rank-by-partition": ranks,
                          "data.max-length": 48, "num-server-rounds": 2})
    records, _, glob, server_model = run_rounds(flat)

    assert all(np.isfinite(r["eval_perplexity"]) for r in records)
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]  # it learns the Q/A format
    assert "eval_accuracy" not in records[-1]

    server_model.export(glob, tmp_path / "adapter")
    cfg = config.from_flat(flat)
    model, tokenizer = load_exported(tmp_path / "adapter", cfg)
    examples = data.tokenize(data.heldout(builders.data_spec(cfg)), tokenizer, "causal-lm",
                             cfg.data.max_length)
    again = training.evaluate(model, examples, 16, tokenizer.pad_token_id, "causal-lm")
    # the export folds the scale into B (lora_alpha = r): s·B·A becomes (sB)·A, a float32
    # reassociation per layer (≈ γ_64 = 3.8e-6 relative each); rel 1e-4 allows for its
    # propagation through the model and the mean over tokens. A wrong export is off by > 1e-2.
    assert again["eval-loss"] == pytest.approx(records[-1]["eval_loss"], rel=1e-4)
