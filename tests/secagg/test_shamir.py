"""Shamir t-of-n sharing over GF(2^521 − 1)."""

from __future__ import annotations

import itertools
import os

import pytest

from fedlora.privacy.secagg import ShamirError
from fedlora.privacy.secagg.shamir import (
    PRIME,
    SHARE_BYTES,
    combine_shares,
    reconstruct_value,
    split_secret,
)

HOLDERS = [0, 7, 2**64 - 1, 123456789, 42, 99]


def test_any_t_shares_reconstruct() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, 3, HOLDERS)
    for subset in itertools.combinations(HOLDERS, 3):
        assert combine_shares({h: shares[h] for h in subset}, 3, 32) == secret


def test_t_minus_one_shares_give_a_different_value() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, 3, HOLDERS)
    for subset in itertools.combinations(HOLDERS, 2):
        partial = {h: shares[h] for h in subset}
        assert reconstruct_value(partial) != int.from_bytes(secret, "big")
        with pytest.raises(ShamirError, match="TOO_FEW_SHARES"):
            combine_shares(partial, 3, 32)


def test_extra_shares_do_not_change_the_result() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, 4, HOLDERS)
    assert combine_shares(shares, 4, 32) == secret
    assert reconstruct_value(shares) == int.from_bytes(secret, "big")  # all 6 points agree


@pytest.mark.parametrize("secret", [bytes(32), b"\x00\x00\x01" + bytes(29), b"\xff" * 64, b"x"])
def test_edge_secrets_keep_their_length(secret: bytes) -> None:
    shares = split_secret(secret, 2, HOLDERS[:3])
    assert combine_shares(shares, 2, len(secret)) == secret


def test_threshold_one_shares_the_secret_itself() -> None:
    shares = split_secret(b"\x05", 1, [3, 4])
    assert {int.from_bytes(s, "big") for s in shares.values()} == {5}


def test_shares_are_field_elements_of_fixed_size() -> None:
    shares = split_secret(os.urandom(32), 3, HOLDERS)
    assert all(len(s) == SHARE_BYTES and int.from_bytes(s, "big") < PRIME for s in shares.values())


def test_corrupt_share_is_detected() -> None:
    shares = split_secret(os.urandom(32), 3, HOLDERS)
    first = HOLDERS[0]
    shares[first] = (int.from_bytes(shares[first], "big") ^ 1).to_bytes(SHARE_BYTES, "big")
    with pytest.raises(ShamirError, match="INCONSISTENT_SHARES"):
        combine_shares({h: shares[h] for h in sorted(HOLDERS)[:3]}, 3, 32)


@pytest.mark.parametrize(
    ("secret", "threshold", "holders", "match"),
    [
        (b"", 1, [1], "BAD_SECRET"),
        (bytes(65), 1, [1], "BAD_SECRET"),
        (b"s", 0, [1, 2], "BAD_THRESHOLD"),
        (b"s", 3, [1, 2], "BAD_THRESHOLD"),
        (b"s", 1, [1, 1], "DUPLICATE_HOLDER"),
    ],
)
def test_invalid_split(secret: bytes, threshold: int, holders: list[int], match: str) -> None:
    with pytest.raises(ShamirError, match=match):
        split_secret(secret, threshold, holders)


def test_invalid_holder_id() -> None:
    with pytest.raises(ValueError, match="share holder"):
        split_secret(b"s", 1, [-1])


@pytest.mark.parametrize("share", [b"short", PRIME.to_bytes(SHARE_BYTES, "big")])
def test_malformed_shares_are_refused(share: bytes) -> None:
    with pytest.raises(ShamirError, match="MALFORMED_SHARE"):
        reconstruct_value({1: share})
