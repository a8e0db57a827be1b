"""``fedlora export RUN_DIR --merged OUT``: ``AutoModelFor….from_pretrained(OUT)`` alone
reproduces the run's adapter model, for every rule family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fl_harness import run_rounds, save_tiny_llama, tiny_config
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from fedlora import config
from fedlora.cli.main import main
from fedlora.learning import builders, data
from fedlora.learning.export import MERGED_MANIFEST
from fedlora.learning.loading import load_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=2)


def _heldout_batch(flat, tokenizer, n=8):
    cfg = config.from_flat(flat)
    examples = data.tokenize(data.heldout(builders.data_spec(cfg)), tokenizer, cfg.model.task,
                             cfg.data.max_length)[:n]
    return data.collate(examples, tokenizer.pad_token_id)


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits.double()


def _tolerance(reference: torch.Tensor, width: int, layers: int) -> float:
    """Unmerged ``x W0ᵀ + s (x Aᵀ) Bᵀ`` vs merged ``x (W0 + s B A)ᵀ`` reassociate each adapted
    layer's float32 sums: per layer at most γ_n = n·u/(1-n·u) relative (u = 2⁻²⁴, n = the
    layer's inner width) of the magnitudes summed. Allow twice that per block (two adapted
    layers), amplified by at most 2x per transformer block (norms, attention softmax, MLP),
    relative to the largest logit (measured: 2e-7 against a bound of 3e-5).
    A wrong merge (scale, transpose, missing base correction) is off by far
    more: the adapters below move the logits by > 1e-2 of their size."""
    u = 2.0**-24
    gamma = width * u / (1 - width * u)
    return float(reference.abs().max()) * gamma * 2 * layers * 2.0**layers


CAUSAL = {"model.task": "causal-lm", "data.source": "chatterbot", "data.partitioner": "natural",
          "lora.target-modules": "q_proj,v_proj", "train.lr": 0.05, "data.max-length": 40,
          "num-server-rounds": 2}


@pytest.mark.parametrize(("strategy", "ranks", "fraction"), [
    ("fedit", "", 1.0),
    ("flora", "", 0.67),       # base-modifying: the export carries every round's correction
    ("fedex", "", 0.67),       # base-modifying: residual folded into the base each round
    ("flexlora", "2,4,8", 0.67),  # mixed ranks: the aggregate at its largest rank
])
def test_the_merged_model_alone_reproduces_the_adapter_logits(
        tiny_llama, tmp_path, strategy, ranks, fraction):
    flat = tiny_config(**{**CAUSAL, "model.name": tiny_llama, "strategy": strategy,
                          "rank-by-partition": ranks, "fraction-train": fraction})
    flat["model.num-hidden-layers"] = 2
    _, _, glob, server_model = run_rounds(flat)
    assert glob.updates == 2
    run = tmp_path / "run"
    server_model.export(glob, run / "adapter")

    assert main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    adapted, _ = load_model(run, device="cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()

    batch = _heldout_batch(flat, tokenizer)
    want, got = _logits(adapted, batch), _logits(merged, batch)
    mask = batch["attention_mask"].bool()
    moved = (want - _logits(base, batch))[mask].abs().max()
    assert moved > 1e-2 * want[mask].abs().max()  # the adapter changes the model visibly
    assert not any("lora" in k for k in merged.state_dict())  # plain weights, no peft
    err = (got - want)[mask].abs().max()
    assert err <= _tolerance(want[mask], width=64, layers=2), (err, moved)
    info = json.loads((tmp_path / "merged" / MERGED_MANIFEST).read_text())
    assert info["strategy"] == strategy and info["merged_dtype"] == "float32"


def test_a_merged_classifier_keeps_its_trained_head_and_label_names(tmp_path):
    flat = tiny_config(strategy="fedit", **{"train.lr": 0.01})
    _, _, glob, server_model = run_rounds(flat)
    run = tmp_path / "run"
    server_model.export(glob, run / "adapter")
    assert main(["export", str(run / "adapter"), "--merged", str(tmp_path / "m")]) == 0

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    adapted, tokenizer = load_model(run, device="cpu")
    batch = _heldout_batch(flat, tokenizer)
    want, got = _logits(adapted, batch), _logits(merged, batch)
    assert merged.config.num_hidden_layers == 1  # the truncated base, as trained
    assert merged.config.id2label[0] == data.label_names(
        builders.data_spec(config.from_flat(flat)))[0]
    assert float((got - want).abs().max()) <= _tolerance(want, width=384, layers=1)
    np.testing.assert_array_equal(got.argmax(-1).numpy(), want.argmax(-1).numpy())


def test_export_refuses_a_non_empty_target_and_a_non_run(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["export", str(tmp_path), "--merged", str(tmp_path / "out")]) == 2
    assert "neither a run's output directory" in capsys.readouterr().err


@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed (pip install 'fedlora[qlora]')")
def test_a_qlora_run_merges_into_its_dequantized_base(tmp_path):
    """The merged weights are dequant(Q(W0)) + ΔW in model.dtype: the model the QLoRA run
    evaluated (bitsandbytes dequantizes NF4 to the float32 compute dtype for each matmul, so
    only the reassociation of the merge separates the two), not the original W0 + ΔW."""
    flat = tiny_config(strategy="fedex", **{"model.quantization": "nf4", "train.lr": 0.01,
                                            "num-server-rounds": 1})
    _, _, glob, server_model = run_rounds(flat)
    run = tmp_path / "run"
    server_model.export(glob, run / "adapter")
    assert main(["export", str(run), "--merged", str(tmp_path / "m")]) == 0

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert getattr(merged.config, "quantization_config", None) is None
    adapted, tokenizer = load_model(run, device="cpu")
    batch = _heldout_batch(flat, tokenizer)
    want, got = _logits(adapted, batch), _logits(merged, batch)
    assert float((got - want).abs().max()) <= _tolerance(want, width=384, layers=1)
