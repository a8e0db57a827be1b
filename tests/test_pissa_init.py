"""Base-dependent LoRA inits (``lora.init = pissa | pissa_niter_<k> | olora``, peft's names).

The server computes peft's init once, at the run's largest rank ``R``, from the base it loads;
every node gets the top-``r`` slice (refolded to its scale) and the residual of its rank,
``W - s_R·B0[:, :r]·A0[:r]``, as base correction 1. These tests run the real strategy against
the real ClientApp in process and read the weights each node actually trains from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fl_harness import run_rounds, save_tiny_llama, tiny_config

from fedlora import config
from fedlora.aggregation import LoraFactors
from fedlora.errors import ConfigError
from fedlora.federation.global_adapter import GlobalAdapter
from fedlora.learning import builders, client_round, data, lora, training
from fedlora.learning.evaluator import ServerModel, load_exported

REPO = Path(__file__).resolve().parents[1]
INITS = ["pissa", "pissa_niter_2", "olora"]


def effective_weights(model) -> dict[str, np.ndarray]:
    """``W_base + s·B·A`` of every adapted linear layer (the base with its corrections in
    place, float64), under the active adapter."""
    active = model.active_adapter
    out = {}
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "lora_A", None), torch.nn.ModuleDict) and active in mod.lora_A:
            w = mod.base_layer.weight.detach().double()
            ba = mod.lora_B[active].weight.detach().double() @ mod.lora_A[active].weight.detach(
            ).double()
            out[name] = (w + mod.scaling[active] * ba).numpy()
    return out


@pytest.fixture
def captured(monkeypatch):
    """Every client training call of the run: node rank, examples, effective weights at the
    start (the adapter it was sent on the base it holds) and at the end."""
    calls: list[dict] = []
    original = client_round.train_round

    def spy(model, tokenizer, examples, arrays, spec, trainable):
        lora.load_adapter_arrays(model, arrays)
        start = effective_weights(model)
        rank = next(v.shape[0] for k, v in arrays.items() if k.endswith(lora.LORA_A))
        trained, metrics = original(model, tokenizer, examples, arrays, spec, trainable)
        calls.append({"rank": rank, "n": metrics["num-examples"], "start": start,
                      "end": effective_weights(model)})
        return trained, metrics

    monkeypatch.setattr(client_round, "train_round", spy)
    return calls


def base_weights(cfg: config.RunConfig) -> dict[str, np.ndarray]:
    """The adapted layers' weights of a freshly loaded base (peft's default init: ΔW = 0)."""
    model, _ = lora.build_peft_model(builders.model_spec(cfg), builders.adapter_spec(cfg, 2))
    return effective_weights(model)


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "default", "gaussian"])
def test_peft_init_names_are_accepted(init):
    assert config.from_flat(tiny_config(**{"lora.init": init})).lora.init == init


@pytest.mark.parametrize("init", ["pissa_niter_0", "pissa_niter_x", "loftq", "PiSSA"])
def test_other_init_names_are_refused_naming_the_accepted_ones(init):
    with pytest.raises(ConfigError, match="pissa_niter_<k>"):
        config.from_flat(tiny_config(**{"lora.init": init}))


@pytest.mark.parametrize(("keys", "message"), [
    ({"strategy": "flora", "rank-by-partition": "2,4"}, "mixed ranks runs with hetlora"),
    ({"strategy": "hetlora", "rank-by-partition": "2,4", "secure-aggregation": True},
     "masked sum"),
    ({"strategy": "hetlora", "hetlora-prune": True}, "hetlora-prune"),
    ({"lora.use-dora": True}, "plain LoRA adapter"),
])
def test_combinations_a_residual_base_cannot_run_exactly_are_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        config.from_flat(tiny_config(**{"lora.init": "pissa", **keys}))


def test_procs_per_node_is_refused_since_the_residual_lives_in_rank_0():
    cfg = config.from_flat(tiny_config(**{"lora.init": "olora"}))
    with pytest.raises(ConfigError, match="lora.init = olora"):
        client_round.Node.from_configs(cfg, {"partition-id": 0, "num-partitions": 2,
                                             "procs-per-node": 2})


def test_declared_ranks_above_the_init_are_dropped_and_mixed_ones_need_a_completing_rule():
    """Deployment: nodes declare their lora-rank. Above the init's rank R (lora.r = 4) a node
    has no residual and is dropped; mixed declared ranks under flora stop the run."""
    flat = tiny_config(**{"lora.init": "pissa", "lora.r": 4, "strategy": "hetlora",
                          "num-server-rounds": 1})
    records, *_ = run_rounds(flat, 3, node_extra=lambda i: {"lora-rank": [2, 4, 8][i]})
    assert records[1]["clients"] == [0, 1]
    flora = tiny_config(**{"lora.init": "pissa", "lora.r": 4, "strategy": "flora",
                           "num-server-rounds": 1})
    with pytest.raises(ConfigError, match="mixed ranks run with hetlora"):
        run_rounds(flora, 2, node_extra=lambda i: {"lora-rank": [2, 4][i]})


# ----------------------------------------------------------------------------- server init


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_server_init_is_peft_own_and_the_server_base_stays_w(init):
    """The init is peft's (A0, B0 and the residual peft writes into a base), computed on the
    server's model without changing its base weights."""
    from peft import get_peft_model

    flat = tiny_config(**{"lora.init": init, "lora.r": 4})
    cfg = config.from_flat(flat)
    server = ServerModel(cfg, cfg.fl.max_rank)
    assert server.adapter.r == 4  # the largest configured rank, not max-rank
    w = base_weights(cfg)
    for name, value in effective_weights(server.model).items():  # server factors are zero
        assert np.array_equal(value, w[name])
    spec = builders.adapter_spec(cfg, 4)
    base, _ = lora.load_base(builders.model_spec(cfg))
    config_ = lora.peft_config(spec, cfg.model.task)
    config_.init_lora_weights = init
    peft_model = get_peft_model(base, config_)
    glob = server.initial_global()
    for module, (a, b) in server.base_init.items():
        sub = peft_model.get_submodule(module)
        assert np.array_equal(a, sub.lora_A["default"].weight.detach().numpy())
        assert np.array_equal(b, sub.lora_B["default"].weight.detach().numpy())
        # the residual every rank-4 node builds equals the one peft wrote into its own base
        corr = glob.correction_since(0, 4)[module]
        residual = w[module] + (corr.b.astype(np.float64) @ corr.a.astype(np.float64))
        assert _max_rel(residual, sub.base_layer.weight.detach().double().numpy()) < 1e-6


def test_a_tier_slice_is_peft_own_lower_rank_pissa():
    """Rank-r slice of the rank-R PiSSA init, refolded: s_r·B·A is peft's rank-r PiSSA
    product V_r S_r U_rᵀ (and each factor matches up to the signs of singular vectors)."""
    from peft import get_peft_model

    cfg = config.from_flat(tiny_config(**{"lora.init": "pissa", "strategy": "hetlora",
                                          "rank-by-partition": "2,8"}))
    glob = ServerModel(cfg, cfg.fl.max_rank).initial_global()
    base, _ = lora.load_base(builders.model_spec(cfg))
    peft_config = lora.peft_config(builders.adapter_spec(cfg, 2), cfg.model.task)
    peft_config.init_lora_weights = "pissa"
    peft_model = get_peft_model(base, peft_config)
    for module, f in glob.view(2).items():
        sub = peft_model.get_submodule(module)
        a = sub.lora_A["default"].weight.detach().double().numpy()
        b = sub.lora_B["default"].weight.detach().double().numpy()
        assert f.scale == sub.scaling["default"]
        assert np.allclose(np.abs(f.a), np.abs(a), atol=1e-5)
        assert np.allclose(np.abs(f.b), np.abs(b), atol=1e-5)
        assert _max_rel(f.scale * f.b.astype(np.float64) @ f.a, f.scale * b @ a) < 1e-5


# ----------------------------------------------------------------------------- round 0


@pytest.mark.parametrize(("init", "model"), [("pissa", "minilm"), ("pissa_niter_2", "llama"),
                                             ("olora", "llama")])
def test_every_node_starts_from_the_base_weights_whatever_its_rank(init, model, captured,
                                                                   tmp_path):
    """Ranks 2, 4, 8 (hetlora): each node's W_res + s·B·A at its first round is the loaded
    base W, so every node, of every tier, trains the same model; the top-rank node's
    residual is the server's."""
    keys = {"lora.init": init, "strategy": "hetlora", "rank-by-partition": "2,4,8",
            "num-server-rounds": 1, "train.lr": 0.001}
    if model == "llama":
        keys.update({"model.name": save_tiny_llama(tmp_path / "llama"), "model.task":
                     "causal-lm", "data.source": "chatterbot",
                     "lora.target-modules": "q_proj,v_proj,down_proj"})
    records, _, glob, _ = run_rounds(tiny_config(**keys), num_nodes=3)
    assert records[1]["num_accepted"] == 3
    w = base_weights(config.from_flat(tiny_config(**keys)))
    assert sorted(c["rank"] for c in captured) == [2, 4, 8]
    for call in captured:
        for module, start in call["start"].items():
            assert _max_rel(start, w[module]) < 1e-6, (call["rank"], module)
    # and the init really moved weight into the adapter (s·B0·A0 is not small)
    top = glob.init_factors[next(iter(glob.init_factors))]
    assert np.linalg.norm(top.scale * top.b @ top.a) > 0.1 * np.linalg.norm(w[next(iter(w))])


def test_a_lower_rank_upload_is_completed_with_the_components_it_holds_frozen():
    """fill_tail: the completed rank-R update on the rank-R residual is the rank-r node's
    own model (its residual + its adapter), exactly."""
    rng = np.random.default_rng(0)
    m, n, big, small, alpha = 6, 5, 4, 2, 8.0
    init = LoraFactors(a=rng.normal(size=(big, n)), b=rng.normal(size=(m, big)),
                       scale=alpha / big)
    glob = GlobalAdapter({"mod": init}, {}, alpha, False, base_init=True)
    w = rng.normal(size=(m, n))
    upload = LoraFactors(a=rng.normal(size=(small, n)), b=rng.normal(size=(m, small)),
                         scale=alpha / small)
    filled = glob.fill_tail({"mod": upload})["mod"]

    def based(rank: int) -> np.ndarray:
        r = glob.residual(rank)["mod"]
        return w + r.b @ r.a

    node_model = based(small) + upload.scale * upload.b @ upload.a
    assert filled.rank == big and filled.scale == init.scale
    assert np.allclose(based(big) + filled.scale * filled.b @ filled.a, node_model, atol=1e-12)
    # the round-0 view: every rank's W_res + s·B·A is W
    for rank in (1, small, big):
        f = glob.view(rank)["mod"]
        assert np.allclose(based(rank) + f.scale * f.b @ f.a, w, atol=1e-12)


def test_checkpoint_keeps_the_init_and_each_rank_residual():
    rng = np.random.default_rng(1)
    init = LoraFactors(a=rng.normal(size=(4, 5)), b=rng.normal(size=(6, 4)), scale=2.0)
    glob = GlobalAdapter({"mod": init}, {}, 8.0, False, base_init=True)
    again = GlobalAdapter.from_state(*glob.state_dict())
    assert again.version == glob.version == 1
    for rank in (2, 4):
        for x, y in ((again.view(rank)["mod"], glob.view(rank)["mod"]),
                     (again.correction_since(0, rank)["mod"], glob.correction_since(0, rank)[
                         "mod"])):
            assert np.array_equal(x.a, y.a) and np.array_equal(x.b, y.b) and x.scale == y.scale


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(("strategy", "ranks"), [("flora", ""), ("fedex", ""),
                                                  ("flexlora", "2,4,8")])
def test_exact_rules_stay_exact_on_a_residual_base(strategy, ranks, captured):
    """Two rounds, 2 of 3 nodes sampled, PiSSA at rank 4 (flexlora: ranks 2, 4, 8): after
    each round the server's global model (W + residual + corrections + s·B·A) is the
    example-weighted mean of the trained nodes' models (each on its own rank's residual:
    the low-rank uploads are completed with their frozen components), and with flora and
    fedex every node of round 2 starts from exactly that model."""
    flat = tiny_config(**{"lora.init": "pissa", "lora.r": 4, "strategy": strategy,
                          "rank-by-partition": ranks, "fraction-train": 0.67,
                          "min-train-nodes": 2, "train.lr": 0.01, "num-server-rounds": 2})
    globals_: dict[int, dict[str, np.ndarray]] = {}

    def snapshot(server_model):
        def after(server_round, glob):
            w = base_weights(config.from_flat(flat))
            total = glob.export_factors()
            globals_[server_round] = {m: w[m] + total[m].scale * total[m].b.astype(
                np.float64) @ total[m].a.astype(np.float64) for m in w}
        return after

    records, _, glob, _ = run_rounds(flat, num_nodes=3, after_round=snapshot)
    assert [r["num_accepted"] for r in records[1:]] == [2, 2]
    assert glob.version == (1 if ranks else 3)  # the residual (+ flora/fedex: one a round)
    first, second = captured[:2], captured[2:]
    for calls, after in ((first, globals_[1]), (second, globals_[2])):
        total = sum(c["n"] for c in calls)
        for module, value in after.items():
            mean = sum(c["n"] / total * c["end"][module] for c in calls)
            assert _max_rel(value, mean) < 1e-5, module
    for call in second if not ranks else []:  # flexlora: a low-rank node gets its best
        for module, start in call["start"].items():  # rank-r approximation instead
            assert _max_rel(start, globals_[1][module]) < 1e-5


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("init", INITS)
def test_exported_adapter_reloads_on_a_plain_base_with_the_server_metrics(init, tmp_path):
    """Mixed ranks (hetlora, 2 of 3 sampled): the exported adapter carries the whole ΔW
    relative to W (residual + adapter, as peft's PiSSA-to-LoRA conversion), so
    ``PeftModel.from_pretrained`` on a freshly loaded base gives the server's final metric."""
    flat = tiny_config(**{"lora.init": init, "strategy": "hetlora", "rank-by-partition":
                          "2,4,8", "fraction-train": 0.67, "min-train-nodes": 2,
                          "train.lr": 0.001, "num-server-rounds": 2})
    records, _, glob, server_model = run_rounds(flat, num_nodes=3)
    server_model.export(glob, tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["init_lora_weights"] is True  # loading never rewrites the base
    cfg = config.from_flat(flat)
    model, tokenizer = load_exported(tmp_path / "adapter", cfg)
    examples = data.tokenize(data.heldout(builders.data_spec(cfg)), tokenizer, cfg.model.task,
                             cfg.data.max_length)
    again = training.evaluate(model, examples, 16, tokenizer.pad_token_id, cfg.model.task)
    assert again["eval-loss"] == pytest.approx(records[-1]["eval_loss"], rel=1e-4)
    assert again["eval-accuracy"] == pytest.approx(records[-1]["eval_accuracy"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pissa", *(pytest.param(i, marks=pytest.mark.long)
                                             for i in INITS[1:])])  # CI: one real run
def test_fedlora_run_with_each_init_and_load_model_reproduces_the_final_metric(init, tmp_path):
    """A real ``fedlora run`` (Flower simulation, 3 clients, 2 rounds), then
    ``fedlora.load_model`` on its output directory: the server's final held-out metrics."""
    import os

    import fedlora
    from fedlora.federation import outputs

    out = tmp_path / "run"
    keys = ("model.num-hidden-layers=1 data.samples-per-client=24 data.eval-samples=32 "
            f"data.max-length=32 train.local-steps=2 lora.init={init} lora.r=4")
    done = subprocess.run([sys.executable, "-m", "fedlora", "run", "--num-clients", "3",
                           "--rounds", "2", "--out", str(out), "-c", keys],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    final = outputs.read_metrics(out)[-1]
    assert final["base_version"] == 1 and final["num_accepted"] == 3
    cfg = config.from_flat(json.loads((out / "config.json").read_text()))
    assert cfg.lora.init == init
    model, tokenizer = fedlora.load_model(out)
    examples = data.tokenize(data.heldout(builders.data_spec(cfg)), tokenizer, cfg.model.task,
                             cfg.data.max_length)
    again = training.evaluate(model, examples, cfg.eval.batch_size, tokenizer.pad_token_id,
                              cfg.model.task)
    assert again["eval-loss"] == pytest.approx(final["eval_loss"], rel=1e-4)
