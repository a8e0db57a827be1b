"""Signed updates on Flower's Message API (``sign-updates``): keys, envelopes, reply hashes.

Flower's SuperNode authentication signs a timestamp, not the payload: a relay or a compromised
SuperLink could alter, replay or duplicate a client's update. With ``sign-updates = true`` each
client signs, with its Ed25519 key (:mod:`fedlora.privacy.secagg.signing`)::

    SHA-256(tag ‖ run id ‖ round ‖ node id ‖ nonce ‖ reply hash)

where the reply hash (:func:`reply_hash`) covers every record of the reply: the arrays as the
bytes that travel (name, dtype, shape, serialisation, data — nothing is decoded to hash them),
the metrics (the example count is the update's weight) and any config record. The envelope
travels next to them as one ``ConfigRecord`` named ``signature``::

    run-id (str)  server-round (int)  node-id (int)  nonce (16 B)  payload-hash (32 B)
    signature (64 B)

Signed: a plain round's train reply (``arrays`` + ``metrics``), and under secure aggregation the
stage-2 masked input (``masked`` + ``secagg``), the only message that carries the update there,
and the stage-3 unmask response (``secagg``: the shares and seeds that remove the masks).

Keys. A node signs with the Ed25519 key file its node config names (``signing-key``, written
by ``fedlora certs``), or else with a key it draws once and keeps in ``context.state``. It
announces the public key in the capability query with a proof of possession (the key signs the
announcement as round 0 of this run and node). The server then uses, per node:

* ``signing-keys = DIR``: the announced key only if it is one of the registered
  ``DIR/signing-*.pub`` files (OpenSSH ``ssh-ed25519``) and no other node claimed it;
* ``signing-keys = ""``: the announced key, trusted on first use. This protects updates
  against tampering *after* the capability query (a relay altering, replaying or duplicating
  them); it does not authenticate the node itself, which Flower's SuperNode authentication
  does in deployment.

A node without a usable key stays in the federation and each of its replies is rejected as
``UNKNOWN_NODE``.

Secure-aggregation keys. Under ``secure-aggregation`` each node also signs its stage-0 X25519
public keys (:func:`sign_keys`: round, node id and both keys), and the server forwards each
node's Ed25519 key and signature in the key directory. A node checks every directory entry
(:func:`verify_directory`) before it shares a secret, so an active server cannot swap a
neighbour's keys for its own without that neighbour's Ed25519 private key. This holds when
the nodes can check the Ed25519 keys themselves: with ``signing-keys`` readable on the node
(node config ``signing-keys``, else the run config's directory if it exists there) only
registered keys are accepted, each for one node. With trust on first use the server chooses
the Ed25519 keys it forwards, so the check only protects against a relay, not the server.
Even with registered keys, a server colluding with a registered node can vouch with that
node's key for one absent neighbour — equivalent to one more colluding neighbour, which
``secagg-gamma`` already counts.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedlora.errors import ConfigError
from fedlora.privacy.secagg.signing import (
    SignatureRejected,
    SignedUpdate,
    UpdateSigner,
    UpdateVerifier,
)

SIGNATURE = "signature"  # the envelope's ConfigRecord in a signed reply
STATE = "fedlora.signing"  # context.state record of a node's drawn key
NODE_KEY = "signing-key"  # node config: path of the node's private key
PUBLIC_KEY_GLOB = "signing-*.pub"
ANNOUNCE_ROUND = 0  # training rounds start at 1
_TAG = b"fedlora-reply-v1"
_ENVELOPE = ("run-id", "server-round", "node-id", "nonce", "payload-hash", "signature")


# ----------------------------------------------------------------------------- hashing


def reply_hash(content: RecordDict) -> bytes:
    """SHA-256 of every record of ``content`` but the signature, without decoding any array.

    Records in name order; for each its name and kind, then per item (sorted by key) the key
    and its value: an ``Array``'s dtype, shape, serialisation type and raw bytes, a number
    or string with its type. Every field is length-prefixed, so no two replies share an
    encoding.
    """
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_TAG)
    for name in sorted(content):
        if name == SIGNATURE:
            continue
        record = content[name]
        kind = ("arrays" if isinstance(record, ArrayRecord) else
                "metrics" if isinstance(record, MetricRecord) else "config")
        _put(digest, name.encode(), kind.encode(), struct.pack(">Q", len(record)))
        for key in sorted(record):
            if isinstance(record, ArrayRecord):
                array = record[key]
                _put(digest, key.encode(), array.dtype.encode(), array.stype.encode(),
                     struct.pack(f">Q{len(array.shape)}q", len(array.shape), *array.shape),
                     array.data)
            else:
                _put(digest, key.encode(), _value_bytes(record[key]))
    return digest.finalize()


def _put(digest: hashes.Hash, *parts: bytes) -> None:
    for part in parts:
        digest.update(struct.pack(">Q", len(part)))
        digest.update(part)


def _value_bytes(value: Any) -> bytes:
    """A record value with its type: bools, ints and floats never encode alike."""
    if isinstance(value, bool):
        return b"?" + bytes([value])
    if isinstance(value, int):
        return b"i" + str(value).encode()
    if isinstance(value, float):
        return b"f" + struct.pack(">d", value)
    if isinstance(value, str):
        return b"s" + value.encode()
    if isinstance(value, bytes):
        return b"b" + value
    if isinstance(value, list):
        items = [_value_bytes(v) for v in value]
        return b"l" + b"".join(struct.pack(">Q", len(i)) + i for i in items)
    raise TypeError(f"cannot hash a record value of type {type(value).__name__}")


# ----------------------------------------------------------------------------- client side


def node_key(context: Context) -> Ed25519PrivateKey:
    """This node's signing key: the file its node config names, or one drawn and kept in
    ``context.state`` (the same key for the whole run)."""
    path = context.node_config.get(NODE_KEY)
    if path:
        return load_private_key(Path(str(path)))
    if STATE not in context.state:
        drawn = Ed25519PrivateKey.generate()
        context.state[STATE] = ConfigRecord({"private-key": drawn.private_bytes_raw()})
    return Ed25519PrivateKey.from_private_bytes(context.state[STATE]["private-key"])


def announcement(key: Ed25519PrivateKey, run_id: int, node_id: int) -> dict[str, bytes]:
    """Capability fields: the public key and a proof that this node holds its private key."""
    public = key.public_key().public_bytes_raw()
    proof = UpdateSigner(key, str(run_id), node_id).sign(ANNOUNCE_ROUND, _key_hash(public))
    return {"signing-key": public, "signing-nonce": proof.nonce,
            "signing-proof": proof.signature}


def sign_reply(content: RecordDict, key: Ed25519PrivateKey, run_id: int, node_id: int,
               server_round: int) -> None:
    """Add the ``signature`` envelope over every other record of ``content`` (in place)."""
    signed = UpdateSigner(key, str(run_id), node_id).sign(server_round, reply_hash(content))
    content[SIGNATURE] = ConfigRecord(dict(zip(_ENVELOPE, (
        signed.run_id, signed.server_round, signed.node_id, signed.nonce, signed.payload_hash,
        signed.signature), strict=True)))


# ----------------------------------------------------------------------------- server side


def verify_reply(verifier: UpdateVerifier, content: RecordDict, sender: int,
                 server_round: int) -> None:
    """Check a reply's envelope against its records before anything is decoded.

    Raises
    ------
    SignatureRejected
        With one of :data:`fedlora.privacy.secagg.signing.REASONS` (``MALFORMED`` also for a missing
        or ill-typed envelope).
    """
    record = content.config_records.get(SIGNATURE)
    if record is None or set(record) != set(_ENVELOPE):
        raise SignatureRejected("MALFORMED", f"node {sender} sent no {SIGNATURE!r} record with "
                                f"the fields {', '.join(_ENVELOPE)}; this run signs updates")
    envelope = SignedUpdate(*(record[field] for field in _ENVELOPE))
    verifier.verify(envelope, reply_hash(content), server_round, sender)


def node_keys(run_id: int, announced: Mapping[int, Mapping[str, Any]],
              registered: Collection[bytes] | None) -> tuple[dict[int, bytes], dict[int, str]]:
    """The public key to verify each node with, and why the others have none.

    Parameters
    ----------
    announced
        ``node id → capability record`` (:func:`announcement` fields).
    registered
        The registered public keys (:func:`registered_keys`), or ``None`` to trust each
        node's announced key on first use.
    """
    keys: dict[int, bytes] = {}
    problems: dict[int, str] = {}
    owner: dict[bytes, int] = {}
    for node, caps in sorted(announced.items()):
        try:
            public = _proven_key(run_id, node, caps)
        except SignatureRejected as exc:
            problems[node] = f"its key announcement is invalid: {exc}"
            continue
        if registered is not None and public not in registered:
            problems[node] = "it announced a key that is not among the registered signing keys"
        elif public in owner:
            problems[node] = f"it announced the key node {owner[public]} already holds"
        else:
            keys[node], owner[public] = public, node
    return keys, problems


def _proven_key(run_id: int, node: int, caps: Mapping[str, Any]) -> bytes:
    public, nonce, proof = (caps.get(k) for k in ("signing-key", "signing-nonce",
                                                  "signing-proof"))
    if not isinstance(public, bytes):
        raise SignatureRejected("MALFORMED", "the capability reply has no signing-key bytes")
    try:
        verifier = UpdateVerifier(str(run_id), {node: public})
    except ValueError:
        raise SignatureRejected("MALFORMED", f"signing-key has {len(public)} bytes, not a "
                                f"raw Ed25519 public key") from None
    claim = SignedUpdate(str(run_id), ANNOUNCE_ROUND, node, nonce, _key_hash(public), proof)
    verifier.verify(claim, claim.payload_hash, ANNOUNCE_ROUND, node)
    return public


def _key_hash(public: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_TAG + b"|announce|" + public)
    return digest.finalize()


# ----------------------------------------------------------------------------- secagg keys


KEYS_FIELDS = ("keys-nonce", "keys-signature")  # in a stage-0 advert
DIRECTORY_FIELDS = ("signing-keys", "keys-nonces", "keys-signatures")  # in a key directory


def _secagg_keys_hash(mask: bytes, encryption: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_TAG + b"|secagg-keys|")
    _put(digest, mask, encryption)
    return digest.finalize()


def sign_keys(key: Ed25519PrivateKey, run_id: int, node_id: int, server_round: int,
              mask: bytes, encryption: bytes) -> dict[str, bytes]:
    """Advert fields that bind this node's round keys to its Ed25519 key."""
    signed = UpdateSigner(key, str(run_id), node_id).sign(
        server_round, _secagg_keys_hash(mask, encryption))
    return dict(zip(KEYS_FIELDS, (signed.nonce, signed.signature), strict=True))


def check_keys(run_id: int, server_round: int, node_id: int, signing_key: bytes,
               mask: bytes, encryption: bytes, nonce: object, signature: object) -> None:
    """Raise :class:`SignatureRejected` unless ``signature`` is ``signing_key``'s over the
    node's round keys."""
    try:
        verifier = UpdateVerifier(str(run_id), {node_id: signing_key})
    except ValueError:
        raise SignatureRejected("MALFORMED", f"node {node_id}'s signing key is not a raw "
                                f"Ed25519 public key") from None
    claim = SignedUpdate(str(run_id), server_round, node_id, nonce,
                         _secagg_keys_hash(mask, encryption), signature)
    verifier.verify(claim, claim.payload_hash, server_round, node_id)


def verify_directory(run_id: int, server_round: int, own_node: int, own_key: bytes,
                     ids: list[int], masks: list[bytes], encryption: list[bytes],
                     signed: Mapping[str, Any], registered: Collection[bytes] | None) -> None:
    """A node's check of a key directory's Ed25519 signatures (see the module doc).

    Raises
    ------
    SignatureRejected
        A missing or bad signature (``BAD_SIGNATURE``, ``TAMPERED``, ``MALFORMED``), an
        Ed25519 key listed twice or for another node than this one's own (``WRONG_NODE``),
        or one that is not registered (``UNKNOWN_NODE``).
    """
    columns = [signed.get(field) for field in DIRECTORY_FIELDS]
    if not all(isinstance(c, list) and len(c) == len(ids) for c in columns):
        raise SignatureRejected("MALFORMED", f"the key directory lacks the signed-key columns "
                                f"{', '.join(DIRECTORY_FIELDS)} for its {len(ids)} node(s); "
                                "this run signs secure-aggregation keys")
    keys, nonces, signatures = columns
    if len(set(keys)) != len(keys):
        raise SignatureRejected("WRONG_NODE", "the key directory lists one Ed25519 key for "
                                "two nodes")
    for node, key, mask, enc, nonce, signature in zip(ids, keys, masks, encryption, nonces,
                                                      signatures, strict=True):
        if not isinstance(key, bytes):
            raise SignatureRejected("MALFORMED", f"node {node}'s signing key is not bytes")
        if node == own_node and key != own_key:
            raise SignatureRejected("WRONG_NODE", f"the key directory lists another Ed25519 "
                                    f"key for this node ({node})")
        if registered is not None and key not in registered:
            raise SignatureRejected("UNKNOWN_NODE", f"node {node}'s Ed25519 key is not among "
                                    "the registered signing keys")
        check_keys(run_id, server_round, node, key, mask, enc, nonce, signature)


def peer_registry(node_config: Mapping[str, Any], run_directory: str) -> dict[bytes, str] | None:
    """The registered signing keys a node can read, or ``None`` (trust on first use)."""
    directory = str(node_config.get("signing-keys") or run_directory or "")
    if not directory or not Path(directory).expanduser().is_dir():
        return None
    return registered_keys(directory)


# ----------------------------------------------------------------------------- key files


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key in OpenSSH or PEM format, without passphrase."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the signing key {path} (node config {NODE_KEY}): "
                          f"{exc.strerror}; create keys with `fedlora certs`") from None
    try:
        key = (serialization.load_ssh_private_key(data, None)
               if data.startswith(b"-----BEGIN OPENSSH") else
               serialization.load_pem_private_key(data, None))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not an unencrypted private key in OpenSSH or PEM "
                          f"format ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}; update signing needs an "
                          f"Ed25519 key (`fedlora certs` writes signing-<i>.key)")
    return key


def registered_keys(directory: str | Path) -> dict[bytes, str]:
    """The raw public keys of ``DIR/signing-*.pub`` (OpenSSH ``ssh-ed25519``) → file name.

    Raises
    ------
    ConfigError
        The directory does not exist or holds no such file, or a file is not an Ed25519
        public key.
    """
    folder = Path(directory).expanduser()
    files = sorted(folder.glob(PUBLIC_KEY_GLOB)) if folder.is_dir() else []
    if not files:
        raise ConfigError(f"signing-keys {str(directory)!r} holds no {PUBLIC_KEY_GLOB} file; "
                          f"point it at the directory `fedlora certs` wrote (on the server), "
                          f"or leave it empty to trust each node's key on first use")
    keys: dict[bytes, str] = {}
    for file in files:
        try:
            key = serialization.load_ssh_public_key(file.read_bytes())
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"{file} is not an OpenSSH public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{file} holds a {type(key).__name__}; signing keys are Ed25519")
        keys[key.public_bytes_raw()] = file.name
    return keys

