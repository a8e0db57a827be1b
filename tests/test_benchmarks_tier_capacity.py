"""Tests of benchmarks.tier_capacity's measurement: dead components and numerical rank."""

from __future__ import annotations

import numpy as np

from benchmarks import tier_capacity
from fedlora.aggregation.factors import LoraFactors


def _planted() -> dict[int, dict[str, LoraFactors]]:
    """Views of three tiers over two modules with known dead components and ranks.

    Rank 4, module q: component 3 dead (A row and B column zero); component 2 has A = 0 but
    B ≠ 0 (live: B's gradient is not zero) and contributes nothing to B @ A; so rank 2.
    Rank 4, module v: full rank 4. Rank 2: one component carries 1e-9 of the other's singular
    value, below the 1e-6 relative tolerance (rank 1, no dead component)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 6))
    b = rng.normal(size=(5, 4))
    a_q, b_q = a.copy(), b.copy()
    a_q[2:] = 0.0
    b_q[:, 3] = 0.0
    a_small = np.eye(2, 6)
    b_small = np.zeros((5, 2))
    b_small[0, 0], b_small[1, 1] = 1.0, 1e-9
    return {4: {"q": LoraFactors(a_q, b_q, 2.0), "v": LoraFactors(a, b, 2.0)},
            2: {"q": LoraFactors(a_small, b_small, 8.0), "v": LoraFactors(a[:2], b[:, :2], 8.0)},
            1: {"q": LoraFactors(np.zeros((1, 6)), np.zeros((5, 1)), 16.0),
                "v": LoraFactors(a[:1], b[:, :1], 16.0)}}


def test_tier_capacity_counts_dead_components_and_the_lowest_numerical_rank_over_modules():
    views = _planted()

    out = tier_capacity.tier_capacity(views.__getitem__, (1, 2, 4))

    assert out == {"1": {"dead": 1, "rank": 0}, "2": {"dead": 0, "rank": 1},
                   "4": {"dead": 1, "rank": 2}}


def test_numerical_rank_is_relative_to_the_largest_singular_value_and_ignores_the_scale():
    b = np.diag([1.0, 1e-3, 1e-7])
    a = np.eye(3)

    assert tier_capacity.numerical_rank(b, a, 1.0) == 2
    assert tier_capacity.numerical_rank(b, a, 1e6) == 2
    assert tier_capacity.numerical_rank(b, a, 1.0, rtol=1e-8) == 3
    assert tier_capacity.numerical_rank(np.zeros((3, 3)), a, 1.0) == 0


def test_dead_components_need_both_the_a_row_and_the_b_column_zero():
    a = np.ones((3, 4))
    b = np.ones((2, 3))
    a[0], b[:, 1] = 0.0, 0.0  # neither dead: 0 has B, 1 has A
    assert tier_capacity.dead_components(b, a) == 0
    a[1] = 0.0
    assert tier_capacity.dead_components(b, a) == 1


def test_the_table_lists_every_round_with_each_tiers_dead_and_rank():
    rows = [{"round": 1, "sampled_tiers": [4, 8],
             "tiers": {"4": {"dead": 0, "rank": 4}, "8": {"dead": 0, "rank": 8},
                       "16": {"dead": 8, "rank": 8}}}]

    lines = tier_capacity.table("hetlora", rows).splitlines()

    assert lines[2].startswith("| round | tiers sampled | r=4 dead")
    assert lines[-1] == "| 1 | 4/8 | 0 | 4 | 0 | 8 | 8 | 8 |"
