"""fedlora.federation.transport's wire dtypes (``wire-dtype``): exact round trips, bytes, and
rounds whose
factors travel in float16/bfloat16 both ways while the server aggregates in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from tolerances import assert_within, weighted_sum_bound

from fedlora import config
from fedlora.aggregation import weighted_mean
from fedlora.errors import ConfigError, PayloadError
from fedlora.federation.fastagg import weighted_mean_records
from fedlora.federation.transport import (
    BF16_STYPE,
    bfloat16_bits,
    bfloat16_values,
    nbytes,
    pack,
    read_array,
    unpack,
)
from tests.fl_harness import run_rounds, tiny_config

HALF = ("float16", "bfloat16")
# relative spacing of each dtype's values: a value rounds to within half of it
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
HIDDEN = 384  # MiniLM


def representable(dtype: str, x: np.ndarray) -> np.ndarray:
    """float32 values that ``dtype`` holds exactly (via torch, independent of our code)."""
    half = torch.float16 if dtype == "float16" else torch.bfloat16
    return torch.from_numpy(x).to(half).to(torch.float32).numpy()


def over_flower(record: ArrayRecord) -> ArrayRecord:
    """``record`` after Flower's object serialisation (what the SuperLink moves)."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    return inflate_object_from_contents(record.object_id, contents, keep_object_contents=False)


SPECIAL = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 6.0e-8, -6.1e-5, np.inf, -np.inf],
                   np.float32)


@pytest.mark.parametrize("dtype", HALF)
def test_values_the_dtype_holds_round_trip_exactly(rng, dtype):
    values = {"m.lora_A.weight": representable(dtype, rng.normal(size=(4, 7)).astype(np.float32)),
              "m.lora_B.weight": representable(dtype, rng.normal(size=(7, 4)).astype(np.float32)
                                               * 1e-3),
              "special": representable(dtype, SPECIAL)}

    back = unpack(over_flower(pack(values, dtype)))

    assert back.keys() == values.keys()
    for key, value in values.items():
        assert back[key].dtype == np.float32 and back[key].shape == value.shape
        assert np.array_equal(back[key], value), key
        assert np.array_equal(np.signbit(back[key]), np.signbit(value)), key  # -0.0 stays


@pytest.mark.parametrize("dtype", HALF)
def test_other_values_round_to_nearest_like_torch(rng, dtype):
    x = np.concatenate([rng.normal(size=1000).astype(np.float32),
                        # ties: halfway between two bfloat16 values (odd and even mantissas)
                        np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)], np.float32)])

    back = unpack(pack({"x": x}, dtype))["x"]

    assert np.array_equal(back, representable(dtype, x))
    assert np.all(np.abs(back - x) <= EPS[dtype] / 2 * np.abs(x))


def test_bfloat16_keeps_nan_and_overflows_to_inf_like_torch():
    x = np.array([np.nan, -np.nan, 3.4e38, np.finfo(np.float32).max], np.float32)
    bits = bfloat16_bits(x)
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    got = bfloat16_values(bits)
    assert np.isnan(got[:2]).all() and np.array_equal(got[2:], want[2:])


@pytest.mark.parametrize(("dtype", "value"), [("float16", 70_000.0), ("bfloat16", 3.4028e38)])
def test_a_value_beyond_the_dtype_is_refused_by_the_sender(dtype, value):
    with pytest.raises(ConfigError, match=f"beyond the range of {dtype}"):
        pack({"x": np.array([1.0, value], np.float32)}, dtype)


def test_an_unknown_wire_dtype_is_refused():
    with pytest.raises(ConfigError, match="float32, float16, bfloat16"):
        pack({"x": np.zeros(2, np.float32)}, "int8")


@pytest.mark.parametrize(("array", "reason"), [
    (Array("bfloat16", (2, 3), BF16_STYPE, b"\0" * 10), "MALFORMED"),  # 5 values for 6
    (Array("bfloat16", (-2, 3), BF16_STYPE, b""), "MALFORMED"),
    (Array("float32", (2,), BF16_STYPE, b"\0" * 4), "BAD_DTYPE"),
])
def test_a_bfloat16_array_that_does_not_match_its_shape_is_refused(array, reason):
    with pytest.raises(PayloadError) as info:
        read_array("x", array)
    assert info.value.reason == reason


def default_job_reply() -> dict[str, np.ndarray]:
    """The arrays of one reply of the default job: MiniLM (6 layers), LoRA r=8 on query and
    value, and the 5-way classifier head."""
    rng = np.random.default_rng(0)
    arrays = {}
    for layer in range(6):
        for module in ("query", "value"):
            prefix = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
            arrays[f"{prefix}.lora_A.weight"] = rng.normal(size=(8, HIDDEN)).astype(np.float32)
            arrays[f"{prefix}.lora_B.weight"] = rng.normal(size=(HIDDEN, 8)).astype(np.float32)
    arrays["base_model.model.classifier.weight"] = rng.normal(size=(5, HIDDEN)).astype(np.float32)
    arrays["base_model.model.classifier.bias"] = np.zeros(5, np.float32)
    return arrays


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_halves_the_bytes_of_the_default_jobs_reply(dtype):
    arrays = default_job_reply()

    full, half = nbytes(pack(arrays)), nbytes(pack(arrays, dtype))

    assert 0.49 < half / full < 0.51, (full, half)


@pytest.mark.parametrize("dtype", HALF)
def test_the_mean_of_half_precision_records_is_the_float32_mean_of_what_arrived(rng, dtype):
    updates = [{"a": rng.normal(size=(8, 32)).astype(np.float32),
                "b": rng.normal(size=(32, 8)).astype(np.float32) * 1e-2} for _ in range(3)]
    weights = [16, 40, 24]
    records = [over_flower(pack(u, dtype)) for u in updates]
    arrived = [unpack(r) for r in records]

    fast = unpack(weighted_mean_records(records, weights))

    for key in ("a", "b"):
        exact = weighted_mean([u[key] for u in updates], weights)
        of_arrived = weighted_mean([a[key] for a in arrived], weights)
        # float32 sgemv against a float64 mean of the same values: the derived bound
        assert_within(fast[key], of_arrived,
                      weighted_sum_bound([a[key] for a in arrived], weights), key)
        largest = max(float(np.abs(u[key]).max()) for u in updates)
        assert np.max(np.abs(fast[key] - exact)) <= EPS[dtype] / 2 * largest


# --------------------------------------------------------------------------- real rounds


@pytest.mark.parametrize("dtype", HALF)
def test_a_round_sends_half_precision_both_ways_and_aggregates_in_float32(dtype):
    replies = []
    flat = tiny_config(num_server_rounds=1, wire_dtype=dtype)
    records, grid, glob, _ = run_rounds(flat, on_reply=replies.append)
    plain, *_ = run_rounds(tiny_config(num_server_rounds=1))

    # Assert: both directions carry the dtype, at about half the bytes
    wire = "float16" if dtype == "float16" else "bfloat16"
    down = [m.content["arrays"] for m in grid.delivered if m.metadata.message_type == "train"]
    up = [r.content for r in replies if r.metadata.message_type == "train"]
    assert {a.dtype for record in down + [c["arrays"] for c in up]
            for a in record.values()} == {wire}
    for key in ("bytes_up", "bytes_down"):
        assert 0.49 < records[1][key] / plain[1][key] < 0.51, key
    # the global is the float32 example-weighted mean of the replies as they arrived
    weights = [int(c["metrics"]["num-examples"]) for c in up]
    arrived = [unpack(c["arrays"]) for c in up]
    got = glob.arrays_for(8)
    for key in arrived[0]:
        want = weighted_mean([a[key] for a in arrived], weights)
        assert got[key].dtype == np.float32
        # the server's float32 mean against a float64 one of the same replies (derived)
        assert_within(got[key], want, weighted_sum_bound([a[key] for a in arrived], weights),
                      key)


def _bad_bfloat16(edit):
    """Apply ``edit(value) -> Array`` to partition 2's first lora_A in its train reply."""
    def on_reply(reply):
        if reply.metadata.message_type == "train" and \
                reply.content["metrics"]["partition-id"] == 2:
            arrays = reply.content["arrays"]
            key = next(k for k in arrays if k.endswith("lora_A.weight"))
            arrays[key] = edit(read_array(key, arrays[key]).copy())
    return on_reply


def _nan(x):
    x[0, 0] = np.nan
    return pack({"x": x}, "bfloat16")["x"]


@pytest.mark.parametrize(("edit", "reason"), [
    (_nan, "NON_FINITE"),
    (lambda x: pack({"x": x.T.copy()}, "bfloat16")["x"], "SHAPE_MISMATCH"),
    (lambda x: Array("bfloat16", x.shape, BF16_STYPE, pack({"x": x}, "bfloat16")["x"].data[2:]),
     "MALFORMED"),
], ids=["nan", "transposed", "truncated"])
def test_bad_bfloat16_replies_are_rejected_with_their_reason(edit, reason):
    records, *_ = run_rounds(tiny_config(num_server_rounds=1, wire_dtype="bfloat16"),
                             on_reply=_bad_bfloat16(edit))
    assert records[1]["rejected"] == {reason: 1}
    assert records[1]["clients"] == [0, 1]


def test_half_precision_refuses_differential_privacy():
    with pytest.raises(ConfigError, match="needs wire-dtype = 'float32'"):
        config.from_flat(tiny_config(wire_dtype="float16", dp_mode="central", strategy="ffa"))
    with pytest.raises(ConfigError, match="wire-dtype must be one of"):
        config.from_flat(tiny_config(wire_dtype="int8"))

