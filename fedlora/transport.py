"""The Flower boundary of payloads: arrays ⇄ ``ArrayRecord``, byte accounting.

Everything that crosses the wire is float32 numpy arrays keyed by peft state-dict names
(``ArrayRecord`` rejects bfloat16 and bare numpy dicts, so values are wrapped as ``Array``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord

from fedlora.aggregation import LoraFactors
from fedlora.errors import PayloadError

ALLOWED_DTYPES = (np.float32, np.float16, np.float64)
NPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: ``Array.data`` holds ``np.save`` bytes
_NPY_MAGIC = b"\x93NUMPY"
_FLOAT32 = np.dtype(np.float32)


def pack(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap named arrays (cast to float32) into an ``ArrayRecord``, sorted by name."""
    return ArrayRecord({k: Array(np.ascontiguousarray(arrays[k], dtype=np.float32))
                        for k in sorted(arrays)})


def unpack(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``ArrayRecord`` → named float32 arrays (writable, owned); refuses non-float payloads."""
    out: dict[str, np.ndarray] = {}
    for key, array in record.items():
        value = read_array(key, array)
        out[key] = value if value.flags.writeable else value.copy()
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
        ``BAD_DTYPE`` when the array is not float16, float32 or float64.
    """
    data = array.data
    layout = float32_layout(array)
    if layout is not None:
        offset, shape, count = layout
        return np.frombuffer(data, dtype=_FLOAT32, count=count, offset=offset).reshape(shape)
    value = array.numpy()
    if value.dtype not in ALLOWED_DTYPES:
        raise PayloadError("BAD_DTYPE", f"{key} has dtype {value.dtype}; expected float32")
    return value.astype(np.float32, copy=False)


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
