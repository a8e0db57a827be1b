"""QLoRA: a 4-bit NF4 / 8-bit base through bitsandbytes (its CPU kernels here), LoRA factors in
float32, and base corrections (FLoRA, FedEx) in a separate float32 buffer."""

from __future__ import annotations

import builtins
import importlib.util
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from fl_harness import run_rounds, tiny_config

from fedlora.errors import ConfigError
from fedlora.learning import lora

# only the tests that quantize need bitsandbytes; the bfloat16 base, the "what to install"
# message and the config check run without it
requires_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                  reason="bitsandbytes is not installed (pip install "
                                         "'fedlora[qlora]')")

PREFIX = "base_model.model.bert.encoder.layer.0.attention.self."
QUERY, VALUE = PREFIX + "query", PREFIX + "value"
ADAPTER = lora.AdapterSpec(r=4, alpha=8.0, target_modules=("query", "value"))


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2748, 102, 0, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**_inputs()).logits


@requires_bnb
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_base_keeps_the_wire_format_and_trains(minilm_spec, quantization):
    plain, _ = lora.build_peft_model(minilm_spec, ADAPTER, seed=0)
    model, _ = lora.build_peft_model(replace(minilm_spec, quantization=quantization), ADAPTER,
                                     seed=0)

    query = model.get_submodule(QUERY).base_layer
    assert lora.is_quantized(query)  # 4-bit packed uint8 / int8 weight
    assert not lora.is_quantized(model.get_submodule("base_model.model.classifier"))
    # the same adapter on the wire: keys, shapes, float32 — a QLoRA client can join any run
    want, got = lora.adapter_arrays(plain), lora.adapter_arrays(model)
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == \
        {k: (v.shape, v.dtype) for k, v in want.items()}
    # the quantized model is close to the float one (same seed: same adapter and head)
    close = torch.nn.functional.cosine_similarity(_logits(model).flatten(),
                                                  _logits(plain).flatten(), dim=0)
    assert close > 0.9

    # one optimizer step moves exactly the trainable LoRA factors and the head
    lora.set_trainable(model, train_a=True, train_b=True)
    model.train()
    loss = model(**_inputs(), labels=torch.tensor([1, 3])).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n or "classifier" in n for n in with_grad)
    assert torch.isfinite(loss)
    # ... and trains: a few steps on this batch lower its loss and move the LoRA factors,
    # while the quantized weight stays as it was
    packed = query.weight.detach().clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        optimizer.step()
        optimizer.zero_grad()
        loss_now = model(**_inputs(), labels=torch.tensor([1, 3])).loss
        loss_now.backward()
    assert loss_now.item() < loss.item()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert torch.equal(query.weight, packed)


@requires_bnb
def test_a_quantized_causal_lm_keeps_its_tied_output_head_in_float(tmp_path):
    """SmolLM2-style tied embeddings: lm_head shares the (float) embedding matrix, so it must
    not be converted to a 4-bit layer (it then fails on its first forward)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora.learning import assets

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=30522,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    for name in ("vocab.txt", "tokenizer_config.json", "tokenizer.json",
                 "special_tokens_map.json"):
        if (assets.minilm_dir() / name).exists():
            (tmp_path / name).write_bytes((assets.minilm_dir() / name).read_bytes())
    spec = lora.ModelSpec(path=str(tmp_path), task="causal-lm", quantization="nf4")
    adapter = lora.AdapterSpec(r=4, alpha=8.0, target_modules=("q_proj", "v_proj"))

    model, _ = lora.build_peft_model(spec, adapter)

    assert lora.is_quantized(model.get_submodule("base_model.model.model.layers.0.self_attn"
                                                 ".q_proj").base_layer)
    assert not lora.is_quantized(model.get_submodule("base_model.model.lm_head"))
    ids = torch.randint(0, 30522, (2, 8))
    loss = model.train()(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


@requires_bnb
def test_a_base_correction_on_a_quantized_base_lives_in_a_float32_buffer(minilm_spec):
    model, _ = lora.build_peft_model(replace(minilm_spec, quantization="nf4"), ADAPTER, seed=0)
    rng = np.random.default_rng(0)
    b = rng.normal(scale=0.02, size=(384, 6)).astype(np.float32)
    a = rng.normal(scale=0.02, size=(6, 384)).astype(np.float32)
    layer = model.get_submodule(QUERY).base_layer
    packed = layer.weight.detach().clone()
    x = torch.randn(3, 384)
    with torch.no_grad():
        before = layer(x)

    lora.set_base_delta(model, {QUERY: (b, a)}, tag=1)
    with torch.no_grad():
        after = layer(x)

    assert torch.equal(layer.weight, packed)  # the 4-bit weight is untouched
    assert layer._fedlora_correction[0].dtype == torch.float32
    # the layer adds x·Cᵀ (C = BA, float32) to its 4-bit output; both sides are float32 dot
    # products of length 384 (γ_384 ≈ 2.3e-5 relative to Σ|x||C|) and the subtraction of the
    # dequantized base output adds a rounding of |after|: rtol 1e-4 ≈ 4·γ_384, atol for the
    # near-zero entries. A correction that is missing or transposed is off by O(1).
    torch.testing.assert_close(after - before, x @ torch.from_numpy(b @ a).T,
                               rtol=1e-4, atol=1e-5)
    lora.set_base_delta(model, {}, tag=2)  # removing the correction restores the layer
    with torch.no_grad():
        assert torch.equal(layer(x), before)


def test_a_bfloat16_base_keeps_small_corrections_that_its_weights_would_round_away(
        minilm_spec):
    """A FLoRA/FedEx correction is small next to W0; added into bfloat16 weights (8 bits of
    mantissa) most of it would vanish. The float32 buffer applies all of it."""
    model, _ = lora.build_peft_model(replace(minilm_spec, dtype="bfloat16"), ADAPTER, seed=0)
    layer = model.get_submodule(QUERY).base_layer
    b = np.full((384, 1), 1e-2, np.float32)
    a = np.full((1, 384), 1e-2, np.float32)  # each weight moves by 1e-4
    x = torch.ones(1, 384, dtype=torch.bfloat16)
    expected_shift = 384 * 1e-4  # on every output of x = 1
    with torch.no_grad():
        before = layer(x).float()
        in_place = (layer.weight.float() + torch.from_numpy(b @ a)).to(torch.bfloat16)
        retained = (in_place.float() - layer.weight.float()).sum() / (384 * 384 * 1e-4)
    assert retained < 0.5  # in place, most of the correction rounds away (32 % kept here)

    lora.set_base_delta(model, {QUERY: (b, a)}, tag=1)
    with torch.no_grad():
        after = layer(x).float()

    assert (after - before).mean().item() == pytest.approx(expected_shift, rel=0.05)


@requires_bnb
@pytest.mark.parametrize("strategy", ["fedex", "flora"])
def test_qlora_clients_run_base_modifying_rules_end_to_end(strategy):
    """Two rounds of the real ClientApp/ServerApp with an NF4 base on every client and the
    server; the base corrections travel and apply through the float32 buffers."""
    flat = tiny_config(strategy=strategy, **{"model.quantization": "nf4"})
    records, *_ = run_rounds(flat, num_nodes=2)

    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["num_accepted"] == 2 for r in records[1:])
    assert all(np.isfinite(r["eval_loss"]) for r in records)
    assert records[-1]["base_version"] == 2  # both rounds moved the base
    # the rules stay exact on a quantized base, and the moved base changes the server's model
    assert max(r["agg_error_max"] for r in records[1:]) < 1e-5
    assert records[-1]["eval_loss"] != records[0]["eval_loss"]


def test_quantization_without_bitsandbytes_says_what_to_install(minilm_spec, monkeypatch):
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ConfigError, match=r"pip install 'fedlora\[qlora\]'"):
        lora.load_base(replace(minilm_spec, quantization="nf4"))


def test_quantization_must_be_a_known_mode():
    from fedlora import config

    with pytest.raises(ConfigError, match="model.quantization"):
        config.from_flat(tiny_config(**{"model.quantization": "fp4"}))
