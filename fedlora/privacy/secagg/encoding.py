"""Fixed-point encoding of weighted client vectors in the ring Z_{2^32}.

Masks only cancel in a finite ring, so floats are mapped to ``uint32`` words
(4 bytes per parameter on the wire) and summed with natural wraparound.

Encoding, for ``n`` clients, clip range ``c`` and weight bound ``W``::

    L = ⌊(2^31 − 1) / (n · 2^h)⌋         # levels per client, h = HEADROOM_BITS, so that
                                         # |Σ q| ≤ n·L ≤ 2^(31−h): h bits of the ring unused
    ω = weight / W ∈ [0, 1]              # normalised client weight
    q_i = rint(ω · clip(x_i, −c, c) · L / c)   for each coordinate i
    q_d = rint(ω · L)                    # extra coordinate: the normaliser
    word = q mod 2^32                    # two's complement in uint32

Every ``|q| ≤ L``, so the sum over ``m ≤ n`` clients lies in ``[−m·L, m·L]`` and
is recovered exactly by reading the summed words as ``int32``. Decoding
multiplies by ``c·W / L`` (``W / L`` for the normaliser), giving
``Σ w_k clip(x_k)`` and ``Σ w_k``.

Headroom: honest sums lie in ``[−2^(31−h), 2^(31−h)]``, a ``2^−h`` share of the
ring, so a sum that a wrong unmasking left uniformly random lands outside
``[−m·L, m·L]`` in each coordinate with probability at least ``1 − 2^−h``; :meth:`decode`
with ``contributors`` rejects any coordinate outside that range, and a
normaliser outside ``[0, m·L]``. (Not in Bonawitz et al., whose protocol
assumes the reconstructed masks are right.) ``h = 1`` costs a 2× coarser step; a random
sum passes all ``d`` coordinates with probability ``2^−d``.

Error bound: round-to-nearest is off by at most half a level per client and
coordinate, so for ``m`` contributing clients::

    |decoded − Σ w_k clip(x_k)| ≤ m · step / 2,   step = c·W / L
    |decoded normaliser − Σ w_k| ≤ m · W / (2L)

(plus float32 rounding of the result). Rounding is deterministic, so equal
inputs always give equal words.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

RING_BITS = 32
HEADROOM_BITS = 1  # h: the ring bit no honest sum uses, so a corrupted one shows
_MAX_SIGNED = 2 ** (RING_BITS - 1) - 1
_CHUNK = 1 << 16


@dataclass(frozen=True)
class DecodedSum:
    """The decoded secure sum.

    Parameters
    ----------
    weighted_sum
        ``Σ_k w_k · clip(x_k)``, shape ``(d,)``, float32.
    total_weight
        ``Σ_k w_k`` (the securely summed normaliser).
    """

    weighted_sum: np.ndarray
    total_weight: float

    def mean(self) -> np.ndarray:
        """Weighted mean ``Σ w_k x_k / Σ w_k`` as float32, shape ``(d,)``."""
        if not self.total_weight > 0:
            raise ValueError(
                f"cannot form a weighted mean: the summed weight is {self.total_weight}; "
                "at least one contributing client needs a weight > 0"
            )
        return (self.weighted_sum.astype(np.float64) / self.total_weight).astype(np.float32)


@dataclass(frozen=True)
class FixedPointCodec:
    """Encoder/decoder between float vectors and ``uint32`` ring elements.

    Parameters
    ----------
    clip_range
        ``c``: coordinates are clipped to ``[-c, c]``.
    max_weight
        ``W``: the largest accepted client weight.
    num_clients
        ``n``: the most clients whose encodings will be summed.
    """

    clip_range: float
    max_weight: float
    num_clients: int

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be finite and > 0, got {self.clip_range!r}")
        if not (np.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError(f"max_weight must be finite and > 0, got {self.max_weight!r}")
        if not 1 <= self.num_clients <= _MAX_SIGNED:
            raise ValueError(f"num_clients must be in [1, 2^31 − 1], got {self.num_clients}")

    @property
    def levels(self) -> int:
        """``L``: quantisation levels per client on each side of zero."""
        return _MAX_SIGNED // (self.num_clients << HEADROOM_BITS)

    @property
    def step(self) -> float:
        """Quantisation step of one client's weighted coordinate ``w·x``, ``c·W / L``."""
        return self.clip_range * self.max_weight / self.levels

    def error_bound(self, contributors: int) -> float:
        """Largest decoding error of a weighted-sum coordinate: ``m · step / 2``."""
        return contributors * self.step / 2

    def weight_error_bound(self, contributors: int) -> float:
        """Largest decoding error of the summed weight: ``m · W / (2L)``."""
        return contributors * self.max_weight / (2 * self.levels)

    def encode(self, vector: np.ndarray, weight: float) -> np.ndarray:
        """Encode ``weight · clip(vector)`` and the normaliser ``weight``.

        Parameters
        ----------
        vector
            Finite floats, shape ``(d,)``.
        weight
            Client weight in ``[0, max_weight]``.

        Returns
        -------
        np.ndarray
            ``uint32``, shape ``(d + 1,)``; the last word encodes the weight.
        """
        vector = np.asarray(vector)
        if vector.ndim != 1 or not np.issubdtype(vector.dtype, np.floating):
            raise ValueError(
                f"expected a 1-D float vector, got dtype {vector.dtype} and shape {vector.shape}; "
                "flatten the arrays first (flatten_arrays)"
            )
        if not np.all(np.isfinite(vector)):
            raise ValueError(
                f"the vector has {int(np.sum(~np.isfinite(vector)))} NaN/Inf coordinate(s); "
                "fix the local update before secure aggregation"
            )
        if not (np.isfinite(weight) and 0 <= weight <= self.max_weight):
            raise ValueError(
                f"client weight must be in [0, max_weight={self.max_weight}], got {weight!r}; "
                "raise SecAggConfig.max_weight to the largest weight any client can have"
            )
        omega = float(weight) / self.max_weight
        factor = omega * self.levels / self.clip_range
        words = np.empty(vector.size + 1, dtype=np.uint32)  # (d + 1,)
        # Chunks keep the float64/int64 temporaries cache-resident (~5x faster than whole-array).
        scratch = np.empty(min(_CHUNK, vector.size), dtype=np.float64)
        for start in range(0, vector.size, _CHUNK):
            stop = min(start + _CHUNK, vector.size)
            chunk = scratch[: stop - start]
            chunk[:] = vector[start:stop]
            np.clip(chunk, -self.clip_range, self.clip_range, out=chunk)
            chunk *= factor
            np.rint(chunk, out=chunk)
            words[start:stop] = chunk.astype(np.int64)  # two's complement wrap into uint32
        words[-1] = np.uint32(round(omega * self.levels))
        return words

    def decode(self, total: np.ndarray, contributors: int | None = None) -> DecodedSum:
        """Decode the ring sum of at most ``num_clients`` encodings.

        Parameters
        ----------
        total
            ``uint32``, shape ``(d + 1,)``, the unmasked sum.
        contributors
            ``m``, the number of encodings in the sum. When given, every coordinate must
            lie in ``[−m·L, m·L]`` and the normaliser in ``[0, m·L]``: that is all an honest
            sum can be.

        Raises
        ------
        OutOfRange
            A coordinate or the normaliser outside its possible range (a wrong mask was
            removed, or a client encoded out of range).
        """
        if total.dtype != np.uint32 or total.ndim != 1 or total.size < 1:
            raise ValueError(
                f"expected a 1-D uint32 ring sum, got dtype {total.dtype} and shape {total.shape}"
            )
        if contributors is not None:
            self.check_range(total, contributors)
        signed = total.view(np.int32).astype(np.float64)  # (d + 1,)
        weighted = signed[:-1] * (self.clip_range * self.max_weight / self.levels)
        total_weight = float(signed[-1]) * self.max_weight / self.levels
        return DecodedSum(weighted_sum=weighted.astype(np.float32), total_weight=total_weight)


    def check_range(self, total: np.ndarray, contributors: int) -> None:
        """Raise :class:`OutOfRange` unless ``total`` is a possible sum of ``contributors``
        honest encodings (see :meth:`decode`)."""
        bound = contributors * self.levels
        signed = total.view(np.int32)
        outside = 0
        for start in range(0, signed.size - 1, _CHUNK):
            chunk = signed[start : min(start + _CHUNK, signed.size - 1)].astype(np.int64)
            outside += int(np.count_nonzero(np.abs(chunk) > bound))
        normaliser = int(signed[-1])
        if outside or not 0 <= normaliser <= bound:
            raise OutOfRange(
                f"the decoded sum of {contributors} encoding(s) has {outside} of "
                f"{signed.size - 1} coordinate(s) outside ±{bound} and a normaliser of "
                f"{normaliser} (possible: 0 to {bound}); a wrong mask was removed or a client "
                "encoded out of range"
            )


class OutOfRange(ValueError):
    """A decoded secure sum that no honest set of encodings can produce."""


@dataclass(frozen=True)
class ArrayLayout:
    """Names, shapes and dtypes of a dict of arrays, in sorted-name order.

    Secure aggregation works on one flat vector; the layout restores the
    named arrays (e.g. ``lora_A``/``lora_B`` per module) after the sum.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def size(self) -> int:
        """Total number of coordinates."""
        return sum(int(np.prod(shape)) for shape in self.shapes)

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Split ``vector`` (shape ``(size,)``) back into named arrays of the original dtypes."""
        if vector.shape != (self.size,):
            raise ValueError(f"expected a vector of shape ({self.size},), got {vector.shape}")
        out: dict[str, np.ndarray] = {}
        start = 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            count = int(np.prod(shape))
            out[name] = vector[start : start + count].reshape(shape).astype(dtype)
            start += count
        return out


def flatten_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ArrayLayout]:
    """Concatenate named float arrays (sorted by name) into one float64 vector.

    Returns
    -------
    tuple[np.ndarray, ArrayLayout]
        The vector, shape ``(Σ sizes,)``, and the layout that inverts it.
    """
    names = tuple(sorted(arrays))
    values = [np.asarray(arrays[name]) for name in names]
    for name, value in zip(names, values, strict=True):
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"array {name!r} must be floating point, got dtype {value.dtype}")
    layout = ArrayLayout(
        names=names,
        shapes=tuple(v.shape for v in values),
        dtypes=tuple(v.dtype.str for v in values),
    )
    if not values:
        return np.zeros(0, dtype=np.float64), layout
    return np.concatenate([v.astype(np.float64).ravel() for v in values]), layout
