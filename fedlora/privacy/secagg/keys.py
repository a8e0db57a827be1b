"""X25519 key agreement and HKDF key derivation (Bonawitz et al. 2017, §4).

Each client holds two X25519 key pairs per round:

* the *mask* pair ``(s_u^SK, s_u^PK)``: ``X25519(s_u^SK, s_v^PK)`` seeds the
  pairwise mask of ``u`` and ``v``. If ``u`` drops out, ``s_u^SK`` is
  reconstructed from Shamir shares so the server can remove those masks;
* the *encryption* pair ``(c_u^SK, c_u^PK)``: ``X25519(c_u^SK, c_v^PK)`` keys
  the channel that carries ``u``'s shares to ``v`` through the server. It is a
  separate pair so that revealing a dropped client's mask key never opens the
  share channels.

Raw shared secrets are never used directly: HKDF-SHA256 derives a 32-byte key
whose ``info`` binds a protocol tag, the purpose, the round and the (sorted)
pair of client ids, so keys of different rounds, pairs and purposes are
independent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlora.privacy.secagg.ids import check_node_id, check_round

KEY_BYTES = 32
_TAG = b"fedlora-secagg-v1|"
MASK_PURPOSE = b"pairwise-mask"
CHANNEL_PURPOSE = b"share-channel"


@dataclass(frozen=True)
class PublicKeys:
    """A client's two advertised X25519 public keys (32 raw bytes each)."""

    mask: bytes
    encryption: bytes


def generate_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key (one per purpose and round)."""
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of ``key`` (what is secret-shared and kept in client state)."""
    return key.private_bytes_raw()


def load_private_key(raw: bytes) -> X25519PrivateKey:
    """Inverse of :func:`private_bytes`."""
    return X25519PrivateKey.from_private_bytes(raw)


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw public-key bytes of ``key``."""
    return key.public_key().public_bytes_raw()


#: u-coordinates of the points of small order on Curve25519 and its twist (orders 1, 2, 4, 8),
#: reduced mod p = 2^255 − 19. Any X25519 key agreement with one of them yields the all-zero
#: shared secret, whatever the private key (Bernstein 2006; RFC 7748 §6.1 says to check it).
_FIELD = 2**255 - 19
LOW_ORDER_U = frozenset({
    0,
    1,
    _FIELD - 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
})
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(1, KEY_BYTES + 1)))


def check_public_key(raw: object) -> bytes:
    """Return ``raw`` if it is a usable X25519 public key, else raise :class:`ValueError`.

    Usable: 32 bytes, and not a point of small order. The u-coordinate is read as X25519
    reads it (little-endian, top bit ignored, reduced mod p), checked against
    :data:`LOW_ORDER_U`, and a key agreement with a fixed probe key must not give the
    all-zero secret (which OpenSSL refuses). A low-order key would make every neighbour's
    agreement fail — one client could end every round — so the server drops its sender at
    stage 0 and a client refuses it in a key directory.
    """
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} raw bytes, got {raw!r:.60}")
    u = (int.from_bytes(raw, "little") & ((1 << 255) - 1)) % _FIELD
    if u in LOW_ORDER_U:
        raise ValueError(
            f"the X25519 public key {raw.hex()[:16]}… is a point of small order (u = {u}); "
            "every key agreement with it gives the all-zero secret"
        )
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise ValueError(
            f"the X25519 public key {raw.hex()[:16]}… gives an all-zero shared secret "
            "(a point of small order)"
        ) from None
    return raw


def commit(
    self_seed: bytes, keys: PublicKeys, *, server_round: int, node_id: int
) -> bytes:
    """SHA-256 commitment of client ``node_id`` to its self-mask seed and public keys.

    ``H(tag ‖ round ‖ id ‖ b_u ‖ s_u^PK ‖ c_u^PK)``: sent at stage 1, before any share is
    revealed, so the server can tell a correctly rebuilt ``b_u`` from one an altered share
    produced. ``b_u`` is 32 uniformly random bytes, so the hash reveals nothing usable
    about it (preimage resistance of SHA-256).
    """
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_TAG + b"commit|" + struct.pack(
        ">QQ", check_round(server_round), check_node_id(node_id)))
    digest.update(self_seed + keys.mask + keys.encryption)
    return digest.finalize()


def agree(
    private: X25519PrivateKey,
    peer_public: bytes,
    *,
    purpose: bytes,
    server_round: int,
    self_id: int,
    peer_id: int,
) -> bytes:
    """32-byte key shared by ``self_id`` and ``peer_id`` for ``purpose`` in ``server_round``.

    Both sides get the same key: X25519 is symmetric and the ids enter the HKDF
    ``info`` sorted. Raises :class:`ValueError` on a malformed or low-order
    public key (all-zero shared secret).
    """
    if self_id == peer_id:
        raise ValueError(f"a client cannot agree a key with itself (id {self_id})")
    secret = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    low, high = sorted((check_node_id(self_id), check_node_id(peer_id)))
    info = _TAG + purpose + b"|" + struct.pack(">QQQ", check_round(server_round), low, high)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)
