"""Under ``strategy = robust`` the declared heads are aggregated robustly too (the rule's own
clipping and reducer), not by the example-weighted mean: one ×100 head outlier among K = 5
sampled of 7 nodes (mixed ranks, partial participation) does not move the global head."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from fedlora import config
from fedlora.aggregation.robust import robust_heads
from server.strategy import FederatedLora, NodeInfo
from tests.fl_harness import tiny_config
from tests.test_fuzz_replies import (  # noqa: F401 — _task_identity: the autouse fixture
    HEAD,
    FakeGrid,
    _task_identity,
    honest_arrays,
    honest_reply,
    make_glob,
)

RANKS = (2, 4, 8, 2, 4, 8, 4)  # 7 nodes, 5 sampled per round
OUTLIER = 100.0


def _robust_round(reducer: str, clip_multiplier: float):
    flat = tiny_config(**{"strategy": "robust", "robust-reducer": reducer,
                          "robust-trim": 0.1, "robust-clip-multiplier": clip_multiplier,
                          "min-accepted": 3, "num-train-nodes": 5, "max-rank": 8,
                          "max-update-norm": 0.0, "seed": 5})
    strategy = FederatedLora(config.from_flat(flat), make_glob(8), lambda _: None,
                             lambda _: None)
    infos = [NodeInfo(node_id=100 + p, partition_id=p, rank=r) for p, r in enumerate(RANKS)]
    sampled = strategy.sample(infos, 1)
    attacker = sampled[2].partition_id
    sent_head = strategy.glob.heads[HEAD].astype(np.float64)
    honest: list[np.ndarray] = []

    def respond(msg, partition):
        reply = honest_reply(msg, partition)
        head = reply.content["arrays"][HEAD].numpy().astype(np.float64)
        if partition == attacker:  # its head moved 100 times as far as an honest one
            head = sent_head + OUTLIER * (head - sent_head)
            reply.content["arrays"][HEAD] = Array(head.astype(np.float32))
        else:
            honest.append(head)
        return reply

    grid = FakeGrid({n.node_id: n.partition_id for n in infos}, respond)
    record = strategy.train_round(grid, infos, 1)
    return strategy, record, attacker, sampled, sent_head, np.stack(honest)


@pytest.mark.parametrize("reducer", ["median", "trimmed-mean"])
def test_one_x100_head_outlier_leaves_the_global_head_inside_the_honest_range(reducer):
    strategy, record, attacker, sampled, _, honest = _robust_round(reducer, 0.0)

    assert len(sampled) == 5 and attacker in record["clients"] and len(honest) == 4
    got = strategy.glob.heads[HEAD].astype(np.float64)
    # a coordinate-wise median or trimmed mean of 5 with one outlier lies within the honest
    # clients' values, coordinate by coordinate; the example-weighted mean lies far outside
    assert np.all(got >= honest.min(axis=0) - 1e-6) and np.all(got <= honest.max(axis=0) + 1e-6)


def test_clipping_bounds_a_x100_head_change_under_the_mean_reducer():
    strategy, record, attacker, _, sent_head, honest = _robust_round("mean", 2.0)

    assert attacker in record["clients"]
    honest_norms = np.linalg.norm((honest - sent_head).reshape(len(honest), -1), axis=1)
    moved = np.linalg.norm(strategy.glob.heads[HEAD] - sent_head)
    # the outlier's change is clipped to 2 × the median change: the mean moves by at most
    # (4 honest + 2 × median) / 5 of the largest honest change; unclipped it is about 20 ×
    assert moved <= 1.2 * honest_norms.max()


def test_robust_heads_median_trimmed_mean_and_clip_by_hand():
    received = {"h": np.zeros(2)}
    heads = [{"h": np.array([1.0, -1.0])}, {"h": np.array([2.0, 0.0])},
             {"h": np.array([3.0, 1.0])}, {"h": np.array([400.0, 300.0])}]
    sent = [received] * 4
    np.testing.assert_allclose(robust_heads(heads, sent, reducer="median")["h"], [2.5, 0.5])
    np.testing.assert_allclose(robust_heads(heads, sent, reducer="trimmed-mean", trim=0.1)["h"],
                               [2.5, 0.5])
    # norms 1.41, 2, 3.16, 500; bound 1.5 × median 2.58 = 3.87: only the outlier is scaled,
    # to norm 3.87 along (4, 3)
    clipped = robust_heads(heads, sent, reducer="mean", clip_multiplier=1.5)["h"]
    bound = 1.5 * float(np.median([np.sqrt(2), 2.0, np.sqrt(10), 500.0]))
    np.testing.assert_allclose(clipped, (np.array([6.0, 0.0]) + bound * np.array([0.8, 0.6]))
                               / 4, rtol=1e-6)
    assert robust_heads([], [], reducer="median") == {}
    with pytest.raises(ValueError, match="needs what each"):
        robust_heads(heads, sent[:3])
    with pytest.raises(ValueError, match="every update needs the heads"):
        robust_heads([*heads[:3], {"g": np.zeros(2)}], sent)
