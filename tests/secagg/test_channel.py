"""AES-GCM share channel: confidentiality plus authentication of round, sender and receiver."""

from __future__ import annotations

import os

import pytest

from fedlora.privacy.secagg import ShareAuthenticationError
from fedlora.privacy.secagg.channel import NONCE_BYTES, TAG_BYTES, decrypt_shares, encrypt_shares

KEY = bytes(range(32))
PLAIN = b"share-of-b" * 13


def _encrypt(**overrides: object) -> bytes:
    args = {"server_round": 5, "sender": 11, "receiver": 22, **overrides}
    return encrypt_shares(KEY, PLAIN, **args)  # type: ignore[arg-type]


def _decrypt(message: bytes, key: bytes = KEY, **overrides: object) -> bytes:
    args = {"server_round": 5, "sender": 11, "receiver": 22, **overrides}
    return decrypt_shares(key, message, **args)  # type: ignore[arg-type]


def test_round_trip_hides_the_plaintext() -> None:
    message = _encrypt()
    assert _decrypt(message) == PLAIN
    assert PLAIN not in message
    assert len(message) == NONCE_BYTES + len(PLAIN) + TAG_BYTES
    assert _encrypt() != message  # fresh nonce per message


@pytest.mark.parametrize("position", [0, NONCE_BYTES, NONCE_BYTES + 40, -1])
def test_any_flipped_bit_fails_authentication(position: int) -> None:
    message = bytearray(_encrypt())
    message[position] ^= 0x01
    with pytest.raises(ShareAuthenticationError, match="BAD_CIPHERTEXT"):
        _decrypt(bytes(message))


@pytest.mark.parametrize(
    "overrides",
    [
        {"server_round": 6},
        {"sender": 12},
        {"receiver": 23},
        {"sender": 22, "receiver": 11},  # the reverse direction
    ],
)
def test_wrong_associated_data_fails_authentication(overrides: dict) -> None:
    with pytest.raises(ShareAuthenticationError):
        _decrypt(_encrypt(), **overrides)


def test_wrong_key_or_truncation_fails() -> None:
    message = _encrypt()
    with pytest.raises(ShareAuthenticationError):
        _decrypt(message, key=os.urandom(32))
    with pytest.raises(ShareAuthenticationError, match="too short"):
        _decrypt(message[: NONCE_BYTES + TAG_BYTES - 1])
    with pytest.raises(ShareAuthenticationError):
        _decrypt(message[:-1])
