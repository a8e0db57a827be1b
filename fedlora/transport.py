"""The Flower boundary of payloads: arrays ⇄ ``ArrayRecord``, byte accounting.

What crosses the wire is numpy arrays keyed by peft state-dict names, wrapped as ``Array``
(``ArrayRecord`` rejects bare numpy dicts), in the run's ``wire-dtype``:

``float32``   ``.npy`` bytes (what ``Array(ndarray)`` holds), 4 bytes per value
``float16``   ``.npy`` bytes of float16, 2 bytes per value (|x| ≤ 65504)
``bfloat16``  numpy has no bfloat16 and ``ArrayRecord`` refuses torch's: the raw little-endian
              16-bit patterns (the upper half of the float32, rounded to nearest even) with
              ``dtype = "bfloat16"``, ``stype =`` :data:`BF16_STYPE` and the shape in ``Array``'s
              own fields — 2 bytes per value, float32's range, 8 bits of mantissa

Every reader (:func:`unpack`) returns float32, whatever the sender chose; the server aggregates
in float32 (float64 accumulators).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord

from fedlora.aggregation import LoraFactors
from fedlora.config import WIRE_DTYPES
from fedlora.errors import ConfigError, PayloadError

ALLOWED_DTYPES = (np.float32, np.float16, np.float64)
NPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: ``Array.data`` holds ``np.save`` bytes
BF16_STYPE = "fedlora.bfloat16"  # ``Array.data``: raw little-endian bfloat16 bit patterns
_NPY_MAGIC = b"\x93NUMPY"
_FLOAT32 = np.dtype(np.float32)
_BF16_WIRE = np.dtype("<u2")


def pack(arrays: Mapping[str, np.ndarray], dtype: str = "float32") -> ArrayRecord:
    """Wrap named arrays into an ``ArrayRecord`` in ``dtype`` (:data:`WIRE_DTYPES`), sorted by
    name. Values are first cast to float32; see :func:`encode_array` for the others."""
    return ArrayRecord({k: encode_array(k, arrays[k], dtype) for k in sorted(arrays)})


def encode_array(key: str, value: np.ndarray, dtype: str = "float32") -> Array:
    """One array on the wire in ``dtype`` (see the module docstring).

    Raises
    ------
    ConfigError
        ``dtype`` is unknown, or a finite value does not fit it (it would arrive as ±inf).
    """
    x = np.ascontiguousarray(value, dtype=np.float32)
    if dtype == "float32":
        return Array(x)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            wire = x.astype(np.float16)
        _check_range(key, x, wire, dtype)
        return Array(wire)
    if dtype == "bfloat16":
        bits = bfloat16_bits(x)
        _check_range(key, x, bfloat16_values(bits), dtype)
        return Array(dtype="bfloat16", shape=tuple(int(d) for d in x.shape), stype=BF16_STYPE,
                     data=bits.astype(_BF16_WIRE, copy=False).tobytes())
    raise ConfigError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)}; got {dtype!r}")


def _check_range(key: str, exact: np.ndarray, wire: np.ndarray, dtype: str) -> None:
    overflow = np.isfinite(exact) & ~np.isfinite(wire)
    if overflow.any():
        worst = float(np.max(np.abs(exact[overflow])))
        raise ConfigError(f"{key} holds {worst:.4g}, beyond the range of {dtype}; use "
                          f"wire-dtype = 'bfloat16' (float32's range) or 'float32'")


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16): torch's conversion (round to nearest, ties to
    even; overflow to ±inf; NaN stays NaN)."""
    import torch  # numpy has no bfloat16

    value = torch.from_numpy(np.array(x, dtype=np.float32)).to(torch.bfloat16)
    return value.view(torch.int16).numpy().view(np.uint16)


def bfloat16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) → float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def unpack(record: ArrayRecord, *, copy: bool = True) -> dict[str, np.ndarray]:
    """``ArrayRecord`` → named float32 arrays; refuses non-float payloads.

    With ``copy`` (the default) every array is writable and owns its memory; without, float32
    arrays are read-only views into the record's bytes (:func:`read_array`), for readers that
    never write into them.
    """
    out: dict[str, np.ndarray] = {}
    for key, array in record.items():
        value = read_array(key, array)
        out[key] = value if value.flags.writeable or not copy else value.copy()
    return out


def read_array(key: str, array: Array) -> np.ndarray:
    """One ``Array`` as float32, without copying when its bytes allow it.

    ``Array.data`` is numpy's ``.npy`` serialisation (what ``np.save`` writes). When it holds a
    C-ordered native float32 array — every array :func:`pack` makes — the result is a read-only
    view into ``Array.data`` (the header is parsed once per distinct header). Anything else is
    decoded by ``Array.numpy()`` as before and cast to float32 (a new array).

    Raises
    ------
    PayloadError
        ``BAD_DTYPE`` when the array is not float16, float32, float64 or :data:`BF16_STYPE`
        bfloat16; ``MALFORMED`` when a bfloat16 array's bytes do not match its shape.
    """
    data = array.data
    if array.stype == BF16_STYPE:
        return _read_bfloat16(key, array)
    layout = float32_layout(array)
    if layout is not None:
        offset, shape, count = layout
        return np.frombuffer(data, dtype=_FLOAT32, count=count, offset=offset).reshape(shape)
    value = array.numpy()
    if value.dtype not in ALLOWED_DTYPES:
        raise PayloadError("BAD_DTYPE", f"{key} has dtype {value.dtype}; expected float32")
    return value.astype(np.float32, copy=False)


def _read_bfloat16(key: str, array: Array) -> np.ndarray:
    shape = tuple(array.shape)
    if array.dtype != "bfloat16":
        raise PayloadError("BAD_DTYPE", f"{key} is serialised as bfloat16 but declares dtype "
                           f"{array.dtype!r}")
    if not all(isinstance(d, int) and d >= 0 for d in shape) or \
            len(array.data) != 2 * math.prod(shape):
        raise PayloadError("MALFORMED", f"{key}: {len(array.data)} bytes of bfloat16 cannot "
                           f"hold shape {shape}")
    return bfloat16_values(np.frombuffer(array.data, dtype=_BF16_WIRE)).reshape(shape)


def float32_layout(array: Array) -> tuple[int, tuple[int, ...], int] | None:
    """Where an ``Array``'s float32 values sit in ``Array.data``: (offset, shape, count).

    ``None`` unless ``data`` is a well-formed ``.npy`` of a C-ordered native float32 array
    (then ``np.frombuffer(data, np.float32, count, offset)`` holds its values).
    """
    if array.stype != NPY_STYPE:
        return None
    data = array.data
    if data[:6] != _NPY_MAGIC or len(data) < 12:
        return None
    major = data[6]
    if major == 1:
        end = 10 + int.from_bytes(data[8:10], "little")
    elif major == 2:
        end = 12 + int.from_bytes(data[8:12], "little")
    else:
        return None
    header = _float32_header_layout(data[:end])
    if header is None or len(data) != end + 4 * header[1]:
        return None
    return end, header[0], header[1]


@lru_cache(maxsize=1024)
def _float32_header_layout(header: bytes) -> tuple[tuple[int, ...], int] | None:
    """(shape, element count) if a ``.npy`` header declares C-ordered native float32, else None.

    Cached: the replies of one round repeat the same few headers.
    """
    stream = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            return None
    except ValueError:
        return None  # malformed: Array.numpy() reports it
    if dtype != _FLOAT32 or (fortran_order and len(shape) > 1):
        return None
    return shape, math.prod(shape)


def pack_correction(correction: Mapping[str, LoraFactors]) -> ArrayRecord:
    """Base-correction factors (scale 1) as ``<module>.correction_B`` / ``.correction_A``."""
    arrays: dict[str, np.ndarray] = {}
    for module, f in correction.items():
        arrays[module + ".correction_B"] = f.scale * f.b
        arrays[module + ".correction_A"] = f.a
    return pack(arrays)


def unpack_correction(record: ArrayRecord) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    arrays = unpack(record)
    modules = sorted(k[: -len(".correction_A")] for k in arrays if k.endswith(".correction_A"))
    return {m: (arrays[m + ".correction_B"], arrays[m + ".correction_A"]) for m in modules}


def nbytes(record: ArrayRecord) -> int:
    """Payload bytes of a record (what the wire carries for it, before chunk framing)."""
    return int(record.count_bytes())
