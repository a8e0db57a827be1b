"""Weighted mean of Flower ``ArrayRecord``s without decoding them: the server's FedAvg hot path.

For replies ``R_1 … R_K`` holding the same keys and shapes and weights ``w_k`` (e.g. example
counts), :func:`weighted_mean_records` returns the record of

    X̄[key] = Σ_k p_k X_k[key],   p_k = w_k / Σ w        # float32, every key

which is what FedAvg does to whole models and what ``fedit`` does to the LoRA factors when
every client shares one scale (equal ``r`` and ``lora_alpha``); ``aggregate_heads`` does it to
declared heads. It gives the same values as :func:`fedlora.aggregation.weighted_mean` per key
up to float32 rounding (see *Precision*).

How it is fast (the inputs are read once, the output written once):

* each ``Array`` is a float32 view of its own ``.npy`` bytes
(:func:`fedlora.federation.transport.read_array`),
  no ``np.load``;
* per key, blocks of the K views are copied into one reused ``(K, block)`` buffer that stays in
  the core's L2 cache, and one BLAS matrix-vector product ``p @ block`` forms the mean;
* the result is encoded into the ``.npy`` bytes ``Array`` carries with a single copy.

Precision: the products accumulate in float32 (BLAS ``sgemv``, like Flower's own
``aggregate_arrayrecords``) with float32 ``p_k``; each value is within a few float32 ulps of
the float64-accumulated :func:`~fedlora.aggregation.weighted_mean`. Values are not checked for
NaN/Inf here: validate each reply first (:func:`~fedlora.aggregation.validate_update`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord

from fedlora.errors import PayloadError
from fedlora.federation.transport import NPY_STYPE, float32_layout, read_array

STACK_BYTES = 1 << 19  # the (K, block) float32 buffer: half a per-core L2 cache
MIN_BLOCK = 1024  # elements; keeps BLAS calls long when K is large


def weighted_mean_records(records: Sequence[ArrayRecord],
                          weights: Sequence[float] | np.ndarray) -> ArrayRecord:
    """``Σ_k p_k R_k`` key by key, as a new float32 ``ArrayRecord`` (see module docstring).

    Parameters
    ----------
    records
        ``K >= 1`` records with the same keys; a key has the same shape in every record.
        float16/float64 arrays are accepted and cast to float32.
    weights
        ``w_k``: non-negative finite weights (e.g. ``num_examples``), not all zero;
        normalised to ``p_k = w_k / Σ w``.

    Returns
    -------
    ArrayRecord
        float32 arrays in the key order of ``records[0]``; the inputs are not modified.

    Raises
    ------
    ValueError
        No records, or invalid weights.
    PayloadError
        ``KEY_MISMATCH`` (a record's keys differ from record 0's), ``SHAPE_MISMATCH``
        (a key's shape differs from record 0's) or ``BAD_DTYPE`` (not a float array).
    """
    p = _probabilities(weights, len(records))  # (K,) float64
    p32 = p.astype(np.float32)
    block = max(MIN_BLOCK, STACK_BYTES // (4 * len(records)))
    stacked = np.empty(len(records) * block, dtype=np.float32)  # K blocks, reused (in L2)
    mean = np.empty(0, dtype=np.float32)  # reused; encode() copies it out
    out = ArrayRecord()  # filled in place: ArrayRecord(dict) would rebuild every Array
    for key, arrays in _by_key(records):
        shape, rows = _flat_rows(key, arrays)  # rows: K × (n,) float32, views where possible
        size = math.prod(shape)
        if mean.size < size:
            mean = np.empty(size, dtype=np.float32)
        for start in range(0, size, block):
            stop = min(start + block, size)
            chunk = stacked[: len(rows) * (stop - start)]
            np.concatenate([row[start:stop] for row in rows], out=chunk)
            np.matmul(p32, chunk.reshape(len(rows), stop - start), out=mean[start:stop])
        out[key] = encode(mean[:size].reshape(shape))
    return out


def encode(values: np.ndarray) -> Array:
    """A float32 ``Array`` whose ``data`` equals what ``Array(values)`` would hold, in one copy."""
    values = np.asarray(values, dtype=np.float32, order="C")  # keeps 0-d arrays 0-d
    shape = tuple(int(d) for d in values.shape)
    data = b"".join((_float32_header(shape), values.reshape(-1).view(np.uint8)))
    return Array(dtype="float32", shape=shape, stype=NPY_STYPE, data=data)


@lru_cache(maxsize=1024)
def _float32_header(shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered float32 array of ``shape``."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
              "fortran_order": False, "shape": shape}
    stream = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(stream, header)
    except ValueError:  # header longer than version 1.0 allows (huge ndim)
        stream = io.BytesIO()
        np.lib.format.write_array_header_2_0(stream, header)
    return stream.getvalue()


def _probabilities(weights: Sequence[float] | np.ndarray, count: int) -> np.ndarray:
    if count == 0:
        raise ValueError("weighted_mean_records needs at least one record, got none")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (count,):
        raise ValueError(
            f"expected one weight per record ({count}), got weights of shape {w.shape}"
        )
    with np.errstate(over="ignore"):
        total = float(w.sum())
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not math.isfinite(total) or total <= 0:
        raise ValueError(
            f"weights must be finite, non-negative, not all zero and of finite sum, got "
            f"{w.tolist()}"
        )
    return w / total


def _by_key(records: Sequence[ArrayRecord]) -> Iterator[tuple[str, tuple[Array, ...]]]:
    """(key, one ``Array`` per record) in record 0's key order; refuses differing key sets."""
    keys = list(records[0].keys())
    expected = set(keys)
    for i, record in enumerate(records[1:], start=1):
        got = set(record.keys())
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise PayloadError(
                "KEY_MISMATCH",
                f"record {i} has different keys from record 0: missing {missing[:3]}, "
                f"unexpected {extra[:3]} ({len(missing)} missing, {len(extra)} unexpected); "
                "average only replies of one adapter layout",
            )
    if all(list(record.keys()) == keys for record in records[1:]):
        return zip(keys, zip(*(record.values() for record in records), strict=True),
                   strict=True)
    return ((key, tuple(record[key] for record in records)) for key in keys)


def _flat_rows(key: str, arrays: Sequence[Array]) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """Common shape and one flat float32 row per record (zero-copy when the bytes allow it)."""
    layout = float32_layout(arrays[0])
    if layout is not None:
        # the usual round: every reply carries the same .npy header for a key, so a byte
        # comparison replaces parsing; any other array takes the general path below
        offset, shape, count = layout
        first = arrays[0].data
        header, length = first[:offset], len(first)
        rows = []
        for array in arrays:
            data = array.data
            if array.stype == NPY_STYPE and len(data) == length and data.startswith(header):
                rows.append(np.frombuffer(data, dtype=np.float32, count=count, offset=offset))
            else:
                rows.append(_checked_row(key, array, shape, len(rows)))
        return shape, rows
    first = read_array(key, arrays[0])
    rows = [first.reshape(-1)]
    rows += [_checked_row(key, array, first.shape, i) for i, array in enumerate(arrays[1:], 1)]
    return first.shape, rows


def _checked_row(key: str, array: Array, shape: tuple[int, ...], index: int) -> np.ndarray:
    value = read_array(key, array)
    if value.shape != shape:
        raise PayloadError(
            "SHAPE_MISMATCH",
            f"{key}: record {index} has shape {value.shape}, record 0 has {shape}; every "
            "client must send the same adapter shapes (same rank and target modules) to be "
            "averaged",
        )
    return value.reshape(-1)
