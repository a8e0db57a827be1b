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

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedlora.privacy.secagg.errors import ShareAuthenticationError
from fedlora.privacy.secagg.ids import check_node_id, check_round

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
