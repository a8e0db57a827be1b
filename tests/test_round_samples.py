"""Per round, causal-LM runs log greedy answers to fixed held-out prompts (``samples.jsonl``);
``eval.tasks`` runs lm-eval on the global model every N rounds and on the final export."""

from __future__ import annotations

import json

import pytest
import torch
from fl_harness import run_rounds, save_tiny_llama, tiny_config

from fedlora import config
from fedlora.errors import ConfigError
from fedlora.learning import prompts
from fedlora.learning.evaluator import RoundExtras
from fedlora.learning.loading import load_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _flat(model, **extra):
    return tiny_config(**{"model.name": model, "model.task": "causal-lm",
                          "data.source": "chatterbot", "data.partitioner": "natural",
                          "lora.target-modules": "q_proj,v_proj", "data.max-length": 40,
                          "train.lr": 0.05, "num-server-rounds": 2, "fraction-train": 0.67,
                          "strategy": "flora", **extra})


def test_samples_jsonl_follows_fixed_prompts_and_matches_the_export(tiny_llama, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    assert lm_eval
    flat = _flat(tiny_llama, **{"eval.samples": 2, "eval.sample-tokens": 8,
                                "eval.tasks": "fedlora-chatterbot-qa", "eval.tasks-every": 2,
                                "eval.tasks-limit": 3})
    holder = {}

    def extras(server_model):
        holder["x"] = RoundExtras(server_model, tmp_path)
        return holder["x"]

    _, _, glob, server_model = run_rounds(flat, after_round=extras)
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["round"], r["prompt"]) for r in lines] == [(r, i) for r in (0, 1, 2)
                                                          for i in (0, 1)]
    for i in (0, 1):  # the same held-out prompt every round
        assert len({r["instruction"] for r in lines if r["prompt"] == i}) == 1
    assert lines[0]["instruction"] != lines[1]["instruction"]
    # the last round's answer is what the exported model generates greedily
    server_model.export(glob, tmp_path / "adapter")
    model, tokenizer = load_model(tmp_path, device="cpu")
    row = lines[-1]
    ids = prompts.encode_prompt(tokenizer, prompts.render(tokenizer, row["instruction"]))
    with torch.no_grad():
        gen = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True).strip() == \
        row["answer"]
    # eval.tasks-every = 2: round 2 only; the final export scores the same global model
    assert not (tmp_path / "eval" / "round-1").exists()
    per_round = json.loads((tmp_path / "eval" / "round-2" / "fedlora-chatterbot-qa.json")
                           .read_text())
    final = holder["x"].final(tmp_path / "adapter")
    assert per_round["metrics"]["n-samples"] == 3
    assert final["fedlora-chatterbot-qa"]["perplexity"] == pytest.approx(
        per_round["metrics"]["perplexity"], rel=1e-4)
    assert (tmp_path / "eval" / "fedlora-chatterbot-qa.json").is_file()


def test_classification_runs_log_no_samples(tmp_path):
    flat = tiny_config(**{"num-server-rounds": 1})
    run_rounds(flat, after_round=lambda sm: RoundExtras(sm, tmp_path))
    assert not (tmp_path / "samples.jsonl").exists()


def test_eval_tasks_on_a_classification_run_is_refused():
    with pytest.raises(ConfigError, match="eval.tasks .* causal LM"):
        config.from_flat({**config.defaults(), "eval.tasks": "fedlora-bbc-topic"})
