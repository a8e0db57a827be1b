"""X25519 agreement and HKDF derivation bound to purpose, round and pair."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedlora.privacy.secagg.keys import (
    CHANNEL_PURPOSE,
    MASK_PURPOSE,
    agree,
    check_public_key,
    generate_private_key,
    load_private_key,
    private_bytes,
    public_bytes,
)


def _agree(
    private: X25519PrivateKey,
    peer_public: bytes,
    *,
    purpose: bytes = MASK_PURPOSE,
    server_round: int = 1,
    self_id: int = 3,
    peer_id: int = 9,
) -> bytes:
    return agree(
        private,
        peer_public,
        purpose=purpose,
        server_round=server_round,
        self_id=self_id,
        peer_id=peer_id,
    )


def test_both_sides_derive_the_same_key() -> None:
    u, v = generate_private_key(), generate_private_key()
    key = _agree(u, public_bytes(v), self_id=3, peer_id=9)
    assert key == _agree(v, public_bytes(u), self_id=9, peer_id=3)
    assert len(key) == 32


def test_keys_differ_by_purpose_round_and_pair() -> None:
    u, v = generate_private_key(), generate_private_key()
    base = _agree(u, public_bytes(v))
    assert base != _agree(u, public_bytes(v), purpose=CHANNEL_PURPOSE)
    assert base != _agree(u, public_bytes(v), server_round=2)
    assert base != _agree(u, public_bytes(v), peer_id=10)


def test_private_key_round_trip() -> None:
    key = generate_private_key()
    assert public_bytes(load_private_key(private_bytes(key))) == public_bytes(key)


def test_low_order_public_key_is_refused() -> None:
    with pytest.raises(ValueError):
        _agree(generate_private_key(), bytes(32))


def test_agreeing_with_oneself_is_refused() -> None:
    key = generate_private_key()
    with pytest.raises(ValueError, match="itself"):
        _agree(key, public_bytes(key), self_id=4, peer_id=4)


@pytest.mark.parametrize("raw", [b"short", "not bytes", bytes(33)])
def test_malformed_public_keys(raw: object) -> None:
    with pytest.raises(ValueError, match="32 raw bytes"):
        check_public_key(raw)


def test_invalid_round_or_ids() -> None:
    u, v = generate_private_key(), generate_private_key()
    with pytest.raises(ValueError, match="server_round"):
        _agree(u, public_bytes(v), server_round=-1)
    with pytest.raises(ValueError, match="node id"):
        _agree(u, public_bytes(v), peer_id=2**64)
