"""Shamir t-of-n secret sharing over the prime field GF(2^521 − 1).

A secret ``s`` (at most 64 bytes, read as a big-endian integer) is the
constant term of a random polynomial of degree ``t − 1``::

    f(x) = s + a_1 x + … + a_{t−1} x^{t−1}  (mod p),   a_i uniform in GF(p)

and holder ``h`` receives ``f(x_h)`` with ``x_h = h + 1`` (node ids are in
``[0, 2^64)``, so evaluation points are distinct and non-zero). Any ``t``
shares give ``s`` back by Lagrange interpolation at 0::

    s = Σ_j y_j · Π_{m ≠ j} x_m / (x_m − x_j)   (mod p)

while ``t − 1`` shares are consistent with every possible secret. The
Mersenne prime ``p = 2^521 − 1`` is larger than any 64-byte secret, so a
32-byte key or seed is one field element. Shares are serialised as 66
big-endian bytes.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from fedlora.privacy.secagg.errors import ShamirError
from fedlora.privacy.secagg.ids import check_node_id

PRIME = 2**521 - 1
MAX_SECRET_BYTES = 64
SHARE_BYTES = 66


def split_secret(secret: bytes, threshold: int, holders: Sequence[int]) -> dict[int, bytes]:
    """Share ``secret`` among ``holders`` so that any ``threshold`` of them recover it.

    Parameters
    ----------
    secret
        1 to 64 bytes.
    threshold
        ``t``, with ``1 ≤ t ≤ len(holders)``.
    holders
        Distinct node ids in ``[0, 2^64)``.

    Returns
    -------
    dict[int, bytes]
        ``holder → share`` (``SHARE_BYTES`` each).
    """
    if not isinstance(secret, bytes) or not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ShamirError("BAD_SECRET", f"secrets are 1 to {MAX_SECRET_BYTES} bytes")
    if len(set(holders)) != len(holders):
        raise ShamirError("DUPLICATE_HOLDER", f"share holders must be distinct, got {holders}")
    if not 1 <= threshold <= len(holders):
        raise ShamirError(
            "BAD_THRESHOLD",
            f"threshold must be in [1, {len(holders)}] for {len(holders)} holders, got {threshold}",
        )
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {
        holder: _evaluate(coefficients, _point(holder)).to_bytes(SHARE_BYTES, "big")
        for holder in holders
    }


def combine_shares(shares: Mapping[int, bytes], threshold: int, secret_size: int) -> bytes:
    """Recover a ``secret_size``-byte secret from at least ``threshold`` shares.

    Uses the ``threshold`` shares of the lowest holder ids, so the result does
    not depend on the order or number of extra shares.

    Raises
    ------
    ShamirError
        Fewer than ``threshold`` shares, a malformed share, or a result that
        does not fit in ``secret_size`` bytes (inconsistent shares).
    """
    if len(shares) < threshold:
        raise ShamirError(
            "TOO_FEW_SHARES",
            f"{threshold} shares are needed to reconstruct the secret, got {len(shares)}",
        )
    chosen = {holder: shares[holder] for holder in sorted(shares)[:threshold]}
    value = reconstruct_value(chosen)
    if value.bit_length() > 8 * secret_size:
        raise ShamirError(
            "INCONSISTENT_SHARES",
            f"the shares interpolate to a value wider than {secret_size} bytes: "
            "they are corrupt, or belong to different secrets",
        )
    return value.to_bytes(secret_size, "big")


def reconstruct_value(shares: Mapping[int, bytes]) -> int:
    """Interpolate the polynomial through all ``shares`` at 0 and return the field element.

    With fewer shares than the threshold this is a field element unrelated to
    the secret (uniform over the field); :func:`combine_shares` is the checked
    entry point.
    """
    return _interpolate(shares, 0)


def evaluate_at(shares: Mapping[int, bytes], holder: int) -> bytes:
    """The share ``holder`` would hold on the polynomial through ``shares`` (``f(x_holder)``).

    With ``t`` shares that rebuilt a verified secret this is what an honest ``holder``
    sent; a share that differs was altered (used to name a bad share holder).
    """
    return _interpolate(shares, _point(holder)).to_bytes(SHARE_BYTES, "big")


def _interpolate(shares: Mapping[int, bytes], x: int) -> int:
    """Lagrange interpolation of the points in ``shares`` at ``x`` (mod p)."""
    points = [(_point(holder), _share_value(holder, share)) for holder, share in shares.items()]
    if not points:
        raise ShamirError("TOO_FEW_SHARES", "cannot interpolate without shares")
    total = 0
    for j, (x_j, y_j) in enumerate(points):
        numerator, denominator = 1, 1
        for m, (x_m, _) in enumerate(points):
            if m != j:
                numerator = numerator * (x_m - x) % PRIME
                denominator = denominator * (x_m - x_j) % PRIME
        total = (total + y_j * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result


def _point(holder: int) -> int:
    return check_node_id(holder, "share holder") + 1


def _share_value(holder: int, share: bytes) -> int:
    if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
        raise ShamirError(
            "MALFORMED_SHARE", f"share of holder {holder} must be {SHARE_BYTES} bytes"
        )
    value = int.from_bytes(share, "big")
    if value >= PRIME:
        raise ShamirError("MALFORMED_SHARE", f"share of holder {holder} is outside the field")
    return value
