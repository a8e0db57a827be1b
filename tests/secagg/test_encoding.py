"""Fixed-point encoding: exact boundaries, no wraparound, and the documented error bound."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.privacy.secagg import ArrayLayout, DecodedSum, FixedPointCodec, flatten_arrays
from fedlora.privacy.secagg.encoding import HEADROOM_BITS


def _ring_sum(words: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(words[0])
    for w in words:
        total += w
    return total


@pytest.mark.parametrize("clients", [1, 2, 3, 7, 20, 1000])
def test_levels_keep_the_sum_of_n_clients_inside_int32_with_headroom(clients: int) -> None:
    codec = FixedPointCodec(clip_range=1.0, max_weight=1.0, num_clients=clients)
    room = 2**HEADROOM_BITS
    assert clients * codec.levels * room <= 2**31 - 1 < clients * (codec.levels + 1) * room
    assert codec.step == pytest.approx(1.0 / codec.levels)


@pytest.mark.parametrize("clients", [1, 3, 20])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_inputs_of_all_clients_do_not_wrap(clients: int, sign: float) -> None:
    # Prepare: every client at the clip bound with the largest weight
    codec = FixedPointCodec(clip_range=4.0, max_weight=50.0, num_clients=clients)
    vector = np.full(5, sign * 4.0)

    # Execute
    decoded = codec.decode(_ring_sum([codec.encode(vector, 50.0) for _ in range(clients)]))

    # Assert
    np.testing.assert_allclose(
        decoded.weighted_sum, sign * clients * 50.0 * 4.0, atol=codec.error_bound(clients)
    )
    assert decoded.total_weight == pytest.approx(clients * 50.0, abs=1e-6)


def test_values_beyond_the_clip_range_are_clipped() -> None:
    codec = FixedPointCodec(clip_range=2.0, max_weight=1.0, num_clients=2)
    vector = np.array([-6.01, -2.0, -1.99, 0.0, 1.99, 2.0, 2.01, 1e30])
    decoded = codec.decode(codec.encode(vector, 1.0))
    expected = [-2.0, -2.0, -1.99, 0.0, 1.99, 2.0, 2.0, 2.0]
    np.testing.assert_allclose(decoded.weighted_sum, expected, atol=codec.error_bound(1) + 1e-7)


def test_negative_values_wrap_as_twos_complement() -> None:
    codec = FixedPointCodec(clip_range=1.0, max_weight=1.0, num_clients=1)
    words = codec.encode(np.array([-1.0, -codec.step, codec.step]), 1.0)
    assert words[0] == 2**32 - codec.levels
    assert words[1] == 2**32 - 1 and words[2] == 1


@pytest.mark.parametrize("clients", [2, 5, 20])
def test_weighted_sum_is_within_the_documented_bound(clients: int) -> None:
    # Prepare
    rng = np.random.default_rng(clients)
    codec = FixedPointCodec(clip_range=3.0, max_weight=500.0, num_clients=clients)
    vectors = [rng.normal(0.0, 1.0, 2000) for _ in range(clients)]
    weights = [float(w) for w in rng.integers(1, 501, clients)]

    # Execute
    decoded = codec.decode(
        _ring_sum([codec.encode(v, w) for v, w in zip(vectors, weights, strict=True)])
    )

    # Assert
    expected = sum(w * np.clip(v, -3, 3) for v, w in zip(vectors, weights, strict=True))
    error = np.abs(decoded.weighted_sum - expected)
    assert error.max() <= codec.error_bound(clients) + 2**-24 * np.abs(expected).max()
    assert error.max() > 0  # quantisation really happened
    assert abs(decoded.total_weight - sum(weights)) <= codec.weight_error_bound(clients)
    # mean = S/W with |S − S*| ≤ e_S and |W − W*| ≤ e_W (the two bounds above), so
    # |S/W − S*/W*| ≤ (e_S + |S*/W*|·e_W) / (W* − e_W), and the float32 mean is rounded
    # once more (u·|S*/W*|, with 1 % for second-order terms): derived, not tuned
    total = sum(weights)
    e_s = codec.error_bound(clients) + 2**-24 * np.abs(expected).max()
    e_w = codec.weight_error_bound(clients)
    bound = ((e_s + np.abs(expected / total) * e_w) / (total - e_w)
             + 2**-24 * 1.01 * np.abs(expected / total))
    assert np.all(np.abs(decoded.mean() - expected / total) <= bound)


def test_fewer_contributors_than_planned_decode_fine() -> None:
    codec = FixedPointCodec(clip_range=1.0, max_weight=1.0, num_clients=10)
    decoded = codec.decode(_ring_sum([codec.encode(np.array([0.5, -0.25]), 1.0)] * 3))
    np.testing.assert_allclose(decoded.weighted_sum, [1.5, -0.75], atol=codec.error_bound(3))


def test_encoding_is_deterministic_and_length_plus_one() -> None:
    codec = FixedPointCodec(clip_range=1.0, max_weight=10.0, num_clients=4)
    vector = np.linspace(-1, 1, 200_000).astype(np.float32)  # crosses the 65,536 chunk size
    first = codec.encode(vector, 3.0)
    assert first.dtype == np.uint32 and first.shape == (200_001,)
    np.testing.assert_array_equal(first, codec.encode(vector, 3.0))
    reference = np.rint(vector.astype(np.float64) * 0.3 * codec.levels).astype(np.int64)
    np.testing.assert_array_equal(first[:-1].view(np.int32), reference)


def test_zero_weight_contributes_nothing() -> None:
    codec = FixedPointCodec(clip_range=1.0, max_weight=10.0, num_clients=2)
    assert not codec.encode(np.ones(4), 0.0).any()


@pytest.mark.parametrize(
    ("vector", "weight", "match"),
    [
        (np.array([1.0, np.nan]), 1.0, "NaN/Inf"),
        (np.array([np.inf]), 1.0, "NaN/Inf"),
        (np.ones((2, 2)), 1.0, "1-D float vector"),
        (np.ones(3, dtype=np.int64), 1.0, "1-D float vector"),
        (np.ones(3), 10.01, "max_weight"),
        (np.ones(3), -1.0, "max_weight"),
        (np.ones(3), float("nan"), "max_weight"),
    ],
)
def test_invalid_inputs_are_refused(vector: np.ndarray, weight: float, match: str) -> None:
    codec = FixedPointCodec(clip_range=1.0, max_weight=10.0, num_clients=2)
    with pytest.raises(ValueError, match=match):
        codec.encode(vector, weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_range": 0.0, "max_weight": 1.0, "num_clients": 2}, "clip_range"),
        ({"clip_range": 1.0, "max_weight": np.inf, "num_clients": 2}, "max_weight"),
        ({"clip_range": 1.0, "max_weight": 1.0, "num_clients": 0}, "num_clients"),
    ],
)
def test_invalid_codec(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FixedPointCodec(**kwargs)


def test_decode_refuses_non_ring_arrays() -> None:
    codec = FixedPointCodec(clip_range=1.0, max_weight=1.0, num_clients=2)
    with pytest.raises(ValueError, match="uint32"):
        codec.decode(np.zeros(4, dtype=np.int64))


def test_mean_needs_a_positive_weight() -> None:
    with pytest.raises(ValueError, match="summed weight is 0"):
        DecodedSum(np.zeros(3, np.float32), 0.0).mean()


def test_flatten_round_trip() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "m.lora_B": rng.normal(size=(6, 2)).astype(np.float32),
        "m.lora_A": rng.normal(size=(2, 5)).astype(np.float16),
    }

    # Execute
    vector, layout = flatten_arrays(arrays)
    restored = layout.unflatten(vector)

    # Assert
    assert layout.names == ("m.lora_A", "m.lora_B") and layout.size == vector.size == 22
    for name, array in arrays.items():
        assert restored[name].dtype == array.dtype
        np.testing.assert_array_equal(restored[name], array)
    with pytest.raises(ValueError, match=r"shape \(22,\)"):
        layout.unflatten(vector[:-1])
    with pytest.raises(ValueError, match="floating point"):
        flatten_arrays({"x": np.ones(2, dtype=np.int32)})
    assert flatten_arrays({})[1] == ArrayLayout((), (), ())
