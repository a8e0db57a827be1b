"""Authenticated encryption of secret shares relayed by the server.

Client ``u`` sends its shares for ``v`` through the server, which must learn
nothing from them and must not be able to alter, swap or replay them. Each
message is AES-256-GCM under the key ``agree(c_u^SK, c_v^PK, purpose=channel)``
with a random 96-bit nonce; the associated data binds the round, the sender
and the receiver, so a ciphertext moved to another pair, direction or round
fails authentication.

Wire format: ``nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedlora.privacy.secagg.errors import ShareAuthenticationError
from fedlora.privacy.secagg.ids import check_node_id, check_round
from fedlora.privacy.secagg.keys import CHANNEL_PURPOSE, agree
from fedlora.privacy.secagg.shamir import PRIME, SHARE_BYTES

NONCE_BYTES = 12
TAG_BYTES = 16
_AD_TAG = b"fedlora-secagg-v1|shares|"


def associated_data(server_round: int, sender: int, receiver: int) -> bytes:
    """The authenticated (not encrypted) context of one share message."""
    return _AD_TAG + struct.pack(
        ">QQQ", check_round(server_round), check_node_id(sender), check_node_id(receiver)
    )


def encrypt_shares(
    key: bytes, plaintext: bytes, *, server_round: int, sender: int, receiver: int
) -> bytes:
    """Encrypt ``plaintext`` from ``sender`` to ``receiver`` for ``server_round``."""
    nonce = os.urandom(NONCE_BYTES)
    ad = associated_data(server_round, sender, receiver)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def decrypt_shares(
    key: bytes, message: bytes, *, server_round: int, sender: int, receiver: int
) -> bytes:
    """Decrypt and authenticate a message from :func:`encrypt_shares`.

    Raises
    ------
    ShareAuthenticationError
        The message was altered, truncated, or encrypted for another round,
        sender or receiver.
    """
    if not isinstance(message, bytes) or len(message) < NONCE_BYTES + TAG_BYTES:
        raise ShareAuthenticationError(
            f"share message from client {sender} to {receiver} is too short to be a ciphertext "
            f"(expected ≥ {NONCE_BYTES + TAG_BYTES} bytes)"
        )
    ad = associated_data(server_round, sender, receiver)
    try:
        return AESGCM(key).decrypt(message[:NONCE_BYTES], message[NONCE_BYTES:], ad)
    except InvalidTag:
        raise ShareAuthenticationError(
            f"shares from client {sender} to client {receiver} for round {server_round} failed "
            "authentication: the ciphertext was altered in transit or belongs to another "
            "round or pair; this client stops taking part in the round"
        ) from None


def seal_share_pairs(encryption_key: X25519PrivateKey, peer_keys: Mapping[int, bytes],
                     pairs: Mapping[int, bytes], *, server_round: int,
                     sender: int) -> dict[int, bytes]:
    """Stage 1: ``pairs[v]`` (``v``'s self-mask share ‖ mask-key share) encrypted for each peer
    ``v`` under ``agree(encryption_key, peer_keys[v], purpose=channel)``, in peer order."""
    ciphertexts = {}
    for peer in sorted(pairs):
        channel = agree(encryption_key, peer_keys[peer], purpose=CHANNEL_PURPOSE,
                        server_round=server_round, self_id=sender, peer_id=peer)
        ciphertexts[peer] = encrypt_shares(channel, pairs[peer], server_round=server_round,
                                           sender=sender, receiver=peer)
    return ciphertexts


def open_share_pairs(encryption_key: X25519PrivateKey, peer_keys: Mapping[int, bytes],
                     ciphertexts: Mapping[int, bytes], *, server_round: int, receiver: int
                     ) -> tuple[dict[int, tuple[bytes, bytes]], frozenset[int]]:
    """Stage 2: the ``(self-mask share, mask-key share)`` each sender sealed for ``receiver``
    (:func:`seal_share_pairs`), and the senders whose ciphertext did not authenticate or did
    not hold two shares in the field: those are reported, not raised."""
    held: dict[int, tuple[bytes, bytes]] = {}
    unreadable = set()
    for peer in sorted(ciphertexts):
        channel = agree(encryption_key, peer_keys[peer], purpose=CHANNEL_PURPOSE,
                        server_round=server_round, self_id=receiver, peer_id=peer)
        try:
            plain = decrypt_shares(channel, ciphertexts[peer], server_round=server_round,
                                   sender=peer, receiver=receiver)
        except ShareAuthenticationError:
            unreadable.add(peer)
            continue
        seed_share, key_share = plain[:SHARE_BYTES], plain[SHARE_BYTES:]
        if len(plain) != 2 * SHARE_BYTES or not all(
            int.from_bytes(share, "big") < PRIME for share in (seed_share, key_share)
        ):
            unreadable.add(peer)
            continue
        held[peer] = (seed_share, key_share)
    return held, frozenset(unreadable)
