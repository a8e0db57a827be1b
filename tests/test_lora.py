"""Tests of fedlora.learning.lora: PEFT models, adapter arrays, freezing, base corrections,
saving."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tolerances import U32, assert_within, gamma

from fedlora.errors import ConfigError, PayloadError
from fedlora.learning import lora

R = 4
ALPHA = 8.0
HIDDEN = 384
PREFIX = "base_model.model.bert.encoder.layer.0.attention.self."
QUERY, VALUE = PREFIX + "query", PREFIX + "value"
CLASSIFIER = "base_model.model.classifier"


@pytest.fixture
def adapter() -> lora.AdapterSpec:
    return lora.AdapterSpec(r=R, alpha=ALPHA, target_modules=("query", "value"))


@pytest.fixture
def model(minilm_spec: lora.ModelSpec, adapter: lora.AdapterSpec) -> Any:
    """A fresh one-layer MiniLM with a rank-4 adapter on query and value (eval mode)."""
    peft_model, _ = lora.build_peft_model(minilm_spec, adapter, seed=0)
    return peft_model.eval()


def _random_arrays(arrays: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in arrays.items()}


def _fixed_input() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2748, 102, 0, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


# ----------------------------------------------------------------------------- building


def test_adapter_arrays_keys_and_shapes(model: Any) -> None:
    arrays = lora.adapter_arrays(model)

    assert {k: v.shape for k, v in arrays.items()} == {
        QUERY + ".lora_A.weight": (R, HIDDEN),
        QUERY + ".lora_B.weight": (HIDDEN, R),
        VALUE + ".lora_A.weight": (R, HIDDEN),
        VALUE + ".lora_B.weight": (HIDDEN, R),
        CLASSIFIER + ".weight": (5, HIDDEN),
        CLASSIFIER + ".bias": (5,),
    }
    assert all(v.dtype == np.float32 for v in arrays.values())


def test_initial_adapter_is_seeded_with_zero_b(minilm_spec: lora.ModelSpec,
                                              adapter: lora.AdapterSpec, model: Any) -> None:
    arrays = lora.adapter_arrays(model)
    again = lora.adapter_arrays(lora.build_peft_model(minilm_spec, adapter, seed=0)[0])
    other = lora.adapter_arrays(lora.build_peft_model(minilm_spec, adapter, seed=1)[0])

    factors = [QUERY, VALUE]
    assert not np.any(arrays[QUERY + ".lora_B.weight"])
    assert np.any(arrays[QUERY + ".lora_A.weight"])
    for m in factors:
        for suffix in (lora.LORA_A, lora.LORA_B):
            assert np.array_equal(arrays[m + suffix], again[m + suffix])
    assert not np.array_equal(arrays[QUERY + ".lora_A.weight"], other[QUERY + ".lora_A.weight"])


def test_same_seed_gives_identical_initial_adapter_including_head(
        minilm_spec: lora.ModelSpec, adapter: lora.AdapterSpec) -> None:
    first = lora.adapter_arrays(lora.build_peft_model(minilm_spec, adapter, seed=0)[0])
    torch.manual_seed(12345)  # whatever the global RNG state is
    second = lora.adapter_arrays(lora.build_peft_model(minilm_spec, adapter, seed=0)[0])

    assert sorted(first) == sorted(second)
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_only_adapter_and_head_are_trainable(model: Any) -> None:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    assert trainable
    assert all(".lora_" in n or "classifier" in n for n in trainable)
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)


def test_causal_lm_adapter_has_no_head(tiny_causal_spec: lora.ModelSpec) -> None:
    spec = lora.AdapterSpec(r=2, alpha=4.0, target_modules=("q_proj", "v_proj"))

    peft_model, tokenizer = lora.build_peft_model(tiny_causal_spec, spec)

    arrays = lora.adapter_arrays(peft_model)
    prefix = "base_model.model.model.layers.0.self_attn."
    assert {k: v.shape for k, v in arrays.items()} == {
        prefix + "q_proj.lora_A.weight": (2, 32),
        prefix + "q_proj.lora_B.weight": (32, 2),
        prefix + "v_proj.lora_A.weight": (2, 32),
        prefix + "v_proj.lora_B.weight": (32, 2),
    }
    # the tokenizer has no pad token: load_base pads with EOS
    assert tokenizer.pad_token == tokenizer.eos_token == "[SEP]"
    assert peft_model.config.pad_token_id == tokenizer.eos_token_id


def test_seq_cls_needs_two_labels(minilm_spec: lora.ModelSpec, adapter: lora.AdapterSpec) -> None:
    from dataclasses import replace

    with pytest.raises(ConfigError, match=">= 2 labels; got 1"):
        lora.build_peft_model(replace(minilm_spec, num_labels=1), adapter)


def test_unknown_target_module_names_candidates(minilm_spec: lora.ModelSpec) -> None:
    spec = lora.AdapterSpec(r=R, alpha=ALPHA, target_modules=("query", "q_proj"))

    with pytest.raises(ConfigError) as excinfo:
        lora.build_peft_model(minilm_spec, spec)

    message = str(excinfo.value)
    assert "['q_proj']" in message
    candidates = message.split("candidates:")[1]
    for name in ("query", "key", "value", "dense"):
        assert name in candidates


def test_missing_model_directory(tmp_path: Path) -> None:
    spec = lora.ModelSpec(path=str(tmp_path / "nope"), task="seq-cls", num_labels=2)

    with pytest.raises(ConfigError, match="cannot load model"):
        lora.load_base(spec)


def test_resolve_model_missing_local_path() -> None:
    from fedlora.learning import assets

    with pytest.raises(ConfigError, match="does not exist"):
        assets.resolve_model("./does-not-exist")


# ----------------------------------------------------------------------------- arrays


def test_adapter_arrays_round_trip_is_exact(model: Any) -> None:
    # Prepare
    arrays = _random_arrays(lora.adapter_arrays(model))

    # Execute
    lora.load_adapter_arrays(model, arrays)
    back = lora.adapter_arrays(model)

    # Assert
    assert sorted(back) == sorted(arrays)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)


def test_loaded_arrays_change_the_model_output(model: Any) -> None:
    with torch.no_grad():
        before = model(**_fixed_input()).logits
        lora.load_adapter_arrays(model, _random_arrays(lora.adapter_arrays(model)))
        after = model(**_fixed_input()).logits

    assert not torch.allclose(before, after)


def test_adapter_arrays_are_copies(model: Any) -> None:
    arrays = lora.adapter_arrays(model)
    arrays[QUERY + ".lora_A.weight"][:] = 7.0

    assert not np.any(lora.adapter_arrays(model)[QUERY + ".lora_A.weight"] == 7.0)


def _missing(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in arrays.items() if k != VALUE + ".lora_B.weight"}


def _extra(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**arrays, PREFIX + "key.lora_A.weight": np.zeros((R, HIDDEN), np.float32)}


def _wrong_rank(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**arrays, QUERY + ".lora_A.weight": np.zeros((R + 1, HIDDEN), np.float32)}


def _transposed(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**arrays, QUERY + ".lora_B.weight": arrays[QUERY + ".lora_B.weight"].T.copy()}


def _poisoned(value: float) -> Any:
    def poison(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bad = arrays[CLASSIFIER + ".weight"].copy()
        bad[2, 3] = value
        return {**arrays, CLASSIFIER + ".weight": bad}

    return poison


@pytest.mark.parametrize(
    ("corrupt", "reason", "fragment"),
    [
        (_missing, "KEY_MISMATCH", "1 missing, 0 unexpected"),
        (_extra, "KEY_MISMATCH", "0 missing, 1 unexpected"),
        (_wrong_rank, "SHAPE_MISMATCH", f"expected shape ({R}, {HIDDEN}), got ({R + 1}, {HIDDEN})"),
        (_transposed, "SHAPE_MISMATCH", f"expected shape ({HIDDEN}, {R}), got ({R}, {HIDDEN})"),
        (_poisoned(float("nan")), "NON_FINITE", "NaN or Inf"),
        (_poisoned(float("inf")), "NON_FINITE", "NaN or Inf"),
        (_poisoned(float("-inf")), "NON_FINITE", "NaN or Inf"),
    ],
)
def test_load_rejects_bad_payload_and_leaves_model_unchanged(
    model: Any, corrupt: Any, reason: str, fragment: str
) -> None:
    # Prepare
    before = lora.adapter_arrays(model)
    payload = corrupt(_random_arrays(before))

    # Execute
    with pytest.raises(PayloadError) as excinfo:
        lora.load_adapter_arrays(model, payload)

    # Assert
    assert excinfo.value.reason == reason
    assert str(excinfo.value).startswith(f"[{reason}]")
    assert fragment in str(excinfo.value)
    after = lora.adapter_arrays(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_load_accepts_float64_arrays(model: Any) -> None:
    arrays = {k: v.astype(np.float64)
              for k, v in _random_arrays(lora.adapter_arrays(model)).items()}

    lora.load_adapter_arrays(model, arrays)

    back = lora.adapter_arrays(model)
    assert all(np.array_equal(back[k], arrays[k].astype(np.float32)) for k in arrays)


# ----------------------------------------------------------------------------- freezing


@pytest.mark.parametrize(("train_a", "train_b"), [(False, True), (True, False), (False, False),
                                                  (True, True)])
def test_set_trainable(model: Any, train_a: bool, train_b: bool) -> None:
    lora.set_trainable(model, train_a=train_a, train_b=train_b)

    params = dict(model.named_parameters())
    lora_a = [p for n, p in params.items() if ".lora_A." in n]
    lora_b = [p for n, p in params.items() if ".lora_B." in n]
    heads = [p for n, p in params.items() if "modules_to_save" in n]
    base = [p for n, p in params.items()
            if ".lora_" not in n and "modules_to_save" not in n]
    assert len(lora_a) == len(lora_b) == 2 and heads and base
    assert all(p.requires_grad is train_a for p in lora_a)
    assert all(p.requires_grad is train_b for p in lora_b)
    assert all(p.requires_grad for p in heads)  # the head is never frozen
    assert not any(p.requires_grad for p in base)  # the base stays frozen


def test_set_trainable_can_unfreeze_again(model: Any) -> None:
    lora.set_trainable(model, train_a=False)
    lora.set_trainable(model)

    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


# ----------------------------------------------------------------------------- base corrections


def _weight(model: Any, module: str) -> np.ndarray:
    return model.get_submodule(module).base_layer.weight.detach().numpy().copy()


def _delta(seed: int, rank: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(HIDDEN, rank)).astype(np.float32),
            rng.normal(size=(rank, HIDDEN)).astype(np.float32))


def test_set_base_delta_is_relative_to_the_original_weights(model: Any) -> None:
    # Prepare
    w0_q, w0_v = _weight(model, QUERY), _weight(model, VALUE)
    (b1, a1), (b2, a2), (b3, a3) = _delta(1), _delta(2), _delta(3, rank=5)

    def close(got, w0, b, a):  # torch's W0 + B@A against numpy's: two float32 sums of
        # R + 1 terms in different orders, each within γ_{R+1}·(|W0| + |B||A|) (derived)
        bound = 2 * 1.01 * (gamma(b.shape[1] + 1) + U32) * (np.abs(w0) + np.abs(b) @ np.abs(a))
        assert_within(got, w0 + b @ a, bound)

    # W = W0 + B @ A
    lora.set_base_delta(model, {QUERY: (b1, a1), VALUE: (b3, a3)}, tag=1)
    close(_weight(model, QUERY), w0_q, b1, a1)
    close(_weight(model, VALUE), w0_v, b3, a3)

    # a new tag replaces the correction (relative to W0, not cumulative); a module left out
    # goes back to W0
    lora.set_base_delta(model, {QUERY: (b2, a2)}, tag=2)
    close(_weight(model, QUERY), w0_q, b2, a2)
    assert np.array_equal(_weight(model, VALUE), w0_v)

    # the same tag is a no-op, whatever the deltas
    lora.set_base_delta(model, {QUERY: (b1, a1)}, tag=2)
    close(_weight(model, QUERY), w0_q, b2, a2)

    # empty deltas restore W0 exactly
    lora.set_base_delta(model, {}, tag=3)
    assert np.array_equal(_weight(model, QUERY), w0_q)
    assert np.array_equal(_weight(model, VALUE), w0_v)


def test_set_base_delta_changes_outputs_like_a_merged_adapter(model: Any) -> None:
    """Base correction B @ A and an adapter with the same product give the same logits."""
    # Prepare: the adapter's own delta is scale · B @ A with scale = alpha / r
    arrays = _random_arrays(lora.adapter_arrays(model), seed=5)
    arrays = {k: v * 0.05 if ".lora_" in k else v for k, v in arrays.items()}
    lora.load_adapter_arrays(model, arrays)
    with torch.no_grad():
        with_adapter = model(**_fixed_input()).logits
    scale = ALPHA / R
    deltas = {m: (scale * arrays[m + ".lora_B.weight"], arrays[m + ".lora_A.weight"])
              for m in (QUERY, VALUE)}
    zero_b = {k: np.zeros_like(v) if k.endswith(".lora_B.weight") else v
              for k, v in arrays.items()}

    # Execute: move the adapter into the base
    lora.set_base_delta(model, deltas, tag="merged")
    lora.load_adapter_arrays(model, zero_b)
    with torch.no_grad():
        merged = model(**_fixed_input()).logits

    # Assert: x(W0 + sBA)ᵀ against xW0ᵀ + s(xAᵀ)Bᵀ — the same sums reassociated. Through
    # one encoder layer and the head no tight bound can be derived a priori; each product is
    # within γ_384 ≈ 2.3e-5 relative (hidden size 384), and rtol 1e-4 ≈ 4·γ_384 leaves room
    # for the layer norm's amplification. A wrong merge moves logits by O(1e-1).
    torch.testing.assert_close(merged, with_adapter, rtol=1e-4, atol=1e-5)


def test_set_base_delta_rejects_wrong_shape(model: Any) -> None:
    b, a = _delta(1)

    with pytest.raises(PayloadError) as excinfo:
        lora.set_base_delta(model, {QUERY: (b[:10], a)}, tag=1)

    assert excinfo.value.reason == "SHAPE_MISMATCH"
    assert f"expected ({HIDDEN}, {HIDDEN}), got B (10, 3) @ A (3, {HIDDEN})" in \
        str(excinfo.value)


# ----------------------------------------------------------------------------- saving


def test_save_adapter_loads_in_peft_with_identical_outputs(
    minilm_spec: lora.ModelSpec, model: Any, tmp_path: Path
) -> None:
    from peft import PeftModel

    # Prepare
    lora.load_adapter_arrays(model, _random_arrays(lora.adapter_arrays(model), seed=3))
    with torch.no_grad():
        expected = model(**_fixed_input()).logits

    # Execute
    directory = lora.save_adapter(model, tmp_path / "out" / "adapter")
    fresh_base, _ = lora.load_base(minilm_spec)
    loaded = PeftModel.from_pretrained(fresh_base, str(directory)).eval()
    with torch.no_grad():
        got = loaded(**_fixed_input()).logits

    # Assert
    assert directory == tmp_path / "out" / "adapter"
    assert (directory / "adapter_config.json").is_file()
    assert (directory / "adapter_model.safetensors").is_file()
    # the same weights through the same kernels in the same process: bit-identical
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    back = lora.adapter_arrays(loaded)
    ref = lora.adapter_arrays(model)
    assert all(np.array_equal(back[k], ref[k]) for k in ref)


def test_save_causal_adapter_round_trip(tiny_causal_spec: lora.ModelSpec, tmp_path: Path) -> None:
    from peft import PeftModel

    spec = lora.AdapterSpec(r=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
    model, _ = lora.build_peft_model(tiny_causal_spec, spec)
    model.eval()
    lora.load_adapter_arrays(model, _random_arrays(lora.adapter_arrays(model), seed=4))
    ids = torch.tensor([[101, 2000, 2001, 2002, 102]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    directory = lora.save_adapter(model, tmp_path)
    loaded = PeftModel.from_pretrained(lora.load_base(tiny_causal_spec)[0], str(directory)).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits

    # the same weights through the same kernels in the same process: bit-identical
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("r", "alpha", "rslora", "expected"),
    [
        (4, 16.0, False, 4.0),
        (4, 16.0, True, 8.0),
        (1, 16.0, True, 16.0),
        (16, 8.0, True, 2.0),
        (8, 16.0, False, 2.0),
        (2, 1.0, True, 1.0 / math.sqrt(2)),
    ],
)
def test_adapter_spec_scale(r: int, alpha: float, rslora: bool, expected: float) -> None:
    assert lora.AdapterSpec(r=r, alpha=alpha, use_rslora=rslora).scale == pytest.approx(
        expected, rel=1e-12)


def test_adapter_spec_scale_matches_peft(minilm_spec: lora.ModelSpec) -> None:
    spec = lora.AdapterSpec(r=R, alpha=ALPHA, use_rslora=True)

    model, _ = lora.build_peft_model(minilm_spec, spec)

    assert model.get_submodule(QUERY).scaling["default"] == pytest.approx(spec.scale, rel=1e-12)
    assert spec.scale == pytest.approx(ALPHA / math.sqrt(R), rel=1e-12)


def test_with_rank_keeps_other_fields() -> None:
    spec = lora.AdapterSpec(r=4, alpha=16.0, use_rslora=True, target_modules=("query",))

    assert spec.with_rank(8) == lora.AdapterSpec(r=8, alpha=16.0, use_rslora=True,
                                                  target_modules=("query",))


def test_model_cache_reuses_and_evicts(minilm_spec: lora.ModelSpec) -> None:
    cache = lora.ModelCache(capacity=1)
    spec = lora.AdapterSpec(r=2, alpha=4.0)
    other_base = lora.ModelSpec(**{**minilm_spec.__dict__, "num_labels": 3})

    first, _ = cache.get(minilm_spec, spec)
    assert cache.get(minilm_spec, spec)[0] is first
    assert cache.get(other_base, spec)[0] is not first
    assert cache.get(minilm_spec, spec)[0] is not first  # evicted by the other base model


def test_model_cache_shares_one_base_across_ranks(minilm_spec: lora.ModelSpec, rng) -> None:
    # Prepare: a rank-2 client's adapter, loaded into the cached model
    cache = lora.ModelCache()
    spec = lora.AdapterSpec(r=2, alpha=4.0)
    rank2, tokenizer = cache.get(minilm_spec, spec)
    arrays2 = {k: rng.normal(size=v.shape).astype(np.float32) * 0.1
               for k, v in lora.adapter_arrays(rank2).items()}
    lora.load_adapter_arrays(rank2, arrays2)

    # Execute: a rank-3 client is served, then the rank-2 one again
    rank3, _ = cache.get(minilm_spec, spec.with_rank(3))
    shapes3 = {k: v.shape for k, v in lora.adapter_arrays(rank3).items()}
    trainable3 = [n for n, p in rank3.named_parameters() if p.requires_grad]
    again, _ = cache.get(minilm_spec, spec)

    # Assert: one model object (one copy of the frozen weights), the asked rank active
    assert rank3 is rank2 and again is rank2
    assert shapes3[QUERY + lora.LORA_A] == (3, 384) and shapes3[QUERY + lora.LORA_B] == (384, 3)
    assert trainable3 and all(".adapter-1." in n for n in trainable3)
    assert all(np.array_equal(v, arrays2[k]) for k, v in lora.adapter_arrays(again).items())
    # ... and the rank-2 adapter computes what a model built for rank 2 alone computes
    alone, _ = lora.build_peft_model(minilm_spec, spec)
    lora.load_adapter_arrays(alone, arrays2)
    batch = tokenizer(["a short note", "another one"], return_tensors="pt", padding=True)
    for model in (again, alone):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, alone(**batch).logits)


def test_saved_adapter_config_is_the_same_bytes_whatever_the_string_hash_seed(tmp_path: Path):
    """peft keeps target_modules as a set; the saved list is sorted, so two processes with
    different PYTHONHASHSEED write the same adapter_config.json (a run's digests repeat)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; from fedlora.learning import assets, lora\n"
        "spec = lora.ModelSpec(path=str(assets.minilm_dir()), task='seq-cls', num_labels=5,\n"
        "                      num_hidden_layers=1)\n"
        "adapter = lora.AdapterSpec(r=4, alpha=8, target_modules=('query', 'value', 'key'))\n"
        "model, _ = lora.build_peft_model(spec, adapter, seed=0)\n"
        "lora.save_adapter(model, sys.argv[1])\n")
    texts = []
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=300,
                       env={**os.environ, "PYTHONHASHSEED": seed,
                            "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        texts.append((out / "adapter_config.json").read_text())
    assert texts[0] == texts[1] == texts[2]
    assert '"key",\n    "query",\n    "value"' in texts[0]


def test_save_adapter_writes_the_active_adapter_of_a_cached_base(minilm_spec, tmp_path: Path):
    """A cached base holds one named adapter per rank; saving a rank-2 client's adapter (not
    the cache's first, rank-8 one) writes that adapter alone, at the top of the directory."""
    import safetensors.numpy

    cache = lora.ModelCache()
    cache.get(minilm_spec, lora.AdapterSpec(r=8, alpha=16, target_modules=("query", "value")))
    model, _ = cache.get(minilm_spec, lora.AdapterSpec(r=2, alpha=16,
                                                      target_modules=("query", "value")))
    lora.save_adapter(model, tmp_path / "out")
    saved = safetensors.numpy.load_file(tmp_path / "out" / "adapter_model.safetensors")
    ranks = {v.shape[0] for k, v in saved.items() if k.endswith("lora_A.weight")}
    assert ranks == {2}
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == []
