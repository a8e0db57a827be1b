"""HetLoRA's local rank self-pruning (fedlora.learning.hetlora_prune, hetlora-prune = true)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora import config
from fedlora.errors import ConfigError
from fedlora.learning import hetlora_prune

A_KEY = "m.lora_A.weight"
B_KEY = "m.lora_B.weight"


def _adapter() -> dict[str, np.ndarray]:
    """Rank 4, n = 2, m = 2; with γ = 0.5 the tail is components 2, 3:
    B_t A_t = [[3, 0], [0, 4]] @ [[1, 0], [0, 1]] = diag(3, 4), ‖·‖_F = 5."""
    a = np.array([[7.0, 1.0], [2.0, 9.0], [1.0, 0.0], [0.0, 1.0]])
    b = np.array([[5.0, 6.0, 3.0, 0.0], [8.0, 1.0, 0.0, 4.0]])
    return {A_KEY: a, B_KEY: b, "classifier.weight": np.ones((3, 2))}


def test_pruning_decision_matches_the_hand_computed_tail_norm():
    arrays = _adapter()
    assert hetlora_prune.tail_start(4, 0.5) == 2
    assert hetlora_prune.tail_norm(arrays, 0.5) == pytest.approx(5.0)
    # prune iff the tail norm fell since the previous round at the same rank
    assert hetlora_prune.decide(4, 5.0, {"rank": 4, "norm": 5.5}, 0.5) == 2
    assert hetlora_prune.decide(4, 5.0, {"rank": 4, "norm": 5.0}, 0.5) == 4
    assert hetlora_prune.decide(4, 5.0, {"rank": 4, "norm": 4.9}, 0.5) == 4
    assert hetlora_prune.decide(4, 5.0, None, 0.5) == 4  # first participation
    assert hetlora_prune.decide(4, 5.0, {"rank": 8, "norm": 9.0}, 0.5) == 4  # other tail
    # the paper's γ = 0.99: one component at a time, never below rank 1
    assert [hetlora_prune.pruned_rank(r, 0.99) for r in (16, 8, 4, 2, 1)] == [15, 7, 3, 1, 1]
    assert hetlora_prune.decide(1, 0.0, {"rank": 1, "norm": 1.0}, 0.99) == 1
    out = hetlora_prune.truncate(arrays, 2)
    assert out[A_KEY].shape == (2, 2) and out[B_KEY].shape == (2, 2)
    np.testing.assert_array_equal(out[A_KEY], arrays[A_KEY][:2])
    np.testing.assert_array_equal(out["classifier.weight"], arrays["classifier.weight"])


def test_tail_penalty_equals_the_numpy_norm_and_has_zero_gradient_at_b_zero():
    arrays = _adapter()
    params = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()
              if "lora" in k}
    penalty = hetlora_prune.tail_penalty(params, 0.5)
    assert float(penalty) == pytest.approx(5.0)
    penalty.backward()
    # d‖B_t A_t‖/dB_t = (B_t A_t) A_tᵀ / ‖·‖ = diag(3, 4) / 5 on the tail, 0 on the head
    np.testing.assert_allclose(params[B_KEY].grad.numpy(),
                               [[0, 0, 0.6, 0], [0, 0, 0, 0.8]], atol=1e-12)
    zero = {A_KEY: torch.tensor(arrays[A_KEY], requires_grad=True),
            B_KEY: torch.zeros((2, 4), dtype=torch.float64, requires_grad=True)}
    hetlora_prune.tail_penalty(zero, 0.5).backward()
    assert torch.all(torch.isfinite(zero[B_KEY].grad)) and not zero[B_KEY].grad.any()


def test_config_refuses_pruning_outside_plain_hetlora():
    flat = config.defaults()
    with pytest.raises(ConfigError, match="strategy = 'hetlora'"):
        config.from_flat({**flat, "hetlora-prune": True})
    with pytest.raises(ConfigError, match="secure-aggregation = false"):
        config.from_flat({**flat, "strategy": "hetlora", "hetlora-prune": True,
                          "secure-aggregation": True})
    with pytest.raises(ConfigError, match="0.99"):
        config.from_flat({**flat, "strategy": "hetlora", "hetlora-prune-gamma": 1.0})
    assert not config.from_flat(flat).fl.hetlora_prune  # off by default: current behaviour


def test_mixed_rank_sampled_run_prunes_by_the_rule_and_rejects_a_bad_claim():
    """6 nodes of ranks 4/8/16, 3 sampled per round, 6 rounds, hetlora-prune with a strong λ.
    A node's rank only shrinks, each time to max(1, floor(0.99 r)) right after it reported a
    prune, and the server then sends it that rank; the global keeps rank 16 with no dead
    component. One node's reply of round 2 claims a rank above what it was sent, another's of
    round 4 a prune the rule does not allow: both are rejected (RANK_MISMATCH), the run goes on."""
    from fl_harness import run_rounds, tiny_config

    from fedlora.federation.transport import pack, unpack

    replies: list[dict] = []
    tampered: list[tuple[int, int]] = []

    def on_reply(reply):
        if reply.has_error() or "arrays" not in reply.content:  # capability answers
            return
        m = dict(reply.content["metrics"])
        rnd, pid = int(m["server-round"]), int(m["partition-id"])
        arrays = unpack(reply.content["arrays"])
        rank = hetlora_prune.adapter_rank(arrays)
        bad = None
        if rnd == 2 and not any(t[0] == 2 for t in tampered):  # above the rank sent
            bad = {k: (np.pad(v, ((0, 1), (0, 0))) if "lora_A" in k else
                       np.pad(v, ((0, 0), (0, 1))) if "lora_B" in k else v)
                   for k, v in arrays.items()}
        elif rnd == 4 and rank >= 4 and not any(t[0] == 4 for t in tampered):
            bad = hetlora_prune.truncate(arrays, rank - 2)  # not one prune of γ = 0.99
        if bad is not None:
            tampered.append((rnd, pid))
            reply.content["arrays"] = pack(bad)
        replies.append({"round": rnd, "pid": pid, "trained": int(m["lora-rank"]),
                        "pruned": int(m["pruned-rank"]), "tampered": bad is not None})

    records, grid, glob, _ = run_rounds(tiny_config(
        strategy="hetlora", rank_by_partition="4,8,16,4,8,16", num_train_nodes=3,
        num_server_rounds=6, hetlora_prune=True, hetlora_prune_lambda=1.0), num_nodes=6,
        on_reply=on_reply)
    rounds = records[1:]
    assert len(rounds) == 6 and len(tampered) == 2
    assert sum(r["rejected"].get("RANK_MISMATCH", 0) for r in rounds) == 2
    accepted = {(r["round"], c) for r in rounds for c in r["clients"]}
    sent = {}  # (round, partition) -> the rank the server sent
    for msg in grid.delivered:
        if msg.metadata.message_type == "train":
            ctx = grid.contexts[msg.metadata.dst_node_id]
            pid = int(ctx.node_config["partition-id"])
            sent[(int(msg.content["config"]["server-round"]), pid)] = int(
                msg.content["config"]["lora-rank"])
    current = {pid: (4, 8, 16)[pid % 3] for pid in range(6)}
    prunes = 0
    for rep in sorted(replies, key=lambda x: x["round"]):
        key = (rep["round"], rep["pid"])
        assert sent[key] == rep["trained"] == current[rep["pid"]]  # the server's rank is used
        assert rep["pruned"] in (rep["trained"], hetlora_prune.pruned_rank(rep["trained"], 0.99))
        if key in accepted and not rep["tampered"]:
            prunes += rep["pruned"] < rep["trained"]
            current[rep["pid"]] = rep["pruned"]
        else:
            assert rep["tampered"] and key not in accepted
    assert prunes >= 2  # the rule acted in this run
    assert sum(r.get("pruned", 0) for r in rounds) == prunes
    for record in rounds:
        assert record["tier_dead_components"] == {"4": 0.0, "8": 0.0, "16": 0.0}
    for f in glob.adapter.values():
        assert f.rank == 16
        live = np.abs(f.a).sum(axis=1) + np.abs(f.b).sum(axis=0)
        assert np.all(live > 0)


def test_pruned_ranks_survive_a_checkpoint(tmp_path):
    """A resumed server sends each node the rank it pruned to, not its tier rank again."""
    from fl_harness import tiny_config

    from fedlora.federation import checkpoint
    from fedlora.learning.evaluator import ServerModel
    from server.strategy import FederatedLora, NodeInfo

    flat = tiny_config(strategy="hetlora", rank_by_partition="4,8,16", hetlora_prune=True)
    cfg = config.from_flat(flat)
    model = ServerModel(cfg, cfg.fl.max_rank)
    first = FederatedLora(cfg, model.initial_global(), model.evaluate, lambda rec: None)
    first.pruned_ranks = {2: 15, 1: 7}
    first.save_checkpoint(tmp_path, 1)
    second = FederatedLora(cfg, model.initial_global(), model.evaluate, lambda rec: None)
    second.restore(checkpoint.load_latest(tmp_path))
    assert second.pruned_ranks == {2: 15, 1: 7}
    assert second._current_rank(NodeInfo(9, 2, 16)).rank == 15
    assert second._current_rank(NodeInfo(8, 0, 4)).rank == 4
