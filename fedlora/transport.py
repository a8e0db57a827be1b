"""The Flower boundary of payloads: arrays ⇄ ``ArrayRecord``, byte accounting.

Everything that crosses the wire is float32 numpy arrays keyed by peft state-dict names
(``ArrayRecord`` rejects bfloat16 and bare numpy dicts, so values are wrapped as ``Array``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from fedlora.aggregation import LoraFactors
from fedlora.errors import PayloadError

ALLOWED_DTYPES = (np.float32, np.float16, np.float64)


def pack(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap named arrays (cast to float32) into an ``ArrayRecord``, sorted by name."""
    return ArrayRecord({k: Array(np.ascontiguousarray(arrays[k], dtype=np.float32))
                        for k in sorted(arrays)})


def unpack(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``ArrayRecord`` → named float32 arrays; refuses non-float payloads."""
    out: dict[str, np.ndarray] = {}
    for key, array in record.items():
        value = array.numpy()
        if value.dtype not in ALLOWED_DTYPES:
            raise PayloadError("BAD_DTYPE", f"{key} has dtype {value.dtype}; expected float32")
        out[key] = value.astype(np.float32, copy=False)
    return out


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
