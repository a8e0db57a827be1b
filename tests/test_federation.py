"""Tests of fedlora.federation.global_adapter: array naming, the server's global adapter,
compression, heads."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from tolerances import U32, U64, assert_within

from fedlora.aggregation import (
    AggregationResult,
    ClientUpdate,
    LoraFactors,
    ServerOptimizer,
    aggregate,
    scale_for_rank,
)
from fedlora.federation.global_adapter import (
    GlobalAdapter,
    aggregate_heads,
    compress,
    join_arrays,
    split_arrays,
    stack,
)
from fedlora.learning.lora import LORA_A, LORA_B

SHAPES = {"m.q": (6, 5), "m.v": (4, 7)}  # module -> (out, in)
ALPHA = 16.0
R0 = 4  # rank of the initial adapter
HEAD = {"head.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "head.bias": np.array([0.5, -0.5], dtype=np.float32)}


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-9) -> None:
    """Relative closeness with an absolute floor at ``rtol · max|expected|``."""
    np.testing.assert_allclose(actual, expected, rtol=rtol,
                               atol=rtol * float(np.max(np.abs(expected))))


def _initial(rng: np.random.Generator, rank: int = R0) -> dict[str, LoraFactors]:
    """A PEFT-like initial adapter: random A, zero B."""
    return {m: LoraFactors(a=rng.normal(size=(rank, n)).astype(np.float32),
                           b=np.zeros((out, rank), np.float32), scale=ALPHA / rank)
            for m, (out, n) in SHAPES.items()}


def _update(rng: np.random.Generator, rank: int, num_examples: int,
            dtype: type = np.float64) -> ClientUpdate:
    return ClientUpdate(
        factors={m: LoraFactors(a=rng.normal(size=(rank, n)).astype(dtype),
                                b=rng.normal(size=(out, rank)).astype(dtype),
                                scale=scale_for_rank(rank, ALPHA))
                 for m, (out, n) in SHAPES.items()},
        num_examples=num_examples,
    )


def _target(updates: Sequence[ClientUpdate], module: str) -> np.ndarray:
    """Dense Σ p_k s_k B_k A_k computed the obvious way."""
    total = sum(u.num_examples for u in updates)
    return sum(u.num_examples / total * u.factors[module].delta() for u in updates)


# ----------------------------------------------------------------------------- naming


def test_split_join_round_trip(rng: np.random.Generator) -> None:
    # Prepare
    arrays = {}
    for m, (out, n) in SHAPES.items():
        arrays[m + LORA_A] = rng.normal(size=(3, n)).astype(np.float32)
        arrays[m + LORA_B] = rng.normal(size=(out, 3)).astype(np.float32)
    arrays.update(HEAD)

    # Execute
    factors, heads = split_arrays(arrays, scale=2.5)
    joined = join_arrays(factors, heads)

    # Assert
    assert sorted(factors) == sorted(SHAPES)
    assert sorted(heads) == sorted(HEAD)
    for m in SHAPES:
        assert factors[m].scale == 2.5
        assert np.array_equal(factors[m].a, arrays[m + LORA_A])
        assert np.array_equal(factors[m].b, arrays[m + LORA_B])
    assert sorted(joined) == sorted(arrays)
    for k, v in arrays.items():
        assert joined[k].dtype == np.float32
        assert np.array_equal(joined[k], v)


def test_join_casts_to_contiguous_float32(rng: np.random.Generator) -> None:
    a = rng.normal(size=(5, 2)).T  # (2, 5), not C-contiguous, float64
    factors = {"m": LoraFactors(a=a, b=np.ones((3, 2)), scale=1.0)}

    joined = join_arrays(factors, {"h": np.array([1.0, 2.0])})

    assert set(joined) == {"m" + LORA_A, "m" + LORA_B, "h"}
    assert all(v.dtype == np.float32 and v.flags["C_CONTIGUOUS"] for v in joined.values())
    assert np.array_equal(joined["m" + LORA_A], a.astype(np.float32))


# ----------------------------------------------------------------------------- initial state


@pytest.mark.parametrize(("rank", "rslora", "scale"),
                         [(1, False, 16.0), (2, False, 8.0), (4, False, 4.0),
                          (2, True, 16.0 / math.sqrt(2)), (4, True, 8.0)])
def test_arrays_for_slices_the_initial_adapter(rng: np.random.Generator, rank: int,
                                               rslora: bool, scale: float) -> None:
    initial = _initial(rng)
    initial = {m: LoraFactors(a=f.a, b=rng.normal(size=f.b.shape).astype(np.float32),
                              scale=f.scale) for m, f in initial.items()}
    glob = GlobalAdapter(initial, HEAD, lora_alpha=ALPHA, rslora=rslora)

    arrays = glob.arrays_for(rank)
    view = glob.view(rank)

    assert sorted(arrays) == sorted([m + s for m in SHAPES for s in (LORA_A, LORA_B)]
                                    + list(HEAD))
    for m, (out, n) in SHAPES.items():
        assert arrays[m + LORA_A].shape == (rank, n)
        assert arrays[m + LORA_B].shape == (out, rank)
        assert np.array_equal(arrays[m + LORA_A], initial[m].a[:rank])
        assert np.array_equal(arrays[m + LORA_B], initial[m].b[:, :rank])
        assert view[m].scale == pytest.approx(scale, rel=1e-12)
    for k, v in HEAD.items():
        assert np.array_equal(arrays[k], v)


def test_arrays_for_rank_above_initial_is_refused(rng: np.random.Generator) -> None:
    glob = GlobalAdapter(_initial(rng), HEAD, lora_alpha=ALPHA, rslora=False)

    with pytest.raises(ValueError, match="initial adapter has rank 4 at m.q; a client asked for 5"):
        glob.arrays_for(R0 + 1)


def test_fresh_global_adapter_has_nothing_to_export(rng: np.random.Generator) -> None:
    glob = GlobalAdapter(_initial(rng), HEAD, lora_alpha=ALPHA, rslora=False)

    assert glob.version == 0
    assert glob.updates == 0
    assert glob.export_factors() == {}
    assert glob.correction_since(0) == {}


# ----------------------------------------------------------------------------- corrections


@pytest.fixture
def flora_rounds(rng: np.random.Generator
                 ) -> tuple[GlobalAdapter, list[list[ClientUpdate]], list[AggregationResult]]:
    """Two FLoRA rounds (mixed ranks, 3 then 2 clients) applied to a global adapter."""
    glob = GlobalAdapter(_initial(rng), HEAD, lora_alpha=ALPHA, rslora=False)
    rounds = [[_update(rng, 2, 10), _update(rng, 4, 30), _update(rng, 3, 20)],
              [_update(rng, 4, 5), _update(rng, 2, 15)]]
    results = []
    for i, updates in enumerate(rounds):
        result = aggregate("flora", updates, lora_alpha=ALPHA, seed=100 + i)
        glob.apply(result, HEAD)
        results.append(result)
    return glob, rounds, results


def test_correction_since_sums_pending_rounds(flora_rounds) -> None:
    glob, rounds, results = flora_rounds

    assert glob.version == 2
    assert glob.updates == 2
    since_0 = glob.correction_since(0)
    since_1 = glob.correction_since(1)
    assert sorted(since_0) == sorted(since_1) == sorted(SHAPES)
    for m in SHAPES:
        # against the rules' own corrections …
        _close(since_0[m].delta(), results[0].base_correction[m].delta()
               + results[1].base_correction[m].delta())
        _close(since_1[m].delta(), results[1].base_correction[m].delta())
        # … and against the exact targets computed by hand
        _close(since_0[m].delta(), _target(rounds[0], m) + _target(rounds[1], m))
        _close(since_1[m].delta(), _target(rounds[1], m))
        assert since_0[m].scale == since_1[m].scale == 1.0
    assert glob.correction_since(2) == {}


@pytest.mark.parametrize("version", [-1, 3])
def test_correction_since_out_of_range(flora_rounds, version: int) -> None:
    glob, _, _ = flora_rounds

    with pytest.raises(ValueError, match=f"base version {version} is outside 0..2"):
        glob.correction_since(version)


def test_correction_stays_compact(flora_rounds) -> None:
    glob, _, _ = flora_rounds

    # stacked rank 9 + 6 = 15 exceeds min(m, n): stored at most at the dense rank
    for m, (out, n) in SHAPES.items():
        assert glob.correction_since(0)[m].rank <= min(out, n)


def test_export_after_flora_is_the_sum_of_effective_deltas(flora_rounds) -> None:
    glob, rounds, results = flora_rounds

    exported = glob.export_factors()

    assert sorted(exported) == sorted(SHAPES)
    for m in SHAPES:
        expected = results[0].effective_delta(m) + results[1].effective_delta(m)
        _close(exported[m].delta(), expected)
        _close(exported[m].delta(), _target(rounds[0], m) + _target(rounds[1], m))


def test_after_flora_clients_receive_a_fresh_adapter(flora_rounds) -> None:
    glob, _, _ = flora_rounds

    arrays_2, arrays_4 = glob.arrays_for(2), glob.arrays_for(4)

    for m in SHAPES:
        assert not np.any(arrays_4[m + LORA_B])
        assert np.any(arrays_4[m + LORA_A])
        assert np.array_equal(arrays_2[m + LORA_A], arrays_4[m + LORA_A][:2])


def test_export_after_fedex_is_corrections_plus_adapter(rng: np.random.Generator) -> None:
    """FedEx keeps a non-zero adapter: total = both corrections + the latest adapter."""
    glob = GlobalAdapter(_initial(rng), HEAD, lora_alpha=ALPHA, rslora=False)
    rounds = [[_update(rng, 4, 10), _update(rng, 4, 30)],
              [_update(rng, 4, 20), _update(rng, 4, 20), _update(rng, 4, 5)]]
    results = []
    for i, updates in enumerate(rounds):
        results.append(aggregate("fedex", updates, lora_alpha=ALPHA, seed=i))
        glob.apply(results[-1], HEAD)

    exported = glob.export_factors()

    for m in SHAPES:
        # round 2 trained on top of W0 + correction 1; its effective delta replaces adapter 1
        expected = results[0].base_correction[m].delta() + results[1].effective_delta(m)
        _close(exported[m].delta(), expected)
        _close(results[1].effective_delta(m), _target(rounds[1], m))


# ----------------------------------------------------------------------------- server optimizer


def test_fedavgm_with_lr_one_adopts_the_plain_aggregate(rng: np.random.Generator) -> None:
    # Prepare
    initial = _initial(rng)
    plain = GlobalAdapter(initial, HEAD, lora_alpha=ALPHA, rslora=False)
    optimized = GlobalAdapter(initial, HEAD, lora_alpha=ALPHA, rslora=False)
    updates = [_update(rng, R0, 10, np.float32), _update(rng, R0, 30, np.float32)]
    result = aggregate("fedit", updates, lora_alpha=ALPHA)
    new_head = {k: v + 1.0 for k, v in HEAD.items()}

    # Execute
    plain.apply(result, new_head)
    optimized.apply(result, new_head, optimizer=ServerOptimizer("fedavgm", lr=1.0), rank=R0)

    # Assert: bit-identical
    for m in SHAPES:
        g = result.global_factors[m]
        assert np.array_equal(optimized.adapter[m].a, g.a)
        assert np.array_equal(optimized.adapter[m].b, g.b)
        assert optimized.adapter[m].scale == g.scale
    a, b = optimized.arrays_for(R0), plain.arrays_for(R0)
    assert sorted(a) == sorted(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(optimized.heads[k], new_head[k]) for k in HEAD)
    assert optimized.updates == 1


def test_fedavgm_momentum_over_two_rounds(rng: np.random.Generator) -> None:
    """x2 = y2 + μ (y1 − x0) with η = 1: momentum carries the first round's step."""
    initial = _initial(rng)
    glob = GlobalAdapter(initial, HEAD, lora_alpha=ALPHA, rslora=False)
    optimizer = ServerOptimizer("fedavgm", lr=1.0, momentum=0.5)
    x0 = glob.arrays_for(R0)
    results = []
    for _ in range(2):
        updates = [_update(rng, R0, 10, np.float32), _update(rng, R0, 10, np.float32)]
        results.append(aggregate("fedit", updates, lora_alpha=ALPHA))
        glob.apply(results[-1], HEAD, optimizer=optimizer, rank=R0)

    y1 = join_arrays(results[0].for_client(R0), HEAD)
    y2 = join_arrays(results[1].for_client(R0), HEAD)
    got = glob.arrays_for(R0)
    for k in y2:
        terms = [y2[k].astype(np.float64), 0.5 * y1[k].astype(np.float64),
                 -0.5 * x0[k].astype(np.float64)]
        expected = sum(terms)
        # the optimizer sums the same float32 inputs in float64 (a few U64 of Σ|terms|),
        # then rounds once to float32 (U32·|x2|): a derived bound, order-free
        bound = 1.01 * U32 * np.abs(expected) + 4 * U64 * sum(np.abs(t) for t in terms)
        assert_within(got[k], expected, bound, k)


def test_server_optimizer_needs_a_linear_rule(rng: np.random.Generator) -> None:
    glob = GlobalAdapter(_initial(rng), HEAD, lora_alpha=ALPHA, rslora=False)
    result = aggregate("flora", [_update(rng, R0, 10), _update(rng, R0, 10)], lora_alpha=ALPHA)

    with pytest.raises(ValueError, match="'flora' is not"):
        glob.apply(result, HEAD, optimizer=ServerOptimizer("fedavgm"), rank=R0)
    assert glob.updates == 0
    assert glob.result is None


def test_refused_apply_leaves_the_correction_log_unchanged(rng: np.random.Generator) -> None:
    glob = GlobalAdapter(_initial(rng), HEAD, lora_alpha=ALPHA, rslora=False)
    result = aggregate("flora", [_update(rng, R0, 10), _update(rng, R0, 10)], lora_alpha=ALPHA)

    with pytest.raises(ValueError):
        glob.apply(result, HEAD, optimizer=ServerOptimizer("fedavgm"), rank=R0)

    assert glob.version == 0
    assert glob.correction_since(0) == {}


def test_server_optimizer_needs_a_rank(rng: np.random.Generator) -> None:
    glob = GlobalAdapter(_initial(rng), HEAD, lora_alpha=ALPHA, rslora=False)
    result = aggregate("fedit", [_update(rng, R0, 10), _update(rng, R0, 10)], lora_alpha=ALPHA)

    with pytest.raises(ValueError, match="server optimizers need"):
        glob.apply(result, HEAD, optimizer=ServerOptimizer("fedavgm"))


def test_fixed_rank_after_optimizer(rng: np.random.Generator) -> None:
    glob = GlobalAdapter(_initial(rng), HEAD, lora_alpha=ALPHA, rslora=False)
    result = aggregate("fedit", [_update(rng, R0, 10), _update(rng, R0, 10)], lora_alpha=ALPHA)
    glob.apply(result, HEAD, optimizer=ServerOptimizer("fedavgm"), rank=R0)

    with pytest.raises(ValueError, match="has rank 4 at m.q; a client of rank 2 cannot load it"):
        glob.arrays_for(2)


# ----------------------------------------------------------------------------- compress / stack


def _factors(rng: np.random.Generator, m: int, n: int, r: int, scale: float = 1.0,
             true_rank: int | None = None) -> LoraFactors:
    b = rng.normal(size=(m, r))
    if true_rank is not None:  # columns of B span only true_rank directions
        b = rng.normal(size=(m, true_rank)) @ rng.normal(size=(true_rank, r))
    return LoraFactors(a=rng.normal(size=(r, n)), b=b, scale=scale)


@pytest.mark.parametrize(
    ("m", "n", "r", "true_rank", "compressed", "out_rank"),
    [
        (6, 5, 1, None, False, 1),
        (6, 5, 2, None, False, 2),  # r == min(m, n) // 2: kept as is
        (6, 5, 3, None, True, 3),  # one above: refactored, nothing to drop
        (6, 5, 8, None, True, 5),  # above min(m, n): reduced to the dense rank
        (6, 5, 12, 2, True, 2),  # numerically rank 2
        (5, 9, 40, None, True, 5),
        (20, 30, 15, 3, True, 3),
    ],
)
def test_compress_keeps_the_product(rng: np.random.Generator, m: int, n: int, r: int,
                                    true_rank: int | None, compressed: bool,
                                    out_rank: int) -> None:
    f = _factors(rng, m, n, r, scale=2.5, true_rank=true_rank)

    g = compress(f)

    if not compressed:
        assert g is f
        return
    assert g.rank == out_rank
    assert g.scale == 1.0
    assert g.a.shape == (out_rank, n) and g.b.shape == (m, out_rank)
    _close(g.delta(), f.delta(), rtol=1e-5)


def test_compress_of_zero_product_keeps_one_zero_direction() -> None:
    f = LoraFactors(a=np.ones((8, 5)), b=np.zeros((6, 8)), scale=1.0)

    g = compress(f)

    assert g.rank == 1
    assert np.array_equal(g.delta(), np.zeros((6, 5)))


def test_stack_sums_the_products_with_scales(rng: np.random.Generator) -> None:
    parts = [_factors(rng, 6, 5, 1, scale=3.0), _factors(rng, 6, 5, 2, scale=0.5)]

    s = stack(parts)

    assert s.scale == 1.0
    _close(s.delta(), parts[0].delta() + parts[1].delta())


# ----------------------------------------------------------------------------- heads


def test_aggregate_heads_is_the_example_weighted_mean() -> None:
    heads = [{"w": np.array([[1.0, 2.0]], np.float32), "b": np.array([0.0], np.float32)},
             {"w": np.array([[5.0, 6.0]], np.float32), "b": np.array([4.0], np.float32)}]

    out = aggregate_heads(heads, [10, 30])

    assert sorted(out) == ["b", "w"]
    assert np.array_equal(out["w"], np.array([[4.0, 5.0]], np.float32))  # (10·1 + 30·5) / 40
    assert np.array_equal(out["b"], np.array([3.0], np.float32))
    assert all(v.dtype == np.float32 for v in out.values())


@pytest.mark.parametrize("weights", [[1, 1, 2], [0.25, 0.25, 0.5], [100, 100, 200]])
def test_aggregate_heads_depends_only_on_relative_weights(weights: list[float]) -> None:
    heads = [{"h": np.array([x], np.float32)} for x in (1.0, 3.0, 6.0)]

    out = aggregate_heads(heads, weights)

    np.testing.assert_allclose(out["h"], [4.0], rtol=1e-7)  # (1 + 3 + 12) / 4


def test_aggregate_heads_with_a_zero_weight_ignores_that_client() -> None:
    heads = [{"h": np.array([1.0], np.float32)}, {"h": np.array([9.0], np.float32)}]

    assert np.array_equal(aggregate_heads(heads, [5, 0])["h"], np.array([1.0], np.float32))


@pytest.mark.parametrize("heads", [[], [{}], [{}, {}]])
def test_aggregate_heads_without_heads(heads: list[dict[str, np.ndarray]]) -> None:
    assert aggregate_heads(heads, [1.0] * len(heads)) == {}
