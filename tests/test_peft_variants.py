"""PEFT variants beyond plain LoRA on ``nn.Linear``: fused ``Conv1D`` projections (GPT-2's
``c_attn``) and LoRA on embeddings, through the layer boundary, the client, every rule family
and the export (tiny random models built here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fl_harness import run_rounds, tiny_config
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from fedlora import config
from fedlora.federation.global_adapter import split_arrays
from fedlora.learning import assets, builders, data, lora, training
from fedlora.learning.evaluator import load_exported


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    """A random two-layer GPT-2 (hidden 32, tied wte/lm_head) with MiniLM's tokenizer."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = AutoTokenizer.from_pretrained(assets.minilm_dir())
    tok.eos_token = tok.sep_token
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=128,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _random_factors(model, rng) -> dict[str, np.ndarray]:
    """The model's adapter arrays with every LoRA factor random (heads unchanged)."""
    arrays = lora.adapter_arrays(model)
    return {k: (rng.normal(0, 0.5, v.shape).astype(np.float32)
                if k.endswith((lora.LORA_A, lora.LORA_B)) else v) for k, v in arrays.items()}


def _ids(vocab: int) -> torch.Tensor:
    return torch.tensor([[5, 17, 101, 7, vocab - 1, 3]])


def _merge_matches_adapter(model, spec: lora.AdapterSpec, rng) -> float:
    """Largest |logit| difference between the model with random LoRA factors and the same
    model with zero factors and ``s·B A`` set as a base correction."""
    arrays = _random_factors(model, rng)
    vocab = model.config.vocab_size
    with torch.no_grad():
        lora.load_adapter_arrays(model, arrays)
        with_adapter = model(input_ids=_ids(vocab)).logits
        factors, heads = split_arrays(arrays, spec.scale)
        zero = {k: np.zeros_like(v) for k, v in arrays.items()}
        lora.load_adapter_arrays(model, zero)
        lora.set_base_delta(model, {m: (f.scale * f.b, f.a) for m, f in factors.items()},
                            tag="test")
        merged = model(input_ids=_ids(vocab)).logits
        lora.set_base_delta(model, {}, tag="none")  # restores the original weights
        restored = model(input_ids=_ids(vocab)).logits
        base_again = lora.build_peft_model(
            lora.ModelSpec(path=model.config._name_or_path, task="causal-lm"), spec)[0]
        fresh = base_again(input_ids=_ids(vocab)).logits  # B = 0: the base model's output
    assert torch.allclose(restored, fresh, atol=1e-5)
    return float((with_adapter - merged).abs().max())


def test_conv1d_base_correction_is_transposed_like_peft(tiny_gpt2, rng):
    """c_attn stores its weight (in, out) = (32, 96): the correction B A (96, 32) must go in
    transposed, and the merged model must compute what the adapter computes."""
    spec = lora.AdapterSpec(r=4, alpha=8, target_modules=("c_attn",))
    model, _ = lora.build_peft_model(lora.ModelSpec(path=tiny_gpt2, task="causal-lm"), spec)
    model.eval()
    assert _merge_matches_adapter(model, spec, rng) < 1e-4
    layer = model.get_submodule("base_model.model.transformer.h.0.attn.c_attn").base_layer
    assert lora.base_shape(layer) == (96, 32, True)


def test_embedding_factors_travel_under_linear_names_with_the_linear_contract(tiny_gpt2):
    spec = lora.AdapterSpec(r=4, alpha=8, target_modules=("wte", "c_attn"))
    model, _ = lora.build_peft_model(lora.ModelSpec(path=tiny_gpt2, task="causal-lm"), spec)
    arrays = lora.adapter_arrays(model)
    wte = "base_model.model.transformer.wte"
    assert arrays[wte + lora.LORA_A].shape == (4, model.config.vocab_size)  # (r, in = vocab)
    assert arrays[wte + lora.LORA_B].shape == (32, 4)  # (out = dim, r)
    assert not any("lora_embedding" in k for k in arrays)
    factors, heads = split_arrays(arrays, spec.scale)
    assert wte in factors and not heads  # a factor pair, not a head sent in full
    changed = {k: v + 1.0 for k, v in arrays.items()}
    lora.load_adapter_arrays(model, changed)  # renamed back to peft's keys
    assert all(np.array_equal(lora.adapter_arrays(model)[k], changed[k]) for k in changed)


def test_embedding_base_correction_leaves_the_tied_output_head_alone(tiny_gpt2, rng):
    """GPT-2 ties wte to lm_head. peft's embedding LoRA changes only the lookup; a correction
    written into the shared weight would change the output head too."""
    spec = lora.AdapterSpec(r=4, alpha=8, target_modules=("wte",))
    model, _ = lora.build_peft_model(lora.ModelSpec(path=tiny_gpt2, task="causal-lm"), spec)
    model.eval()
    head = model.get_output_embeddings().weight
    before = head.detach().clone()
    assert _merge_matches_adapter(model, spec, rng) < 1e-4
    lora.set_base_delta(model, {"base_model.model.transformer.wte": (
        np.ones((32, 2), np.float32), np.ones((2, model.config.vocab_size), np.float32))},
        tag="tie")
    assert torch.equal(head, before)


def _reload_metric(flat, glob, server_model, tmp_path) -> float:
    server_model.export(glob, tmp_path / "adapter")
    cfg = config.from_flat(flat)
    model, tokenizer = load_exported(tmp_path / "adapter", cfg)
    examples = data.tokenize(data.heldout(builders.data_spec(cfg)), tokenizer, cfg.model.task,
                             cfg.data.max_length)
    out = training.evaluate(model, examples, 16, tokenizer.pad_token_id, cfg.model.task)
    return out["eval-accuracy" if cfg.model.task == "seq-cls" else "eval-loss"]


# rule families: equal-rank linear, mixed-rank (SVD / prefix), base-modifying (both), one factor
@pytest.mark.parametrize(("strategy", "ranks"), [
    ("fedit", ""), ("flexlora", "2,4,8,4"), ("flora", "2,4,8,4"), ("fedex", ""),
])
def test_gpt2_c_attn_rounds_under_partial_participation_and_export(tiny_gpt2, tmp_path,
                                                                   strategy, ranks):
    flat = tiny_config(**{"model.name": tiny_gpt2, "model.task": "causal-lm",
                          "model.num-hidden-layers": 2, "data.source": "chatterbot",
                          "data.partitioner": "iid", "lora.target-modules": "c_attn",
                          "train.lr": 0.05, "strategy": strategy, "rank-by-partition": ranks,
                          "fraction-train": 0.5, "min-train-nodes": 2,
                          "data.max-length": 32, "num-server-rounds": 2})
    records, _, glob, server_model = run_rounds(flat, num_nodes=4)
    assert [r["num_accepted"] for r in records[1:]] == [2, 2]
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    assert _reload_metric(flat, glob, server_model, tmp_path) == pytest.approx(
        records[-1]["eval_loss"], rel=1e-4)


@pytest.mark.parametrize(("strategy", "ranks"), [
    ("fedit", ""), ("flexlora", "2,4,8"), ("hetlora", "2,4,8"), ("flora", "2,4,8"),
    ("fedex", ""), ("ffa", ""), ("fedsa", ""),
])
def test_embedding_lora_every_rule_family_and_export(tmp_path, strategy, ranks):
    """The issue's failing run: lora.target-modules='word_embeddings,query,value' on MiniLM
    (clients of ranks 2, 4, 8 for the mixed-rank rules)."""
    flat = tiny_config(**{"lora.target-modules": "word_embeddings,query,value",
                          "strategy": strategy, "rank-by-partition": ranks, "train.lr": 0.01,
                          "num-server-rounds": 2})
    records, _, glob, server_model = run_rounds(flat, num_nodes=3)
    assert all(r["num_accepted"] == 3 for r in records[1:]), records
    moved = {m for m, f in glob.export_factors().items() if np.any(f.b)}
    assert any(m.endswith("word_embeddings") for m in moved)  # the embedding trained
    assert _reload_metric(flat, glob, server_model, tmp_path) == pytest.approx(
        records[-1]["eval_accuracy"], abs=1e-9)


# ----------------------------------------------------------------------------- DoRA


@pytest.mark.parametrize("strategy", ["fedit", "ffa"])
def test_dora_magnitude_travels_trains_and_the_export_loads_as_dora(tmp_path, strategy):
    """fedit with DoRA, two of four clients sampled per round: each module's magnitude vector
    is a head (aggregated like every head: example-weighted mean) that trains, and the exported
    adapter is a DoRA adapter that reproduces the final accuracy."""
    flat = tiny_config(**{"lora.use-dora": True, "strategy": strategy, "train.lr": 0.01,
                          "fraction-train": 0.5, "min-train-nodes": 2, "num-server-rounds": 2})
    records, _, glob, server_model = run_rounds(flat, num_nodes=4)
    assert [r["num_accepted"] for r in records[1:]] == [2, 2]
    cfg = config.from_flat(flat)
    fresh, _ = lora.build_peft_model(builders.model_spec(cfg), builders.adapter_spec(cfg, 8))
    initial = lora.adapter_arrays(fresh)  # magnitude = row norms of W0
    magnitudes = [k for k in glob.heads if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == 2  # query and value of the one layer
    assert all(not np.array_equal(glob.heads[k], initial[k]) for k in magnitudes)

    server_model.export(glob, tmp_path / "adapter")
    model, tokenizer = load_exported(tmp_path / "adapter", cfg)
    assert model.peft_config["default"].use_dora
    layer = model.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.query")
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_magnitude_vector"
    np.testing.assert_array_equal(
        layer.lora_magnitude_vector["default"].weight.detach().numpy(), glob.heads[key])
    examples = data.tokenize(data.heldout(builders.data_spec(cfg)), tokenizer, "seq-cls",
                             cfg.data.max_length)
    again = training.evaluate(model, examples, 16, tokenizer.pad_token_id, "seq-cls")
    assert again["eval-accuracy"] == pytest.approx(records[-1]["eval_accuracy"], abs=1e-9)
    assert again["eval-loss"] == pytest.approx(records[-1]["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("strategy", ["flexlora", "hetlora", "flora", "fedex", "fedsvd"])
def test_dora_refused_at_start_up_with_the_rules_that_accept_it(strategy):
    flat = tiny_config(**{"lora.use-dora": True, "strategy": strategy})
    with pytest.raises(config.ConfigError, match=r"lora.use-dora: strategy .*use one of "
                       r"fedit, .*set lora.use-dora = false"):
        config.from_flat(flat)


def test_dora_refused_on_a_half_precision_base():
    flat = tiny_config(**{"lora.use-dora": True, "model.dtype": "bfloat16"})
    with pytest.raises(config.ConfigError, match="float32 unquantized base"):
        config.from_flat(flat)


# ----------------------------------------------------------------------------- lora.bias


@pytest.mark.parametrize(("bias", "strategy", "ranks"), [
    ("all", "fedit", ""), ("lora_only", "flexlora", "2,4,8"), ("all", "flora", "2,4,8"),
])
def test_lora_bias_travels_as_heads_trains_and_is_exported(tmp_path, bias, strategy, ranks):
    flat = tiny_config(**{"lora.bias": bias, "strategy": strategy, "rank-by-partition": ranks,
                          "train.lr": 0.01})
    records, _, glob, server_model = run_rounds(flat, num_nodes=3)
    assert all(r["num_accepted"] == 3 for r in records[1:]), records
    cfg = config.from_flat(flat)
    fresh, _ = lora.build_peft_model(builders.model_spec(cfg), builders.adapter_spec(cfg, 8))
    initial = lora.adapter_arrays(fresh)
    biases = [k for k in glob.heads if k.endswith(".bias") and "classifier" not in k]
    if bias == "lora_only":  # the adapted layers' biases only
        assert biases and all(k.endswith(("query.base_layer.bias",
                                                    "value.base_layer.bias")) for k in biases)
    else:  # every bias of the model, e.g. the LayerNorms'
        assert any("LayerNorm" in k for k in biases)
    assert any(not np.array_equal(glob.heads[k], initial[k]) for k in biases)  # they train
    assert _reload_metric(flat, glob, server_model, tmp_path) == pytest.approx(
        records[-1]["eval_accuracy"], abs=1e-9)
