"""End-to-end integrity of client updates: Ed25519 signatures over a round-bound digest.

Flower's node authentication signs a timestamp, not the payload; a relay or a
compromised SuperLink could alter or replay an update. Each client therefore
signs::

    digest = SHA-256(tag ‖ run_id ‖ server_round ‖ node_id ‖ nonce ‖ payload_hash)

with its Ed25519 key, where ``payload_hash`` is :func:`hash_arrays` of the
arrays it uploads (or the SHA-256 of any other payload bytes). The server's
:class:`UpdateVerifier` checks, in this order, and reports the first failure
with a distinct reason code:

``MALFORMED``       wrong field types or sizes
``UNKNOWN_NODE``    no registered public key for the node
``BAD_SIGNATURE``   the signature does not verify (forged, altered envelope, wrong key)
``TAMPERED``        the payload received does not hash to the signed payload hash
``WRONG_RUN``       validly signed, but for another run
``WRONG_NODE``      validly signed by another node than the one it came from (a relayed update)
``WRONG_ROUND``     validly signed, but for another round (a stale or replayed update)
``REPLAYED``        the nonce was already accepted (an exact replay)
``DUPLICATE``       the node already has an accepted update in this round

Checking the signature before the run, round and nonce means those codes only
describe authenticated facts; state (nonces, accepted nodes) only changes on
acceptance, so rejected messages cannot poison the verifier.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedlora.privacy.secagg.errors import SecAggError
from fedlora.privacy.secagg.ids import check_node_id, check_round

NONCE_BYTES = 16
HASH_BYTES = 32
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
_TAG = b"fedlora-update-v1"
REASONS = (
    "MALFORMED",
    "UNKNOWN_NODE",
    "BAD_SIGNATURE",
    "TAMPERED",
    "WRONG_RUN",
    "WRONG_NODE",
    "WRONG_ROUND",
    "REPLAYED",
    "DUPLICATE",
)


class SignatureRejected(SecAggError, ValueError):
    """A signed update failed verification; ``reason`` is one of :data:`REASONS`."""


def hash_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Canonical SHA-256 of named numpy arrays.

    Hashes, for each name in sorted order: the UTF-8 name, the dtype (as
    little-endian ``dtype.str``), the shape and the little-endian C-order
    bytes, each length-prefixed. Insertion order, memory layout and byte order
    do not change the hash; any change of name, dtype, shape or value does.
    """
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_TAG + b"|arrays|" + struct.pack(">Q", len(arrays)))
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        if array.dtype.hasobject:
            raise ValueError(f"array {name!r} has dtype object; only numeric arrays can be hashed")
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        for part in (name.encode(), array.dtype.str.encode()):
            digest.update(struct.pack(">Q", len(part)) + part)
        digest.update(struct.pack(f">Q{array.ndim}Q", array.ndim, *array.shape))
        digest.update(struct.pack(">Q", array.nbytes))
        digest.update(array.data.cast("B"))
    return digest.finalize()


def update_digest(
    run_id: str, server_round: int, node_id: int, nonce: bytes, payload_hash: bytes
) -> bytes:
    """The 32-byte message an update signature covers (see the module docstring)."""
    run = run_id.encode()
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_TAG + struct.pack(">Q", len(run)) + run)
    digest.update(struct.pack(">QQ", check_round(server_round), check_node_id(node_id)))
    digest.update(nonce + payload_hash)
    return digest.finalize()


@dataclass(frozen=True)
class SignedUpdate:
    """The signature envelope that travels next to an update's payload.

    Fields are str/int/bytes only, so they fit a Flower ``ConfigRecord``.
    """

    run_id: str
    server_round: int
    node_id: int
    nonce: bytes
    payload_hash: bytes
    signature: bytes


def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 key for one client."""
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """The 32 raw public-key bytes the server registers for the client."""
    return key.public_key().public_bytes_raw()


class UpdateSigner:
    """Signs one client's updates.

    Parameters
    ----------
    private_key
        The client's Ed25519 key.
    run_id
        Identifier of the federated run (Flower's run id as a string).
    node_id
        The client's node id.
    """

    def __init__(self, private_key: Ed25519PrivateKey, run_id: str, node_id: int) -> None:
        self._key = private_key
        self.run_id = run_id
        self.node_id = check_node_id(node_id)

    def sign(self, server_round: int, payload_hash: bytes) -> SignedUpdate:
        """Sign ``payload_hash`` for ``server_round`` with a fresh 16-byte nonce."""
        if not isinstance(payload_hash, bytes) or len(payload_hash) != HASH_BYTES:
            raise ValueError(f"payload_hash must be {HASH_BYTES} bytes (use hash_arrays)")
        nonce = secrets.token_bytes(NONCE_BYTES)
        digest = update_digest(self.run_id, server_round, self.node_id, nonce, payload_hash)
        return SignedUpdate(
            run_id=self.run_id,
            server_round=server_round,
            node_id=self.node_id,
            nonce=nonce,
            payload_hash=payload_hash,
            signature=self._key.sign(digest),
        )


class UpdateVerifier:
    """Verifies signed updates for one run and remembers what it accepted.

    Parameters
    ----------
    run_id
        The run whose updates are accepted.
    public_keys
        ``node id → raw Ed25519 public key`` of the registered clients.
    """

    def __init__(self, run_id: str, public_keys: Mapping[int, bytes]) -> None:
        self.run_id = run_id
        self._keys = {
            check_node_id(node): Ed25519PublicKey.from_public_bytes(raw)
            for node, raw in public_keys.items()
        }
        self._nonces: set[bytes] = set()
        self._accepted: set[tuple[int, int]] = set()

    def check(self, update: SignedUpdate, payload_hash: bytes, server_round: int,
              sender: int | None = None) -> str | None:
        """The reason code rejecting ``update``, or ``None`` if it is acceptable.

        Accepting records the nonce and the (round, node) pair, so the same
        update checked again is ``"REPLAYED"``.

        Parameters
        ----------
        update
            The envelope that came with the payload.
        payload_hash
            Hash of the payload as received (:func:`hash_arrays`).
        server_round
            The round the server is collecting.
        sender
            The node the update came from, as the transport reports it; ``None`` skips
            the check that it is the node that signed.
        """
        reason = self._first_problem(update, payload_hash, server_round, sender)
        if reason is None:
            self._nonces.add(update.nonce)
            self._accepted.add((server_round, update.node_id))
        return reason

    def verify(self, update: SignedUpdate, payload_hash: bytes, server_round: int,
               sender: int | None = None) -> None:
        """Like :meth:`check`, but raise :class:`SignatureRejected` instead of returning a code."""
        reason = self.check(update, payload_hash, server_round, sender)
        if reason is not None:
            raise SignatureRejected(reason, _explain(reason, update, server_round))

    def _first_problem(
        self, update: SignedUpdate, payload_hash: bytes, server_round: int, sender: int | None
    ) -> str | None:
        if not _well_formed(update, payload_hash):
            return "MALFORMED"
        key = self._keys.get(update.node_id)
        if key is None:
            return "UNKNOWN_NODE"
        digest = update_digest(
            update.run_id, update.server_round, update.node_id, update.nonce, update.payload_hash
        )
        try:
            key.verify(update.signature, digest)
        except InvalidSignature:
            return "BAD_SIGNATURE"
        if not secrets.compare_digest(update.payload_hash, payload_hash):
            return "TAMPERED"
        if update.run_id != self.run_id:
            return "WRONG_RUN"
        if sender is not None and update.node_id != sender:
            return "WRONG_NODE"
        if update.server_round != server_round:
            return "WRONG_ROUND"
        if update.nonce in self._nonces:
            return "REPLAYED"
        if (server_round, update.node_id) in self._accepted:
            return "DUPLICATE"
        return None


def _well_formed(update: SignedUpdate, payload_hash: bytes) -> bool:
    try:
        check_round(update.server_round)
        check_node_id(update.node_id)
    except (AttributeError, ValueError):
        return False
    sized = (
        (update.nonce, NONCE_BYTES),
        (update.payload_hash, HASH_BYTES),
        (update.signature, SIGNATURE_BYTES),
        (payload_hash, HASH_BYTES),
    )
    return isinstance(update.run_id, str) and all(
        isinstance(value, bytes) and len(value) == size for value, size in sized
    )


def _explain(reason: str, update: SignedUpdate, server_round: int) -> str:
    node = getattr(update, "node_id", "?")
    return {
        "MALFORMED": f"the update envelope of node {node} has wrong field types or sizes",
        "UNKNOWN_NODE": f"node {node} has no registered signing key; register its public key",
        "BAD_SIGNATURE": f"the signature of node {node} does not verify with its registered key",
        "TAMPERED": f"the payload of node {node} differs from the one it signed",
        "WRONG_RUN": f"node {node} signed this update for run {update.run_id!r}",
        "WRONG_NODE": f"node {node} signed this update, but another node sent it",
        "WRONG_ROUND": (
            f"node {node} signed this update for round {update.server_round}, the server "
            f"collects round {server_round}"
        ),
        "REPLAYED": f"this exact update of node {node} (same nonce) was already accepted",
        "DUPLICATE": f"node {node} already has an accepted update in round {server_round}",
    }[reason] + "; the update is discarded"
