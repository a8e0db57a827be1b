"""raFLoRA: each rank band averaged over the clients that hold it, then SVD allocation."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import ClientUpdate, LoraFactors, aggregate, strategy_info
from fedlora.aggregation.raflora import ROW_NORM
from fedlora.privacy.secagg import secagg_compatible

from .helpers import random_update

SHAPES = {"layer.0.query": (40, 30), "layer.0.value": (24, 36)}
RANKS = (4, 8, 16, 4, 16, 8)
SIZES = (5, 9, 2, 7, 4, 3)


def clients(rng, ranks=RANKS, sizes=SIZES):
    return [random_update(rng, r, n, shapes=SHAPES, client_id=f"c{i}")
            for i, (r, n) in enumerate(zip(ranks, sizes, strict=True))]


def dense_banded(updates, module):
    """Σ over bands (0,4], (4,8], (8,16] of the holders' re-normalised mean, densely."""
    total = np.zeros(SHAPES[module])
    for lo, hi in ((0, 4), (4, 8), (8, 16)):
        holders = [u for u in updates if u.factors[module].rank >= hi]
        weight = sum(u.num_examples for u in holders)
        for u in holders:
            f = u.factors[module]
            total += u.num_examples / weight * f.scale * f.b[:, lo:hi] @ f.a[lo:hi]
    return total


def both_zero(f: LoraFactors) -> np.ndarray:
    """Components whose A row and B column are both exactly zero."""
    return (np.abs(f.a).max(axis=1) == 0) & (np.abs(f.b).max(axis=0) == 0)


def test_raflora_is_the_banded_mean_of_a_dense_reference(rng):
    updates = clients(rng)
    result = aggregate("raflora", updates)
    for module in SHAPES:
        np.testing.assert_allclose(result.effective_delta(module), dense_banded(updates, module),
                                   atol=1e-10)


def test_components_above_rank_8_come_only_from_the_rank_16_clients(rng):
    """Moving the rank-16 clients' components 9..16 moves ΔW by their mean over the rank-16
    tier alone, at full weight (FlexLoRA: by Σ p_k over all clients, i.e. shrunk by P_16);
    nothing any rank-4 or rank-8 client sends reaches those components."""
    updates = clients(rng)
    tier = [i for i, r in enumerate(RANKS) if r == 16]
    moved = list(updates)
    kicks = {}
    for i in tier:
        factors = dict(updates[i].factors)
        for module, f in factors.items():
            kick = np.zeros_like(f.b)
            kick[:, 8:] = rng.normal(size=(f.b.shape[0], 8))
            kicks[i, module] = kick
            factors[module] = LoraFactors(a=f.a, b=f.b + kick, scale=f.scale)
        moved[i] = ClientUpdate(factors, updates[i].num_examples, updates[i].client_id)

    before, after = aggregate("raflora", updates), aggregate("raflora", moved)
    flex_before, flex_after = aggregate("flexlora", updates), aggregate("flexlora", moved)

    tier_weight = sum(SIZES[i] for i in tier)
    for module in SHAPES:
        want = sum(SIZES[i] / tier_weight * updates[i].factors[module].scale
                   * kicks[i, module] @ updates[i].factors[module].a for i in tier)
        got = after.effective_delta(module) - before.effective_delta(module)
        np.testing.assert_allclose(got, want, atol=1e-9)
        flex = flex_after.effective_delta(module) - flex_before.effective_delta(module)
        np.testing.assert_allclose(flex, tier_weight / sum(SIZES) * want, atol=1e-9)


def test_with_equal_ranks_raflora_is_flexloras_aggregate(rng):
    updates = clients(rng, ranks=(8, 8, 8), sizes=(3, 1, 6))
    ra, flex = aggregate("raflora", updates), aggregate("flexlora", updates)
    for module in SHAPES:
        np.testing.assert_allclose(ra.effective_delta(module), flex.effective_delta(module),
                                   atol=1e-10)


def test_a_client_of_rank_r_gets_the_best_rank_r_approximation_with_peft_sized_a_rows(rng):
    updates = clients(rng)
    result = aggregate("raflora", updates, max_rank=32)
    for r in (4, 8, 16):
        for module, f in result.for_client(r).items():
            u, s, vt = np.linalg.svd(dense_banded(updates, module))
            np.testing.assert_allclose(f.scale * f.b @ f.a, (u[:, :r] * s[:r]) @ vt[:r],
                                       atol=1e-9)
            np.testing.assert_allclose(np.linalg.norm(f.a, axis=1), ROW_NORM, rtol=1e-10)


def test_raflora_never_hands_out_a_component_with_a_and_b_both_zero(rng):
    """A round of two rank-4 clients gives an aggregate of rank 8: a rank-16 (or rank-32)
    client gets 8 SVD components and the rest re-initialised (A drawn as PEFT does, B = 0)."""
    updates = clients(rng, ranks=(4, 4), sizes=(2, 3))
    result = aggregate("raflora", updates, max_rank=32, seed=11)
    for r in range(1, 33):
        for module, f in result.for_client(r).items():
            assert not both_zero(f).any(), (r, module)
    for module, f in result.for_client(32).items():
        n = SHAPES[module][1]
        np.testing.assert_array_equal(f.b[:, 8:], 0.0)
        assert np.abs(f.a[8:]).max() <= 1 / np.sqrt(n)  # PEFT's init bound
        assert np.linalg.matrix_rank(f.a[8:]) == min(24, n)  # fresh directions, not copies
    again = aggregate("raflora", updates, max_rank=32, seed=11).for_client(32)
    other = aggregate("raflora", updates, max_rank=32, seed=12).for_client(32)
    module = "layer.0.query"
    np.testing.assert_array_equal(again[module].a, result.for_client(32)[module].a)
    assert not np.array_equal(other[module].a[8:], again[module].a[8:])


def test_sampled_rounds_of_mixed_ranks_keep_every_component_alive():
    """12 clients with ranks 4/8/16, 2 sampled per round, 10 rounds; clients move both
    factors a little from what they received. No round, sampled tiers whatever they are,
    hands any rank a dead component, and the rank-16 tier's upper components keep moving
    in the round after one without a rank-16 participant."""
    rng = np.random.default_rng(5)
    ranks = [4, 8, 16] * 4
    received = {r: None for r in (4, 8, 16)}
    result = None
    without_16, checked = [], 0
    for round_ in range(10):
        picked = sorted(rng.choice(12, size=2, replace=False).tolist())
        updates = []
        for i in picked:
            r = ranks[i]
            start = result.for_client(r) if result is not None else {
                m: LoraFactors(a=rng.uniform(-0.1, 0.1, size=(r, n)), b=np.zeros((m_, r)),
                               scale=16.0 / r) for m, (m_, n) in SHAPES.items()}
            trained = {m: LoraFactors(a=f.a + 0.01 * rng.normal(size=f.a.shape),
                                      b=f.b + 0.01 * rng.normal(size=f.b.shape), scale=f.scale)
                       for m, f in start.items()}
            updates.append(ClientUpdate(trained, num_examples=int(rng.integers(1, 10))))
        result = aggregate("raflora", updates, max_rank=16, seed=round_)
        for r in range(1, 17):
            for module, f in result.for_client(r).items():
                assert not both_zero(f).any(), (round_, r, module)
        top = result.for_client(16)
        if received[16] is not None and without_16 and without_16[-1] == round_ - 1:
            checked += 1
            for module in SHAPES:  # the components 9..16 a rank-16 client trains next
                assert not np.allclose(top[module].a[8:], received[16][module].a[8:])
        if 16 not in {ranks[i] for i in picked}:
            without_16.append(round_)
        received[16] = top
    assert checked, "the seed must give a round right after one without a rank-16 client"


def test_raflora_is_declared_mixed_rank_and_outside_secure_aggregation():
    info = strategy_info("raflora")
    assert not info.equal_ranks and not info.linear and not info.exact
    assert not secagg_compatible("raflora")[0]


def test_raflora_refuses_updates_above_max_rank(rng):
    with pytest.raises(Exception, match="rank"):
        aggregate("raflora", clients(rng), max_rank=8)
