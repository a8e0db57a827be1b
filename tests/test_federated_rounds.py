"""Every aggregation rule end to end through the real ServerApp strategy and ClientApp handlers."""

from __future__ import annotations

import numpy as np
import pytest
from fl_harness import run_rounds, tiny_config
from tolerances import U32, assert_within, gamma, weighted_sum_bound

from clients.app import app as client_app
from fedlora import config
from fedlora.aggregation import available_strategies, requires_equal_ranks
from fedlora.errors import ConfigError
from fedlora.learning import builders
from fedlora.learning import client_round as client
from fedlora.learning.evaluator import ServerModel
from server import strategy as strategy_module
from server.inprocess import InProcessGrid
from server.round import aggregate as aggregate_stage
from server.strategy import FederatedLora

MIXED = "2,4,8"


@pytest.mark.parametrize("strategy", available_strategies())
def test_every_rule_runs_end_to_end(strategy):
    """Two rounds of every rule: every reply accepted, every client sent the adapter of its
    own rank, and the global adapter moved in each round (the rule's result was adopted)."""
    ranks = "" if requires_equal_ranks(strategy) else MIXED
    rank_of = {p: int(r) for p, r in enumerate(ranks.split(","))} if ranks else {}
    records, grid, glob, _ = run_rounds(tiny_config(strategy=strategy, rank_by_partition=ranks))

    assert [r["round"] for r in records] == [0, 1, 2]
    for rec in records[1:]:
        assert rec["num_accepted"] == 3 and rec["rejected"] == {}
        assert rec["clients"] == [0, 1, 2]
        assert np.isfinite(rec["train_loss"]) and np.isfinite(rec["eval_loss"])
        assert rec["bytes_up"] > 0 and rec["bytes_down"] > 0
        assert 0.0 <= rec["agg_error_mean"] <= rec["agg_error_max"]
    # each client received LoRA factors of its own rank, and round 2's adapter differs from
    # round 1's: the round's aggregate reached the next messages
    sent = {}
    for msg in grid.delivered:
        if msg.metadata.message_type != "train":
            continue
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        sent[(int(msg.content["config"]["server-round"]), msg.metadata.dst_node_id)] = arrays
    assert len(sent) == 6
    rows = {}  # node -> the rank of the factors it was sent, in both rounds
    for (_, node), arrays in sent.items():
        a_rows = {v.shape[0] for k, v in arrays.items() if k.endswith("lora_A.weight")}
        assert len(a_rows) == 1 and rows.setdefault(node, a_rows) == a_rows, (node, a_rows)
    assert sorted(r for (r,) in rows.values()) == sorted(rank_of.values() or [8, 8, 8])
    nodes = set(rows)
    for node in nodes:
        first, second = sent[(1, node)], sent[(2, node)]
        assert any(not np.array_equal(first[k], second[k]) for k in first), node
    assert glob.updates == 2


@pytest.mark.parametrize("strategy", ["flora", "fedex", "flexlora"])
def test_exact_rules_report_zero_aggregation_error(strategy):
    ranks = "" if requires_equal_ranks(strategy) else MIXED
    records, *_ = run_rounds(tiny_config(strategy=strategy, rank_by_partition=ranks))
    assert max(r["agg_error_max"] for r in records[1:]) < 1e-5


def test_fedit_reports_its_cross_term_error():
    records, *_ = run_rounds(tiny_config(strategy="fedit"))
    assert records[1]["agg_error_mean"] > 1e-3


@pytest.mark.parametrize("strategy", [s for s in available_strategies() if requires_equal_ranks(s)])
def test_equal_rank_rules_refuse_mixed_ranks_naming_alternatives(strategy):
    with pytest.raises(ConfigError, match="flexlora") as err:
        run_rounds(tiny_config(strategy=strategy, rank_by_partition=MIXED))
    assert "flora" in str(err.value) and "hetlora" in str(err.value)


def test_deployment_node_rank_comes_from_node_config():
    replies = []
    run_rounds(tiny_config(strategy="hetlora", num_server_rounds=1), num_nodes=2,
               on_reply=replies.append, node_extra=lambda i: {"lora-rank": 3 + i})
    ranks = {int(r.content["metrics"]["partition-id"]): int(r.content["metrics"]["lora-rank"])
             for r in replies if r.metadata.message_type == "train"}
    assert ranks == {0: 3, 1: 4}


def test_failing_client_is_excluded_and_the_round_goes_on():
    def fail(pid, msg):
        return pid == 1 and msg.metadata.message_type == "train"

    records, *_ = run_rounds(tiny_config(), fail=fail)
    for rec in records[1:]:
        assert rec["num_accepted"] == 2 and rec["clients"] == [0, 2]
        assert rec["rejected"] == {"CLIENT_ERROR": 1}


def test_poisoned_reply_is_rejected_with_a_reason():
    def poison(reply):
        if reply.metadata.message_type == "train" and reply.content["metrics"]["partition-id"] == 2:
            key = next(k for k in reply.content["arrays"] if k.endswith("lora_B.weight"))
            array = reply.content["arrays"][key].numpy().copy()
            array[0, 0] = np.nan
            from flwr.app import Array

            reply.content["arrays"][key] = Array(array)

    records, *_ = run_rounds(tiny_config(), on_reply=poison)
    assert records[1]["rejected"] == {"NON_FINITE": 1} and records[1]["clients"] == [0, 1]
    assert np.isfinite(records[-1]["eval_loss"])


def test_reply_missing_a_factor_is_rejected():
    def drop_b(reply):
        if reply.metadata.message_type == "train" and reply.content["metrics"]["partition-id"] == 0:
            key = next(k for k in reply.content["arrays"] if k.endswith("lora_B.weight"))
            del reply.content["arrays"][key]

    records, *_ = run_rounds(tiny_config(num_server_rounds=1), on_reply=drop_b)
    assert records[1]["rejected"] == {"KEY_MISMATCH": 1} and records[1]["clients"] == [1, 2]


@pytest.mark.parametrize("strategy", ["flora", "fedex"])
def test_client_absent_in_a_round_trains_on_the_caught_up_base(strategy):
    """Sampling < 1: every trained client's frozen base equals W0 + all corrections so far."""
    flat = tiny_config(strategy=strategy, num_server_rounds=4, fraction_train=0.34,
                       min_train_nodes=1)
    cfg = config.from_flat(flat)
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    checked = []

    def check_base(reply):
        if reply.metadata.message_type != "train":
            return
        pid = int(reply.content["metrics"]["partition-id"])
        model, _ = client.MODELS.get(builders.model_spec(cfg), builders.adapter_spec(cfg, 8))
        expected = strategy_obj.glob.correction_since(0)  # everything before this round
        for module, w0 in model._fedlora_base_w0.items():
            weight = model.get_submodule(module).base_layer.weight.detach().numpy()
            c = expected.get(module)
            want = w0.numpy() + (c.b @ c.a if c is not None else 0.0)
            # the client added its corrections in torch, one round at a time (R products and
            # at most R intermediate roundings); here one numpy product of rank R: two float32
            # sums in different orders, each within γ_{2R+1}·(|W0| + |B||A|) (derived)
            rank = c.rank if c is not None else 0
            size = np.abs(w0.numpy()) + (np.abs(c.b) @ np.abs(c.a) if c is not None else 0.0)
            assert_within(weight, want, 2 * 1.01 * (gamma(2 * rank + 1) + U32) * size, module)
        checked.append((pid, int(reply.content["metrics"]["base-version"])))

    grid = InProcessGrid(client_app, nodes, flat, on_reply=check_base)
    server_model = ServerModel(cfg, cfg.fl.max_rank)
    strategy_obj = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                                 lambda rec: None)
    strategy_obj.run(grid)

    # one client per round; someone skipped at least one round and still matched the base
    assert [v for _, v in checked] == [0, 1, 2, 3]
    first_round_of = {}
    for rnd, (pid, _) in enumerate(checked, start=1):
        first_round_of.setdefault(pid, rnd)
    assert any(rnd > 1 for rnd in first_round_of.values())


@pytest.mark.parametrize("optimizer", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_compose_with_linear_rules(optimizer):
    """The adopted global is the optimizer's step from the initial adapter toward the FedIT
    mean of the replies, recomputed here with a fresh optimizer (float64 mean)."""
    flat = tiny_config(strategy="fedit", server_optimizer=optimizer, num_server_rounds=1)
    replies = []
    records, _, glob, _ = run_rounds(flat, on_reply=replies.append)
    assert records[-1]["num_accepted"] == 3 and np.isfinite(records[-1]["eval_loss"])
    assert glob.updates == 1

    good = [r for r in replies if r.metadata.message_type == "train"]
    arrays = [{k: v.numpy() for k, v in r.content["arrays"].items()} for r in good]
    weights = [int(r.content["metrics"]["num-examples"]) for r in good]
    p = np.asarray(weights, dtype=np.float64) / sum(weights)
    mean = {k: sum(pk * a[k].astype(np.float64) for pk, a in zip(p, arrays, strict=True))
            for k in arrays[0]}
    cfg = config.from_flat(flat)  # a fresh server model: the run's now holds the new global
    initial = ServerModel(cfg, cfg.fl.max_rank).initial_global().arrays_for(8)
    reference = strategy_module.build_optimizer(cfg)
    want = reference.step(initial, {k: mean[k].astype(np.float32) for k in mean})
    # the server's float32 mean differs from this one by ≤ the derived float32 bound; the
    # first step's derivative in the mean is ≤ η(1−β1)/τ (adaptive) or η (FedAvgM)
    gain = (reference.lr if optimizer == "fedavgm"
            else reference.lr * (1 - reference.beta_1) / reference.tau)
    got = glob.arrays_for(8)
    assert got.keys() == want.keys()
    for key in want:
        bound = (gain * weighted_sum_bound([a[key] for a in arrays], weights)
                 + 2 * U32 * np.abs(want[key].astype(np.float64)))
        assert_within(got[key], want[key], bound, key)
    assert any(not np.array_equal(got[k], initial[k]) for k in got)  # it moved


def test_server_optimizer_refused_for_nonlinear_rules():
    with pytest.raises(ConfigError, match="server-optimizer"):
        run_rounds(tiny_config(strategy="flexlora", server_optimizer="fedadam"))


def test_rolora_alternates_the_trained_factor():
    replies = []
    records, *_ = run_rounds(tiny_config(strategy="rolora", num_server_rounds=3),
                             on_reply=replies.append)
    assert [r["phase"] for r in records[1:]] == ["b", "a", "b"]
    sent = [{k.rsplit(".", 2)[-2] for k in r.content["arrays"] if ".lora_" in k}
            for r in replies if r.metadata.message_type == "train"]
    assert sent == [{"lora_B"}] * 3 + [{"lora_A"}] * 3 + [{"lora_B"}] * 3


def test_fedprox_term_keeps_clients_closer_to_the_global_adapter():
    def drift(mu):
        replies = []
        run_rounds(tiny_config(num_server_rounds=1, **{"train.proximal-mu": mu,
                                                       "train.lr": 0.05}),
                   on_reply=replies.append)
        arrays = [r.content["arrays"] for r in replies if r.metadata.message_type == "train"]
        return sum(float(np.linalg.norm(a[k].numpy())) for a in arrays for k in a
                   if k.endswith("lora_B.weight"))  # B starts at 0: its norm is the drift

    assert drift(100.0) < 0.9 * drift(0.0)


def test_every_round_records_where_its_time_went():
    records, *_ = run_rounds(tiny_config(num_server_rounds=2), num_nodes=2)

    assert records[0]["discover_s"] > 0 and records[0]["eval_s"] > 0
    assert records[0]["time"] < records[1]["time"] < records[2]["time"]
    for rec in records[1:]:
        assert 0 < rec["client_train_s_max"] < rec["duration_s"]
        assert 0 < rec["client_load_s_max"] < rec["duration_s"]
        assert 0 < rec["aggregate_s"] < rec["duration_s"]


def test_every_round_records_server_and_client_memory():
    records, *_ = run_rounds(tiny_config(num_server_rounds=1), num_nodes=2)
    assert records[0]["server_rss_mb"] > 50
    assert records[1]["server_rss_mb"] > 50 and records[1]["client_rss_mb_max"] > 50
    for rec in records[1:]:
        assert rec["server_peak_rss_mb"] >= rec["server_rss_mb"]
        assert rec["client_peak_rss_mb_max"] >= rec["client_rss_mb_max"]
        assert rec["server_cpu_s"] > 0 and rec["client_cpu_s"] > 0


def _spy_on_the_fast_mean(monkeypatch) -> list[int]:
    """Counts the records each call of the server's zero-copy weighted mean averages."""
    calls: list[int] = []
    real = aggregate_stage.weighted_mean_records

    def spy(records, weights):
        calls.append(len(records))
        return real(records, weights)

    monkeypatch.setattr(aggregate_stage, "weighted_mean_records", spy)
    return calls


@pytest.mark.parametrize(("strategy", "extra", "rounds"), [
    ("fedit", {}, 3), ("ffa", {}, 3), ("fedsa", {}, 3), ("rolora", {}, 3),
    ("fedit", {"wire_dtype": "bfloat16"}, 2),
    ("fedit", {"server_optimizer": "fedadam"}, 1),
], ids=["fedit", "ffa", "fedsa", "rolora", "fedit-bfloat16", "fedit-fedadam"])
def test_the_zero_copy_mean_of_the_replies_equals_the_generic_aggregate(
        strategy, extra, rounds, monkeypatch):
    """Linear equal-rank rules average the replies' records as they arrived (float32
    accumulation); the generic path (decoded updates through ``aggregate``, float64
    accumulation) gives the same global adapter up to float32 rounding of that sum.

    Both paths are evaluated in every round on the *same* accepted replies (one run; the
    generic aggregate is computed beside the fast one), so no difference is carried from one
    round's training into the next. The bound is derived, not tuned. For one coordinate with
    replies x_k and p_k = w_k / Σw the exact mean is μ = Σ p_k x_k; let S = Σ p_k |x_k|:

    * fast: p_k is rounded to float32 (≤ U·p_k), then K products and K−1 sums in float32
      (≤ γ_K·S with γ_K = K·U/(1−K·U)), so |fast − μ| ≤ (K+1)·U·S to first order;
    * generic: float64 accumulation (negligible), one rounding to float32: ≤ U·|μ| ≤ U·S.

    Hence |fast − generic| ≤ (K+2)·U·S (``tolerances.weighted_sum_bound``).
    With FedAdam the adopted value is x + η·m/(√v+τ); in its first step m = (1−β1)Δ,
    v = (1−β2)Δ², whose derivative in the mean is at most η(1−β1)/τ, so the bound is
    multiplied by that, plus one float32 rounding of the new value."""
    flat = tiny_config(strategy=strategy, num_server_rounds=rounds, **extra)
    calls = _spy_on_the_fast_mean(monkeypatch)
    checked = _check_the_generic_path_beside_the_fast_one(monkeypatch)
    run_rounds(flat)

    assert calls == [3] * rounds  # the fast path ran in every round
    assert [c["round"] for c in checked] == list(range(1, rounds + 1))
    for c in checked:
        assert c["fast"].keys() == c["generic"].keys()
        for key, want in c["generic"].items():
            got = c["fast"][key]
            assert got.dtype == want.dtype == np.float32
            assert_within(got, want, c["bound"][key], f"round {c['round']} {key}")
        # agg_error = ‖ΔW* − ΔW_g‖/‖ΔW*‖: by the triangle inequality the two paths' values
        # differ by at most ‖ΔW_fast − ΔW_generic‖/‖ΔW*‖, computed here exactly
        for module, (e_fast, e_generic, slack) in c["agg_error"].items():
            assert abs(e_fast - e_generic) <= slack * (1 + 1e-9) + 1e-12, module


def _check_the_generic_path_beside_the_fast_one(monkeypatch) -> list[dict]:
    """In every round that takes the fast path, computes the generic aggregate of the same
    accepted replies and the derived bound on their difference (see the test above)."""
    from fedlora.federation.global_adapter import aggregate_heads, join_arrays

    checked: list[dict] = []
    real_records = aggregate_stage.records_to_average
    real_adopt = aggregate_stage.adopt_mean
    seen: list[list] = []  # the accepted replies of the round being aggregated

    def records_to_average(cfg, accepted):
        seen[:] = [list(accepted)]
        return real_records(cfg, accepted)

    def adopt_mean(cfg, glob, mean, sent, node, weight, plan, server_round):
        previous = glob.arrays_for(node.rank)  # before the round's result is adopted
        result, heads, update = real_adopt(cfg, glob, mean, sent, node, weight, plan,
                                           server_round)
        accepted = seen[0]
        updates = [item.update for item in accepted]
        weights = np.array([u.num_examples for u in updates], dtype=np.float64)
        p = weights / weights.sum()
        generic = aggregate_stage.apply_rule(cfg, glob, updates, plan, server_round)
        generic_heads = aggregate_heads([item.heads for item in accepted], list(weights))
        fast = join_arrays(result.for_client(node.rank), heads)
        slow = join_arrays(generic.for_client(node.rank), generic_heads)
        inputs = [join_arrays(item.update.factors, item.heads) for item in accepted]
        bound = {key: weighted_sum_bound([x[key] for x in inputs], weights) for key in slow}
        opt = strategy_module.build_optimizer(cfg)  # as the run's before its first step
        if opt is not None:
            import copy
            assert opt.name == "fedadam" and server_round == 1, "bound derived for step 1"
            fast = copy.deepcopy(opt).step(previous, fast)
            slow = copy.deepcopy(opt).step(previous, slow)
            gain = opt.lr * (1 - opt.beta_1) / opt.tau
            bound = {key: gain * b + 2 * U32 * np.abs(slow[key].astype(np.float64))
                     for key, b in bound.items()}
        agg_error = {}
        for module in result.modules:
            exact = sum(u.factors[module].scale * u.factors[module].b.astype(np.float64)
                        @ u.factors[module].a.astype(np.float64) * pk
                        for u, pk in zip(updates, p, strict=True))
            gap = np.linalg.norm(result.effective_delta(module) - generic.effective_delta(module))
            target = np.linalg.norm(exact)  # 0 under FedSA: the server's B is zero
            agg_error[module] = (result.diagnostics(updates)["agg_error"][module],
                                 generic.diagnostics(updates)["agg_error"][module],
                                 gap / target if target > 0 else 0.0)
        checked.append({"round": server_round, "fast": fast, "generic": slow, "bound": bound,
                        "agg_error": agg_error})
        return result, heads, update

    monkeypatch.setattr(aggregate_stage, "records_to_average", records_to_average)
    monkeypatch.setattr(aggregate_stage, "adopt_mean", adopt_mean)
    return checked


@pytest.mark.parametrize("extra", [{"clip_update_norm": 1e-6}, {"strategy": "hetlora"},
                                   {"dp_mode": "central", "strategy": "ffa"}])
def test_a_round_the_server_changed_or_a_non_mean_rule_takes_the_generic_path(
        extra, monkeypatch):
    calls = _spy_on_the_fast_mean(monkeypatch)
    records, *_ = run_rounds(tiny_config(num_server_rounds=1, **extra))
    assert records[1]["num_accepted"] == 3 and calls == []
