"""Tests of fedlora.federation.fastagg (and the zero-copy reads of fedlora.federation.transport it
stands on)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from tolerances import assert_within, weighted_sum_bound

from fedlora.aggregation import weighted_mean
from fedlora.errors import PayloadError
from fedlora.federation import fastagg
from fedlora.federation.fastagg import encode, weighted_mean_records
from fedlora.federation.transport import float32_layout, pack, read_array, unpack

SHAPES = {"m.lora_A.weight": (2, 3), "m.lora_B.weight": (4, 2), "head.bias": (5,)}


def _arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _reference(arrays: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """``Σ w_k x_k / Σ w`` in float64, the plain numpy way."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return {k: sum(wk * a[k].astype(np.float64) for wk, a in zip(w, arrays, strict=True))
            for k in arrays[0]}


def _decoded(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _assert_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                  arrays: list[dict[str, np.ndarray]], weights: list[float],
                  paths: int = 1) -> None:
    """Within the derived bound of a float32 weighted sum of ``arrays`` (any order):
    ``γ_K + 3u`` relative to ``Σ p_k |x_k|`` (``p_k`` rounded, a float64 input rounded to
    float32, the float64 reference rounded); ``paths = 2`` when both sides accumulate in
    float32 (each may err by the bound)."""
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == np.float32 and actual[key].shape == value.shape
        bound = paths * weighted_sum_bound([a[key] for a in arrays], weights, roundings=3)
        assert_within(actual[key], value, bound, key)


# ----------------------------------------------------------------------------- values


def test_hand_computed_mean_is_exact():
    # Prepare: dyadic weights (1/4, 3/4) and small integers are exact in float32
    a = {"x": np.array([[0.0, 4.0], [8.0, -4.0]], np.float32), "y": np.array([1.0], np.float32)}
    b = {"x": np.array([[4.0, 0.0], [-8.0, 4.0]], np.float32), "y": np.array([5.0], np.float32)}

    # Execute
    out = _decoded(weighted_mean_records([pack(a), pack(b)], [10, 30]))

    # Assert
    np.testing.assert_array_equal(out["x"], [[3.0, 1.0], [-4.0, 2.0]])
    np.testing.assert_array_equal(out["y"], [4.0])


@pytest.mark.parametrize("weights", [[1, 2, 3], [0.2, 0.3, 0.5], [1e6, 1, 1], [0, 0, 7]])
def test_matches_numpy_reference(rng, weights):
    arrays = [_arrays(rng) for _ in weights]

    out = weighted_mean_records([pack(a) for a in arrays], weights)

    _assert_close(_decoded(out), {k: _reference(arrays, weights)[k] for k in sorted(SHAPES)},
                  arrays, weights)


def test_matches_weighted_mean_and_flower(rng):
    arrays = [_arrays(rng) for _ in range(4)]
    counts = [50, 120, 7, 300]
    contents = [RecordDict({"arrays": pack(a), "metrics": MetricRecord({"num-examples": n})})
                for a, n in zip(arrays, counts, strict=True)]

    ours = _decoded(weighted_mean_records([c["arrays"] for c in contents], counts))
    flower = _decoded(aggregate_arrayrecords(contents, "num-examples"))

    _assert_close(ours, {k: weighted_mean([a[k] for a in arrays], counts) for k in ours},
                  arrays, counts)
    _assert_close(ours, flower, arrays, counts, paths=2)


def test_single_record_is_returned_unchanged(rng):
    record = pack(_arrays(rng))

    out = weighted_mean_records([record], [3])

    assert {k: v.data for k, v in out.items()} == {k: v.data for k, v in record.items()}


def test_weight_scale_does_not_change_bytes(rng):
    records = [pack(_arrays(rng)) for _ in range(3)]

    small = weighted_mean_records(records, [1, 2, 5])
    large = weighted_mean_records(records, [1000, 2000, 5000])

    assert {k: v.data for k, v in small.items()} == {k: v.data for k, v in large.items()}


def test_blocks_longer_than_the_stack_buffer(rng, monkeypatch):
    # Prepare: 2 records -> blocks of max(MIN_BLOCK, 8192 // 8) = 1024; 2500 = 2 full + 1 part
    monkeypatch.setattr(fastagg, "STACK_BYTES", 8192)
    arrays = [{"long": rng.normal(size=(50, 50)).astype(np.float32)} for _ in range(2)]

    out = weighted_mean_records([pack(a) for a in arrays], [1, 3])

    _assert_close(_decoded(out), _reference(arrays, [1, 3]), arrays, [1, 3])


def test_key_order_of_later_records_does_not_matter(rng):
    arrays = [_arrays(rng) for _ in range(2)]
    reversed_record = ArrayRecord({k: Array(arrays[1][k]) for k in reversed(list(SHAPES))})

    out = weighted_mean_records([pack(arrays[0]), reversed_record], [1, 1])

    assert list(out) == sorted(SHAPES)
    _assert_close(_decoded(out), {k: _reference(arrays, [1, 1])[k] for k in sorted(SHAPES)},
                  arrays, [1, 1])


def test_other_float_layouts_are_decoded(rng):
    # Prepare: float16, float64 and Fortran-ordered float32 take Array.numpy(), not the view
    base = [_arrays(rng) for _ in range(4)]
    records = [
        pack(base[0]),
        ArrayRecord({k: Array(v.astype(np.float16)) for k, v in base[1].items()}),
        ArrayRecord({k: Array(v.astype(np.float64)) for k, v in base[2].items()}),
        ArrayRecord({k: Array(np.asfortranarray(v)) for k, v in base[3].items()}),
    ]
    expected_inputs = [base[0], {k: v.astype(np.float16).astype(np.float32)
                                 for k, v in base[1].items()}, base[2], base[3]]

    out = weighted_mean_records(records, [1, 2, 3, 4])

    _assert_close(_decoded(out), {k: _reference(expected_inputs, [1, 2, 3, 4])[k]
                                  for k in sorted(SHAPES)}, expected_inputs, [1, 2, 3, 4])


def test_first_record_in_another_dtype(rng):
    arrays = [_arrays(rng) for _ in range(2)]
    records = [ArrayRecord({k: Array(v.astype(np.float64)) for k, v in arrays[0].items()}),
               pack(arrays[1])]

    out = weighted_mean_records(records, [1, 1])

    _assert_close(_decoded(out), _reference(arrays, [1, 1]), arrays, [1, 1])


def test_zero_dim_and_empty_arrays_keep_their_shapes():
    records = [ArrayRecord({"s": Array(np.array(v, np.float32)),
                            "e": Array(np.zeros((0, 3), np.float32))}) for v in (1.0, 3.0)]

    out = weighted_mean_records(records, [1, 1])

    assert out["s"].shape == () and out["s"].numpy() == np.float32(2.0)
    assert out["e"].numpy().shape == (0, 3)


def test_inputs_are_not_modified(rng):
    records = [pack(_arrays(rng)) for _ in range(2)]
    before = [{k: v.data for k, v in r.items()} for r in records]

    weighted_mean_records(records, [1, 2])

    assert [{k: v.data for k, v in r.items()} for r in records] == before


@pytest.mark.parametrize("shape", [(0, 3), (), (7,), (2, 3, 4)])
def test_encode_matches_flower_serialisation(rng, shape):
    values = rng.normal(size=shape).astype(np.float32)

    array = encode(values)

    reference = Array(values)
    assert (array.dtype, array.shape, array.stype, array.data) == (
        reference.dtype, reference.shape, reference.stype, reference.data)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64])
def test_non_float_dtype_is_refused(rng, dtype):
    good = pack(_arrays(rng))
    bad = ArrayRecord({k: Array(np.ones(s, dtype=dtype)) if k == "head.bias" else Array(
        np.ones(s, np.float32)) for k, s in SHAPES.items()})

    with pytest.raises(PayloadError, match=r"\[BAD_DTYPE\] head.bias has dtype") as info:
        weighted_mean_records([good, bad], [1, 1])
    assert info.value.reason == "BAD_DTYPE"


def test_shape_mismatch_is_refused_with_both_shapes(rng):
    arrays = [_arrays(rng) for _ in range(3)]
    arrays[2]["m.lora_A.weight"] = np.zeros((4, 3), np.float32)  # rank 4 instead of 2

    with pytest.raises(PayloadError, match="SHAPE_MISMATCH") as info:
        weighted_mean_records([pack(a) for a in arrays], [1, 1, 1])

    message = str(info.value)
    assert "m.lora_A.weight" in message and "record 2" in message
    assert "(4, 3)" in message and "(2, 3)" in message


def test_shape_mismatch_with_same_size_is_refused(rng):
    arrays = [_arrays(rng) for _ in range(2)]
    arrays[1]["m.lora_A.weight"] = np.zeros((3, 2), np.float32)  # same 6 values, transposed

    with pytest.raises(PayloadError, match="SHAPE_MISMATCH"):
        weighted_mean_records([pack(a) for a in arrays], [1, 1])


def test_key_mismatch_is_refused(rng):
    arrays = [_arrays(rng) for _ in range(2)]
    del arrays[1]["head.bias"]
    arrays[1]["other"] = np.zeros(2, np.float32)

    with pytest.raises(PayloadError, match=r"KEY_MISMATCH.*record 1.*'head.bias'.*'other'"):
        weighted_mean_records([pack(a) for a in arrays], [1, 1])


@pytest.mark.parametrize("weights", [[1], [1, 2, 3], [-1, 2], [0, 0], [float("nan"), 1],
                                     [float("inf"), 1], [1e308, 1e308]])
def test_invalid_weights_are_refused(rng, weights):
    records = [pack(_arrays(rng)) for _ in range(2)]

    with pytest.raises(ValueError, match="weight"):
        weighted_mean_records(records, weights)


def test_no_records_is_refused():
    with pytest.raises(ValueError, match="at least one record"):
        weighted_mean_records([], [])


# ----------------------------------------------------------------------------- zero-copy reads


def test_read_array_views_packed_float32_bytes(rng):
    array = pack({"x": rng.normal(size=(3, 4))})["x"]

    value = read_array("x", array)

    assert value.dtype == np.float32 and value.shape == (3, 4)
    assert not value.flags.writeable
    assert np.shares_memory(value, np.frombuffer(array.data, np.uint8))
    np.testing.assert_array_equal(value, array.numpy())


@pytest.mark.parametrize("values", [np.arange(6, dtype=">f4"),  # big-endian
                                    np.asfortranarray(np.ones((2, 3), np.float32)),
                                    np.ones(3, np.float16)])
def test_float32_layout_is_none_for_other_layouts(values):
    assert float32_layout(Array(values)) is None


def test_float32_layout_is_none_for_truncated_bytes():
    array = Array(np.ones((2, 3), np.float32))
    truncated = Array(dtype=array.dtype, shape=array.shape, stype=array.stype,
                      data=array.data[:-4])

    assert float32_layout(truncated) is None
    with pytest.raises(ValueError):  # np.load's own error, as before the fast path
        read_array("x", truncated)


def test_unpack_returns_writable_owned_arrays(rng):
    record = pack({"x": rng.normal(size=(3, 4)), "y": rng.normal(size=2).astype(np.float16)})

    arrays = unpack(record)

    for key, value in arrays.items():
        assert value.dtype == np.float32 and value.flags.writeable and value.flags.owndata, key
        np.testing.assert_array_equal(value, record[key].numpy())


def test_unpack_keeps_refusing_big_endian_floats():
    record = ArrayRecord({"x": Array(np.arange(3, dtype=">f4"))})

    with pytest.raises(PayloadError, match="BAD_DTYPE"):
        unpack(record)
