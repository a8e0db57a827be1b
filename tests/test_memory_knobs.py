"""Memory knobs of the QLoRA recipe: gradient accumulation, gradient checkpointing, 8-bit /
paged optimizers, autocast, and the per-round peak memory each client reports."""

from __future__ import annotations

import builtins
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from fl_harness import run_rounds, tiny_config

from fedlora import config
from fedlora.errors import ConfigError
from fedlora.federation import outputs
from fedlora.learning import builders, lora, training
from fedlora.learning import client_round as client

TINY_LLAMA = lora.AdapterSpec(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
MINILM = lora.AdapterSpec(r=4, alpha=8.0, dropout=0.0, target_modules=("query", "value"))


def _lm_examples(n: int = 16, seed: int = 0) -> list[dict]:
    """Causal-LM examples of different lengths and prompt lengths (-100 labels): micro-batches
    of one step then hold different numbers of predicted tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, 20))
        prompt = int(rng.integers(1, length - 1))
        ids = rng.integers(1000, 5000, length).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _cls_examples(n: int = 16, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": [101, *rng.integers(1000, 5000, int(rng.integers(3, 12))).tolist(),
                           102], "labels": int(rng.integers(0, 5))} for _ in range(n)]


def _trained(spec: lora.ModelSpec, adapter: lora.AdapterSpec, examples: list[dict],
             train: training.TrainSpec, dtype: torch.dtype = torch.float32
             ) -> dict[str, np.ndarray]:
    model, tokenizer = lora.build_peft_model(spec, adapter, seed=0)
    model.to(dtype)
    training.train(model, examples, train, tokenizer.pad_token_id)
    return {n: p.detach().to(torch.float64).numpy().copy()
            for n, p in model.named_parameters() if p.requires_grad}


def _max_diff(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(x[k] - y[k]).max()) for k in x)


# ----------------------------------------------------------------------------- accumulation


def test_grad_accum_2_at_half_batch_gives_the_update_of_one_full_batch(tiny_causal_spec):
    """Three AdamW steps: accum 2 x batch 4 (and 4 x 2) against accum 1 x batch 8, on causal-LM
    examples whose micro-batches hold different token counts (a mean of the micro-batch means
    would weight tokens unequally and move the adapter elsewhere).

    Tolerance, derived: accumulation only re-associates float sums (and pads each micro-batch
    to its own width, masked). In float64 the result may then differ by a few ulps of the
    parameters (|theta| < 1, ulp 2.2e-16): 1e-13 allows ~500 ulps. In float32 the same
    computation is itself off the exact (float64) result by its rounding error; accumulation
    must add no more than that error again (x 4 margin)."""
    examples = _lm_examples()
    full = training.TrainSpec(steps=3, batch_size=8, lr=1e-2, seed=5)
    half = replace(full, batch_size=4, grad_accum_steps=2)
    quarter = replace(full, batch_size=2, grad_accum_steps=4)
    ref64 = _trained(tiny_causal_spec, TINY_LLAMA, examples, full, torch.float64)
    init = _trained(tiny_causal_spec, TINY_LLAMA, examples, replace(full, lr=1e-30),
                    torch.float64)
    assert _max_diff(ref64, init) > 1e-3  # the steps moved the adapter

    assert _max_diff(_trained(tiny_causal_spec, TINY_LLAMA, examples, half, torch.float64),
                     ref64) < 1e-13
    assert _max_diff(_trained(tiny_causal_spec, TINY_LLAMA, examples, quarter, torch.float64),
                     ref64) < 1e-13

    float32_error = _max_diff(_trained(tiny_causal_spec, TINY_LLAMA, examples, full), ref64)
    accum32_error = _max_diff(_trained(tiny_causal_spec, TINY_LLAMA, examples, half), ref64)
    assert accum32_error <= 4 * float32_error + 1e-12


def test_grad_accum_reports_the_mean_loss_of_the_whole_step_batch(tiny_causal_spec):
    examples = _lm_examples(seed=2)
    losses = []
    for batch, k in ((8, 1), (4, 2)):
        model, tok = lora.build_peft_model(tiny_causal_spec, TINY_LLAMA, seed=0)
        model.to(torch.float64)
        metrics = training.train(model, examples, training.TrainSpec(
            steps=2, batch_size=batch, lr=1e-2, grad_accum_steps=k), tok.pad_token_id)
        assert metrics["train-steps"] == 2
        losses.append(metrics["train-loss"])
    # transformers computes the causal-LM loss on float32 logits even for a float64 model:
    # float32 rounding of a sum of 8 terms (eps 6e-8 each), with margin
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_grad_accum_with_fedprox_adds_the_proximal_term_once_per_step(tiny_causal_spec):
    """FedProx's mu/2 ||theta - theta_g||^2 depends on the parameters only: added once per
    optimizer step, accumulation leaves the FedProx update unchanged (float64)."""
    examples = _lm_examples(seed=1)
    model, tok = lora.build_peft_model(tiny_causal_spec, TINY_LLAMA, seed=0)
    model.to(torch.float64)
    with torch.no_grad():  # theta away from the anchor, so the proximal gradient is not zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    anchors = {n: p - 0.05 for n, p in state.items()}
    results = []
    for batch, k in ((8, 1), (4, 2)):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in state:
                    p.copy_(state[n])
        training.train(model, examples, training.TrainSpec(
            steps=2, batch_size=batch, lr=1e-2, proximal_mu=5.0, grad_accum_steps=k, seed=3),
            tok.pad_token_id, anchors)
        results.append({n: p.detach().numpy().copy() for n, p in model.named_parameters()
                        if n in state})
    assert _max_diff(results[1], results[0]) < 1e-13


# ----------------------------------------------------------------------------- optimizers


def test_adamw_8bit_keeps_8bit_state_and_trains_on_cpu(minilm_spec):
    pytest.importorskip("bitsandbytes")
    big = torch.nn.Parameter(torch.randn(16, 384))  # >= 4,096 elements: quantized state
    opt = training.make_optimizer([big], training.TrainSpec(steps=1, batch_size=1, lr=1e-3,
                                                            optimizer="adamw_8bit"))
    big.grad = torch.randn_like(big)
    opt.step()
    assert opt.state[big]["state1"].dtype == torch.uint8

    # a real training run on CPU moves the adapter like torch's AdamW does (8-bit state
    # approximates the 32-bit moments: the same direction, not the same bits)
    examples = _cls_examples()
    adapter = replace(MINILM, r=16)  # rank-16 factors of 384-wide layers: 8-bit state
    spec = training.TrainSpec(steps=3, batch_size=8, lr=1e-3)
    init = _trained(minilm_spec, adapter, examples, replace(spec, lr=1e-30))
    ref = _trained(minilm_spec, adapter, examples, spec)
    got = _trained(minilm_spec, adapter, examples, replace(spec, optimizer="adamw_8bit"))
    moved_ref = np.concatenate([(ref[k] - init[k]).ravel() for k in ref])
    moved = np.concatenate([(got[k] - init[k]).ravel() for k in ref])
    cos = moved @ moved_ref / (np.linalg.norm(moved) * np.linalg.norm(moved_ref))
    assert cos > 0.95


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_optimizers_fail_on_cpu_before_the_base_model_loads(name, monkeypatch):
    pytest.importorskip("bitsandbytes")
    cfg = config.from_flat(tiny_config(**{"train.optimizer": name}))
    node = client.Node(partition_id=0, num_partitions=2, rank=8)

    def no_load(*args: Any) -> None:
        raise AssertionError("the base model was loaded before the knob was checked")

    monkeypatch.setattr(client.MODELS, "get", no_load)
    monkeypatch.setattr(builders, "device", lambda: "cpu")
    with pytest.raises(ConfigError, match="only on CUDA.*adamw_8bit"):
        client.load_model(cfg, node)


def test_a_bitsandbytes_optimizer_without_bitsandbytes_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any):
        if name == "bitsandbytes":
            raise ImportError("no bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    spec = training.TrainSpec(steps=1, batch_size=1, lr=1e-3, optimizer="adamw_8bit")
    with pytest.raises(ConfigError, match=r"pip install 'fedlora\[qlora\]'.*train.optimizer"):
        training.check_support(spec, "cpu")


def test_memory_knobs_reject_unknown_values_listing_the_choices():
    for key, bad, listed in (("train.optimizer", "sgd", "paged_adamw_8bit"),
                             ("train.autocast", "fp8", "bf16"),
                             ("train.gradient-checkpointing", "yes", "auto")):
        with pytest.raises(ConfigError, match=f"{key} must be one of.*{listed}"):
            config.from_flat({key: bad})
    with pytest.raises(ConfigError, match="train.grad-accum-steps must be > 0"):
        config.from_flat({"train.grad-accum-steps": 0})


# ----------------------------------------------------------------------------- autocast


@pytest.mark.parametrize(("mode", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_the_training_matmuls_in_half_precision_on_cpu(minilm_spec, mode, dtype):
    examples = _cls_examples()
    model, tok = lora.build_peft_model(minilm_spec, MINILM, seed=0)
    seen: set[torch.dtype] = set()
    query = model.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.query")
    handle = query.base_layer.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    spec = training.TrainSpec(steps=3, batch_size=8, lr=1e-3, autocast=mode)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    init = {n: p.detach().double().numpy().copy() for n, p in params.items()}
    metrics = training.train(model, examples, spec, tok.pad_token_id)
    handle.remove()

    assert seen == {dtype}
    assert np.isfinite(metrics["train-loss"])
    assert all(p.dtype == torch.float32 for p in params.values())  # master weights stay fp32
    trained = {n: p.detach().double().numpy() for n, p in params.items()}
    ref = _trained(minilm_spec, MINILM, examples, replace(spec, autocast="none"))
    moved_ref = np.concatenate([(ref[k] - init[k]).ravel() for k in init if "lora_B" in k])
    moved = np.concatenate([(trained[k] - init[k]).ravel() for k in init if "lora_B" in k])
    cos = moved @ moved_ref / (np.linalg.norm(moved) * np.linalg.norm(moved_ref))
    assert cos > 0.95


def test_fp16_autocast_skips_a_step_whose_gradients_overflow(minilm_spec, monkeypatch):
    """Dynamic loss scaling: an overflowing fp16 step must not write Inf into the adapter."""
    model, tok = lora.build_peft_model(minilm_spec, MINILM, seed=0)
    init = lora.adapter_arrays(model)
    real_backward = torch.Tensor.backward

    def overflow(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        real_backward(self * float("inf"), *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", overflow)
    training.train(model, _cls_examples(), training.TrainSpec(steps=1, batch_size=8, lr=1e-2,
                                                              autocast="fp16"),
                   tok.pad_token_id)
    after = lora.adapter_arrays(model)
    assert all(np.array_equal(after[k], init[k]) for k in init)


# ----------------------------------------------------------------------------- checkpointing


def _saved_activation_bytes(model: Any, examples: list[dict], pad: int) -> int:
    """Bytes autograd keeps for the backward pass during one training forward."""
    from fedlora.learning.data import collate

    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.train()
    torch.manual_seed(0)  # BERT's own dropout: the same masks for both models
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**collate(examples, pad)).loss.backward()
    model.eval()
    return total


def test_gradient_checkpointing_without_quantization_stores_less_and_gives_the_same_gradient(
        minilm_spec):
    spec = replace(minilm_spec, num_hidden_layers=3)
    examples = _cls_examples(8)
    plain, tok = lora.build_peft_model(spec, MINILM, seed=0)
    ckpt, _ = lora.build_peft_model(replace(spec, gradient_checkpointing=True), MINILM, seed=0)
    assert ckpt.base_model.model.is_gradient_checkpointing
    assert not plain.base_model.model.is_gradient_checkpointing

    stored_plain = _saved_activation_bytes(plain, examples, tok.pad_token_id)
    stored_ckpt = _saved_activation_bytes(ckpt, examples, tok.pad_token_id)
    assert stored_ckpt < 0.5 * stored_plain
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters(),
                                 strict=True):
        if p.requires_grad and p.grad is not None:  # recomputation: the same gradient
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(("mode", "quantization", "expected"), [
    ("auto", "none", False), ("auto", "nf4", True), ("on", "none", True),
    ("off", "nf4", False)])
def test_gradient_checkpointing_auto_follows_quantization(mode, quantization, expected):
    cfg = config.from_flat(tiny_config(**{"train.gradient-checkpointing": mode,
                                          "model.quantization": quantization}))
    assert builders.model_spec(cfg).gradient_checkpointing is expected


def test_qlora_with_gradient_checkpointing_off_loads_without_it(minilm_spec):
    pytest.importorskip("bitsandbytes")
    off, _ = lora.build_peft_model(replace(minilm_spec, quantization="nf4"), MINILM)
    on, _ = lora.build_peft_model(replace(minilm_spec, quantization="nf4",
                                          gradient_checkpointing=True), MINILM)
    assert not off.base_model.model.is_gradient_checkpointing
    assert on.base_model.model.is_gradient_checkpointing


# ----------------------------------------------------------------------------- peak memory


def test_a_peak_window_measures_this_window_and_keeps_the_lifetime_peak():
    assert outputs.start_peak_window()
    block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
    first = outputs.window_peaks(True)["round-peak-rss-mb"]
    lifetime = outputs.rss_mb(peak=True)
    del block
    assert outputs.start_peak_window()
    second = outputs.window_peaks(True)["round-peak-rss-mb"]
    assert first - second > 150  # the new window no longer holds the freed block
    # the lifetime peak survives the reset (Linux syncs its per-thread RSS counters lazily:
    # the mark may trail the last VmRSS reading by a few pages)
    assert outputs.rss_mb(peak=True) >= lifetime - 1.0


def test_metrics_jsonl_has_each_clients_round_peak_memory():
    """Partial participation: 2 of 3 nodes per round; each round line maps exactly the
    sampled partitions to their peak RSS during that train message."""
    records, *_ = run_rounds(tiny_config(**{"num-train-nodes": 2, "min-train-nodes": 2}),
                             num_nodes=3)
    for line in records[1:]:
        peaks = line["client_round_peak_rss_mb"]
        assert len(peaks) == line["num_accepted"] == 2
        assert set(peaks) <= {"0", "1", "2"}
        assert all(0 < v <= line["client_peak_rss_mb_max"] + 1 for v in peaks.values())
        assert line["client_round_peak_rss_mb_max"] == max(peaks.values())
        assert "client_cuda_peak_mb" not in line  # no GPU here


def test_client_memory_summarises_cuda_peaks_by_partition():
    got = outputs.client_memory([
        {"partition-id": 3, "round-peak-rss-mb": 900.04, "cuda-peak-mb": 5000.0},
        {"partition-id": 1, "round-peak-rss-mb": 700.0, "cuda-peak-mb": 7000.0}])
    assert got == {"client_round_peak_rss_mb": {"3": 900.0, "1": 700.0},
                   "client_round_peak_rss_mb_max": 900.0,
                   "client_cuda_peak_mb": {"3": 5000.0, "1": 7000.0},
                   "client_cuda_peak_mb_max": 7000.0}


# ----------------------------------------------------------------------------- end to end


def test_every_memory_knob_together_trains_federated_rounds_on_cpu():
    """Two rounds of the real ClientApp/ServerApp with accumulation, checkpointing, 8-bit
    AdamW and bf16 autocast on an NF4 base, 2 of 3 nodes per round."""
    pytest.importorskip("bitsandbytes")
    flat = tiny_config(**{"train.grad-accum-steps": 2, "train.batch-size": 4,
                          "train.gradient-checkpointing": "on", "train.optimizer": "adamw_8bit",
                          "train.autocast": "bf16", "model.quantization": "nf4",
                          "num-train-nodes": 2})
    records, *_ = run_rounds(flat, num_nodes=3)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["num_accepted"] == 2 for r in records[1:])
    assert all(np.isfinite(r["train_loss"]) for r in records[1:])
