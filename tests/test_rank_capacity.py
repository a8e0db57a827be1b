"""Mixed-rank rules keep every tier's capacity under partial participation (issue 20, defect 1).

A federation of 12 clients with ranks 4/8/16, 3 sampled per round, 10 rounds, through the pure
aggregation API. Each sampled client runs real gradient descent on its own least-squares target
``‖s B A − T_k‖²`` from what it received, so a component with ``A_j = 0`` and ``B_j = 0`` gets
exactly zero gradient and never moves, as in LoRA training.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.aggregation import ClientUpdate, LoraFactors, aggregate, mixed_rank_strategies
from fedlora.aggregation.diagnostics import tier_diagnostics
from fedlora.aggregation.views import init_rows

MODULE = "layer.0.query"
M, N, ALPHA = 24, 20, 16.0
RANKS = [4, 8, 16] * 4  # partition i has rank RANKS[i]
SAMPLING_SEED = 2  # its 10 rounds include {4, 4, 4} → {4, 4, 16}: see test_the_scenario_occurs


def sampled_rounds(rounds: int = 10) -> list[list[int]]:
    rng = np.random.default_rng(SAMPLING_SEED)
    return [sorted(rng.choice(len(RANKS), 3, replace=False).tolist()) for _ in range(rounds)]


def dead(f: LoraFactors) -> np.ndarray:
    """Components whose A row and B column are both exactly zero."""
    return ~(f.a.any(axis=1) | f.b.any(axis=0))


def local_training(received: LoraFactors, target: np.ndarray, steps: int = 5,
                   lr: float = 0.02) -> LoraFactors:
    a, b = received.a.astype(np.float64).copy(), received.b.astype(np.float64).copy()
    s = received.scale
    for _ in range(steps):
        residual = s * b @ a - target  # (m, n)
        grad_b, grad_a = 2 * s * residual @ a.T, 2 * s * b.T @ residual
        a, b = a - lr * grad_a, b - lr * grad_b
    return LoraFactors(a=a, b=b, scale=s)


def initial_global(rank: int = 16) -> LoraFactors:
    return LoraFactors(a=init_rows(MODULE, rank, N, seed=99), b=np.zeros((M, rank)),
                       scale=ALPHA / rank)


def run_federation(strategy: str, rounds: int = 10):
    """Yields (round, ranks sampled, what each client received, what it sent, result)."""
    rng = np.random.default_rng(0)
    targets = [rng.normal(size=(M, 3)) @ rng.normal(size=(3, N)) * 0.3 for _ in RANKS]
    previous = {MODULE: initial_global()}
    view = lambda r: {MODULE: LoraFactors(previous[MODULE].a[:r], previous[MODULE].b[:, :r],  # noqa: E731
                                          ALPHA / r)}
    for t, clients in enumerate(sampled_rounds(rounds), start=1):
        received = {k: view(RANKS[k])[MODULE] for k in clients}
        sent = {k: local_training(received[k], targets[k]) for k in clients}
        updates = [ClientUpdate({MODULE: sent[k]}, 10, client_id=str(k)) for k in clients]
        options = {"previous": previous} if strategy == "hetlora" else {}
        result = aggregate(strategy, updates, lora_alpha=ALPHA, max_rank=16, seed=t, **options)
        yield t, [RANKS[k] for k in clients], received, sent, result
        previous = dict(result.global_factors)
        view = lambda r, result=result: result.for_client(r)  # noqa: E731


def test_the_scenario_occurs():
    ranks = [[RANKS[k] for k in c] for c in sampled_rounds()]
    assert any(sum(ranks[t]) < 16 and 16 in ranks[t + 1] for t in range(9))  # flexlora's case
    assert any(16 not in ranks[t] and 16 in ranks[t + 1] for t in range(9))  # hetlora's case


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_rank16_tier_trains_every_component_after_a_round_without_it(strategy):
    checked = 0
    last_had_16 = True
    for _, ranks, received, sent, result in run_federation(strategy):
        for k, got in received.items():
            assert not dead(got).any(), f"client {k} (r={got.rank}) received dead components"
            if got.rank == 16 and not last_had_16:
                moved = (np.abs(sent[k].a - got.a).max(axis=1) > 0) | (
                    np.abs(sent[k].b - got.b).max(axis=0) > 0)
                assert moved[8:].all(), f"upper components {np.flatnonzero(~moved)} did not train"
                checked += 1
        assert not dead(result.for_client(16)[MODULE]).any()
        last_had_16 = 16 in ranks
    assert checked >= 1


def test_hetlora_keeps_the_upper_components_of_the_global_across_rounds():
    history = [(ranks, dict(result.global_factors)[MODULE])
               for _, ranks, _, _, result in run_federation("hetlora")]
    for (_, before), (ranks, after) in zip(history, history[1:], strict=False):
        assert after.rank == 16
        upper_after = after.scale * after.b[:, 8:] @ after.a[8:]
        upper_before = before.scale * before.b[:, 8:] @ before.a[8:]
        if 16 not in ranks:  # nobody trained components 8..15: carried over unchanged
            assert np.allclose(upper_after, upper_before)
        else:  # a rank-16 client trained them: they changed
            assert not np.allclose(upper_after, upper_before)
    final = history[-1][1]
    assert np.linalg.norm(final.b[:, 8:]) > 0


def test_hetlora_without_previous_reinitialises_the_untrained_components():
    rng = np.random.default_rng(3)
    updates = [ClientUpdate({MODULE: LoraFactors(rng.normal(size=(r, N)), rng.normal(size=(M, r)),
                                                 ALPHA / r)}, 10) for r in (4, 8)]
    got = aggregate("hetlora", updates, lora_alpha=ALPHA, seed=7).for_client(16)[MODULE]
    assert np.array_equal(got.a[8:], init_rows(MODULE, 16, N, 7)[8:])
    assert not got.b[:, 8:].any()


def test_hetlora_refuses_a_previous_global_of_another_shape():
    rng = np.random.default_rng(3)
    updates = [ClientUpdate({MODULE: LoraFactors(rng.normal(size=(4, N)), rng.normal(size=(M, 4)),
                                                 ALPHA / 4)}, 10)]
    bad = {MODULE: LoraFactors(np.zeros((16, N + 1)), np.zeros((M, 16)), 1.0)}
    with pytest.raises(ValueError, match="A must be"):
        aggregate("hetlora", updates, lora_alpha=ALPHA, previous=bad)


def _updates(data, ranks, zero_b):
    updates = []
    for i, r in enumerate(ranks):
        # no subnormals: another library in the suite's process may set flush-to-zero
        values = st.floats(-2, 2, allow_subnormal=False)
        a = np.asarray(data.draw(st.lists(values, min_size=r * 5, max_size=r * 5)))
        b = np.asarray(data.draw(st.lists(values, min_size=6 * r, max_size=6 * r)))
        a, b = a.reshape(r, 5), b.reshape(6, r)
        if zero_b[i]:
            b = np.zeros_like(b)
        updates.append(ClientUpdate({"w": LoraFactors(a, b, ALPHA / r)}, 1 + i))
    return updates


@settings(max_examples=60, deadline=None)
@given(data=st.data(), ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       zero_b=st.lists(st.booleans(), min_size=4, max_size=4))
def test_for_client_never_returns_a_dead_component(data, ranks, zero_b):
    """Contract: for every mixed-rank rule and every r <= max_rank, no component of what a
    client receives has its A row and B column both zero."""
    updates = _updates(data, ranks, zero_b)
    for name in mixed_rank_strategies():
        result = aggregate(name, updates, lora_alpha=ALPHA, max_rank=8, seed=5)
        for r in range(1, 9):
            got = result.for_client(r)["w"]
            assert got.rank == r
            assert not dead(got).any(), f"{name}: r={r} got dead components {dead(got)}"


def test_tier_diagnostics_counts_dead_components_and_effective_rank():
    a = np.eye(3, 5)
    b = np.zeros((4, 3))
    b[0, 0], b[1, 1] = 2.0, 1.0  # component 2: A row nonzero, B column zero → live
    dead_a = a.copy()
    dead_a[2] = 0.0  # component 2 dead
    views = {3: {"m": LoraFactors(a, b, 0.5)}, 2: {"m": LoraFactors(dead_a[:2], b[:, :2], 1.0)},
             4: {"m": LoraFactors(np.vstack([dead_a, np.zeros((1, 5))]),
                                  np.hstack([b, np.zeros((4, 1))]), 1.0)}}
    out = tier_diagnostics(views.__getitem__, [3, 4, 3, 2])
    assert out["tier_dead_components"] == {"2": 0.0, "3": 0.0, "4": 2.0}
    q = np.array([2.0, 1.0]) / 3.0
    assert out["tier_effective_rank"]["3"] == pytest.approx(np.exp(-(q * np.log(q)).sum()))


def test_strategy_keeps_the_top_tier_alive_and_logs_what_each_tier_receives():
    """The real strategy and clients, in process: 6 nodes of ranks 4/8/16, 2 sampled per round.
    Round 2 samples no rank-16 node; the rank-16 tier keeps all 16 live components."""
    from fl_harness import run_rounds, tiny_config

    records, _, glob, _ = run_rounds(tiny_config(
        strategy="hetlora", rank_by_partition="4,8,16,4,8,16", num_train_nodes=2,
        num_server_rounds=3), num_nodes=6)
    tiers = [[(4, 8, 16)[c % 3] for c in r["clients"]] for r in records[1:]]
    assert 16 not in tiers[1] and 16 in tiers[0]  # the scenario: a round without the top tier
    for record in records[1:]:
        assert set(record["tier_effective_rank"]) == {"4", "8", "16"}
        assert record["tier_dead_components"] == {"4": 0.0, "8": 0.0, "16": 0.0}
    after_gap = records[2]["tier_effective_rank"]
    assert after_gap["16"] > after_gap["8"]  # the upper components were kept, not zeroed
    assert {f.rank for f in glob.adapter.values()} == {16}
