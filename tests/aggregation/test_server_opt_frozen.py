"""Server optimizers never move a factor the rule froze this round (issue 20, defect 3)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import ClientUpdate, LoraFactors, ServerOptimizer, aggregate
from fedlora.federation.global_adapter import GlobalAdapter
from fedlora.learning.lora import LORA_A, LORA_B

MODULE = "layer.0.query"
ALPHA, RANK, M, N = 8.0, 4, 6, 5


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_a_frozen_array_keeps_its_value_and_its_moments(name):
    rng = np.random.default_rng(0)
    momentum = 0.9 if name == "fedavgm" else 0.0
    optimizer = ServerOptimizer(name, lr=0.1, momentum=momentum)
    x0 = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    x1 = optimizer.step(x0, {k: v + rng.normal(size=v.shape) for k, v in x0.items()})
    before = optimizer.state_dict()

    x2 = optimizer.step(x1, {"a": x1["a"].copy(), "b": x1["b"] + 1.0}, frozen=["a"])

    np.testing.assert_array_equal(x2["a"], x1["a"])  # stale momentum would have moved it
    after = optimizer.state_dict()
    for key in before:
        if key.endswith("/a"):
            np.testing.assert_array_equal(after[key], before[key])
    assert not np.array_equal(x2["b"], x1["b"])


def test_unknown_frozen_names_are_refused():
    optimizer = ServerOptimizer("fedadam")
    with pytest.raises(ValueError, match="not among the aggregated arrays"):
        optimizer.step({"a": np.zeros(2)}, {"a": np.ones(2)}, frozen=["lora_A"])


def test_an_array_frozen_from_the_first_step_gets_moments_when_it_thaws():
    optimizer = ServerOptimizer("fedadam", lr=0.1)
    x0 = {"a": np.zeros(3), "b": np.zeros(3)}
    x1 = optimizer.step(x0, {"a": np.zeros(3), "b": np.ones(3)}, frozen=["a"])
    x2 = optimizer.step(x1, {"a": np.ones(3), "b": x1["b"]}, frozen=["b"])
    assert (x2["a"] > 0).all() and np.array_equal(x2["b"], x1["b"])


def _rolora_round(glob, rng, phase):
    sent = glob.view(RANK)[MODULE]
    updates = []
    for k in range(3):
        a, b = sent.a.copy(), sent.b.copy()
        if phase == "b":
            b = b + 0.1 * rng.normal(size=b.shape)
        else:
            a = a + 0.1 * rng.normal(size=a.shape)
        updates.append(ClientUpdate({MODULE: LoraFactors(a, b, ALPHA / RANK)}, 10 + k))
    return aggregate("rolora", updates, lora_alpha=ALPHA, phase=phase)


def test_fedadam_leaves_rolora_frozen_factor_exactly_as_it_was():
    rng = np.random.default_rng(1)
    init = {MODULE: LoraFactors(rng.uniform(-0.4, 0.4, (RANK, N)).astype(np.float32),
                                np.zeros((M, RANK), np.float32), ALPHA / RANK)}
    glob = GlobalAdapter(init, {}, ALPHA, False)
    optimizer = ServerOptimizer("fedadam", lr=0.01)
    for t in range(1, 7):
        phase = "b" if t % 2 else "a"
        before = glob.view(RANK)[MODULE]
        result = _rolora_round(glob, rng, phase)
        assert result.frozen == {"a" if phase == "b" else "b"}
        glob.apply(result, {}, optimizer, rank=RANK)
        after = glob.view(RANK)[MODULE]
        frozen, trained = ("a", "b") if phase == "b" else ("b", "a")
        np.testing.assert_array_equal(getattr(after, frozen), getattr(before, frozen))
        assert not np.array_equal(getattr(after, trained), getattr(before, trained))


def test_fedavgm_momentum_never_moves_fedsa_b_that_the_server_never_sees():
    """FedSA's clients send only A; the server's B is what it sent, so Δ_B = 0 each round and
    momentum from an earlier non-zero Δ_B would drift it. ``frozen="b"`` keeps it."""
    rng = np.random.default_rng(2)
    init = {MODULE: LoraFactors(rng.normal(size=(RANK, N)).astype(np.float32),
                                rng.normal(size=(M, RANK)).astype(np.float32), ALPHA / RANK)}
    glob = GlobalAdapter(init, {}, ALPHA, False)
    optimizer = ServerOptimizer("fedavgm", lr=1.0, momentum=0.9)
    # momentum on B from a step where B did move
    optimizer.step({MODULE + LORA_A: init[MODULE].a, MODULE + LORA_B: init[MODULE].b},
                   {MODULE + LORA_A: init[MODULE].a, MODULE + LORA_B: init[MODULE].b + 1.0})
    sent = glob.view(RANK)[MODULE]
    updates = [ClientUpdate({MODULE: LoraFactors(sent.a + 0.1 * rng.normal(size=sent.a.shape),
                                                 sent.b, sent.scale)}, 10) for _ in range(2)]
    glob.apply(aggregate("fedsa", updates, lora_alpha=ALPHA), {}, optimizer, rank=RANK,
               frozen="b")
    np.testing.assert_array_equal(glob.view(RANK)[MODULE].b, sent.b)
