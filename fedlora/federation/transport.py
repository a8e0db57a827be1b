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

import ast
import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord

from fedlora.aggregation import LoraFactors
from fedlora.config import WIRE_DTYPES
from fedlora.errors import ConfigError, PayloadError

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

    Raises
    ------
    PayloadError
        ``MALFORMED`` when ``record`` is not an ``ArrayRecord``; any reason of
        :func:`read_array`.
    """
    if not isinstance(record, ArrayRecord):
        raise PayloadError("MALFORMED", f"expected an ArrayRecord of arrays, got a "
                           f"{type(record).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, array in record.items():
        value = read_array(key, array)
        out[key] = value if value.flags.writeable or not copy else value.copy()
    return out


def read_array(key: str, array: Array) -> np.ndarray:
    """One ``Array`` as float32, without copying when its bytes allow it; an untrusted header
    is parsed and bound-checked before a single value is read.

    ``Array.data`` is numpy's ``.npy`` serialisation (what ``np.save`` writes). Its header is
    parsed here (:func:`npy_layout`: magic, version 1–3, at most :data:`MAX_NPY_HEADER` bytes,
    a literal dict), never by ``np.load``: the dtype must be a little-endian float of 2, 4 or
    8 bytes, the shape a tuple of at most 8 non-negative ints, the body
    exactly ``itemsize × count`` bytes. The values are then a view of ``Array.data``: nothing
    is ever allocated from a size a header declares. A C-ordered native float32 array — every array
    :func:`pack` makes — stays a read-only view; any other is cast to float32 (a new array of
    at most the reply's own size).

    Raises
    ------
    PayloadError
        ``MALFORMED`` when ``array`` is not an ``Array`` of bytes, its serialisation type is
        unknown, its header does not parse or its body does not match it; ``BAD_DTYPE`` when
        its dtype is not float16/32/64 (or :data:`BF16_STYPE` bfloat16).
    """
    if not isinstance(array, Array) or not isinstance(array.data, bytes):
        raise PayloadError("MALFORMED", f"{key} is a {type(array).__name__}, not an Array of "
                           f"bytes")
    if array.stype == BF16_STYPE:
        value = _read_bfloat16(key, array)
    elif array.stype == NPY_STYPE:
        offset, dims, dtype, fortran = npy_layout(key, array.data)
        value = np.frombuffer(array.data, dtype=dtype, count=math.prod(dims), offset=offset)
        value = value.reshape(dims, order="F" if fortran else "C")
        if dtype != _FLOAT32:
            value = value.astype(np.float32)
    else:
        raise PayloadError("MALFORMED", f"{key} has serialisation type {array.stype!r}; "
                           f"expected {NPY_STYPE!r} or {BF16_STYPE!r}")
    return value


def _read_bfloat16(key: str, array: Array) -> np.ndarray:
    shape = tuple(array.shape) if isinstance(array.shape, list | tuple) else None
    if array.dtype != "bfloat16":
        raise PayloadError("BAD_DTYPE", f"{key} is serialised as bfloat16 but declares dtype "
                           f"{array.dtype!r}")
    if shape is None or not all(type(d) is int and d >= 0 for d in shape) or \
            len(array.data) != 2 * math.prod(shape):
        raise PayloadError("MALFORMED", f"{key}: {len(array.data)} bytes of bfloat16 cannot "
                           f"hold shape {str(shape)[:80]}")
    return bfloat16_values(np.frombuffer(array.data, dtype=_BF16_WIRE)).reshape(shape)


MAX_NPY_HEADER = 4096  # bytes of a .npy header (np.save writes 128 for any adapter array)


def npy_layout(key: str, data: bytes, descrs: frozenset[str] | None = None
               ) -> tuple[int, tuple[int, ...], np.dtype, bool]:
    """(offset of the values, shape, dtype, Fortran order) of untrusted ``.npy`` bytes, after
    checking every field against the bytes that are actually there.

    Raises
    ------
    PayloadError
        ``MALFORMED`` (bad magic or version, a header that is too long, not a literal dict, a
        shape that is not a tuple of non-negative ints, a body of another length) or
        ``BAD_DTYPE`` (a dtype outside ``descrs``; by default a little-endian float of 2, 4
        or 8 bytes).
    """
    if len(data) < 10 or data[:6] != _NPY_MAGIC or data[6] not in (1, 2, 3):
        raise PayloadError("MALFORMED", f"{key} is not .npy data (magic or version)")
    width = 2 if data[6] == 1 else 4
    end = 8 + width + int.from_bytes(data[8:8 + width], "little")
    if end > min(len(data), MAX_NPY_HEADER):
        raise PayloadError("MALFORMED", f"{key}: the .npy header claims {end} bytes; the data "
                           f"holds {len(data)} and a header may have {MAX_NPY_HEADER}")
    try:
        dims, fortran, dtype = _npy_header(data[:end], descrs or _FLOAT_DESCRS)
    except PayloadError as exc:
        detail = str(exc).split("] ", 1)[1]
        raise PayloadError(exc.reason, f"{key} {detail}" if exc.reason == "BAD_DTYPE"
                           else f"{key}: {detail}") from None
    count = math.prod(dims)
    if len(data) != end + dtype.itemsize * count:
        raise PayloadError("MALFORMED", f"{key}: a .npy of {dtype} {dims} has "
                           f"{end + dtype.itemsize * count} bytes, this one {len(data)}")
    return end, dims, dtype, fortran


@lru_cache(maxsize=1024)
def _npy_header(header: bytes, descrs: frozenset[str]
                ) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of a complete ``.npy`` header, checked field by field.

    Cached: the replies of one round repeat the same few headers.
    """
    try:
        text = header[12 if header[6] != 1 else 10:].decode("latin1" if header[6] < 3
                                                            else "utf8")
        fields = ast.literal_eval(text)
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
        raise PayloadError("MALFORMED", "the .npy header is not a literal dict") from None
    if not isinstance(fields, dict) or set(fields) != {"descr", "fortran_order", "shape"}:
        raise PayloadError("MALFORMED", "the .npy header must hold exactly descr, "
                           "fortran_order and shape")
    dims, fortran, descr = fields["shape"], fields["fortran_order"], fields["descr"]
    if not isinstance(dims, tuple) or len(dims) > 8 or not all(
            type(d) is int and 0 <= d < 1 << 40 for d in dims):
        raise PayloadError("MALFORMED", f"the .npy shape must be a tuple of at most 8 "
                           f"non-negative ints, got {str(dims)[:80]}")
    if not isinstance(fortran, bool):
        raise PayloadError("MALFORMED", f"fortran_order must be a bool, got {fortran!r}")
    if not isinstance(descr, str) or descr not in descrs:
        raise PayloadError("BAD_DTYPE", f"has dtype {str(descr)[:40]}; expected one of "
                           f"{', '.join(sorted(descrs))}")
    return dims, fortran, np.dtype(descr)


_FLOAT_DESCRS = frozenset(("<f2", "<f4", "<f8"))  # little-endian, as np.save writes them


def float32_layout(array: Array) -> tuple[int, tuple[int, ...], int] | None:
    """Where an ``Array``'s float32 values sit in ``Array.data``: (offset, shape, count).

    ``None`` unless ``data`` is a well-formed ``.npy`` of a C-ordered native float32 array
    (then ``np.frombuffer(data, np.float32, count, offset)`` holds its values).
    """
    if not isinstance(array, Array) or array.stype != NPY_STYPE:
        return None
    try:
        offset, dims, dtype, fortran = npy_layout("", array.data)
    except PayloadError:
        return None
    if dtype != _FLOAT32 or (fortran and len(dims) > 1):
        return None
    return offset, dims, math.prod(dims)


def pack_correction(correction: Mapping[str, LoraFactors]) -> ArrayRecord:
    """Base-correction factors (scale 1) as ``<module>.correction_B`` / ``.correction_A``."""
    arrays: dict[str, np.ndarray] = {}
    for module, f in correction.items():
        arrays[module + ".correction_B"] = f.scale * f.b
        arrays[module + ".correction_A"] = f.a
    return pack(arrays)


def unpack_correction(record: ArrayRecord) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A base-correction record as ``module -> (B, A)`` factors."""
    arrays = unpack(record)
    modules = sorted(k[: -len(".correction_A")] for k in arrays if k.endswith(".correction_A"))
    return {m: (arrays[m + ".correction_B"], arrays[m + ".correction_A"]) for m in modules}


def nbytes(record: ArrayRecord) -> int:
    """Payload bytes of a record (what the wire carries for it, before chunk framing)."""
    return int(record.count_bytes())
