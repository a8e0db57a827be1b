"""Secure aggregation on Flower's Message API: run config → settings, messages ⇄ records.

A secure training round is four message rounds of one strategy round (the protocol itself is
:mod:`fedlora.privacy.secagg`; this module only moves its messages in and out of Flower records)::

    stage  server → client (message type)      client → server
    0      train        arrays, config          "secagg": mask/encryption public keys,
                        with secagg-stage=train "metrics": num-examples, train-loss, ...
    1      query.secagg_share_keys              "secagg": one encrypted share pair per
           "secagg": key directory, graph seed  neighbour (receivers, ciphertexts), the
                                                commitment to the self-mask seed
    2      query.secagg_masked_input            "secagg": server-round, no-shares-of and
                                                their pairwise seeds,
           "secagg": ciphertexts addressed      "masked": ArrayRecord {"masked-input":
           to this client (senders)             uint32 (d + 1,)} — the masked encoding
    3      query.secagg_unmask                  "secagg": self-mask shares of survivors,
           "secagg": survivors, dropped peers   mask-key shares and pairwise seeds of
                                                dropped peers

In stage 0 the client trains as usual but keeps its factors in ``context.state``; in stage 2
it uploads ``encode(w·clip(x))`` masked, where ``x`` is the concatenation (sorted by name) of
the arrays a plain round would send and ``w`` its example count. Every record carries the
``server-round`` the sender believes in, so stale replies are rejected as ``WRONG_ROUND``.
Parsing never trusts a field: a missing or ill-typed one raises
:class:`~fedlora.errors.PayloadError` (``MALFORMED``).
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common import log

from fedlora.config import RunConfig
from fedlora.errors import ConfigError, PayloadError
from fedlora.federation.transport import NPY_STYPE, npy_layout
from fedlora.privacy.secagg import (
    COMPATIBLE,
    INCOMPATIBLE,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    PublicKeys,
    RelayedShares,
    SecAggConfig,
    ShareBundle,
    UnmaskRequest,
    UnmaskResponse,
    secagg_compatible,
)

_UINT32 = frozenset(("<u4",))  # the masked input's words, as np.save writes them
SECAGG = "secagg"  # the ConfigRecord of every secure-aggregation message
MASKED = "masked"  # the ArrayRecord of the stage-2 reply
MASKED_KEY = "masked-input"
STAGE_KEY = "secagg-stage"  # in a train message's config: "train" = stage 0
SHARE_KEYS = "query.secagg_share_keys"
MASKED_INPUT = "query.secagg_masked_input"
UNMASK = "query.secagg_unmask"


def secagg_config(cfg: RunConfig) -> SecAggConfig:
    """The protocol settings shared by the server and every client (0 = the default)."""
    fl = cfg.fl
    # with DP the mean is unweighted: every update is encoded with weight 1, which also makes
    # the fixed-point step secagg-max-weight times finer
    max_weight = 1.0 if fl.dp_mode != "off" else float(fl.secagg_max_weight)
    return SecAggConfig(threshold=fl.secagg_threshold or None,
                        neighbours=fl.secagg_neighbours or None,
                        clip_range=fl.secagg_clip_range, max_weight=max_weight,
                        gamma=fl.secagg_gamma, delta=fl.secagg_delta)


def check_secure_aggregation(cfg: RunConfig, num_clients: int | None = None) -> None:
    """Refuse, before anything is loaded, a run that cannot aggregate securely.

    Parameters
    ----------
    cfg
        The run configuration; nothing is checked when ``secure-aggregation`` is off.
    num_clients
        Simulated clients, when known: the threshold must fit the share groups they form.

    Raises
    ------
    ConfigError
        The strategy needs individual factors (flora, flexlora, fedex, robust), or the
        threshold/neighbour settings cannot work.
    """
    if not cfg.fl.secure_aggregation:
        return
    name = cfg.fl.strategy
    supported = ", ".join(sorted(COMPATIBLE))
    ok, why = secagg_compatible(name)
    if name in INCOMPATIBLE:
        why = (f"{name} cannot run with secure aggregation because {INCOMPATIBLE[name]}, and "
               f"the server only learns the sum")
    if not ok:
        raise ConfigError(f"secure-aggregation = true: {why}; use one of {supported}, or set "
                          f"secure-aggregation = false")
    settings = secagg_config(cfg)
    if num_clients is None:
        return
    sampled = cfg.fl.clients_per_round(num_clients)
    try:
        log(INFO, "fedlora: %s", settings.assess(sampled).describe())
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(
            f"secure-aggregation = true with {sampled} sampled client(s) per round: {exc}; "
            f"sample at least 2 clients per round and keep secagg-threshold within the share "
            f"group (secagg-threshold = 0 picks a majority)") from None


# ----------------------------------------------------------------------------- server → client


def directory_record(directory: KeyDirectory,
                     vouched: Mapping[int, tuple[bytes, bytes, bytes]] | None = None
                     ) -> ConfigRecord:
    """The key directory; with ``vouched`` (``node → (Ed25519 key, nonce, signature)``,
    ``sign-updates``) also each node's signature over its keys, for its neighbours to check."""
    ids = sorted(directory.public_keys)
    record = _record({
        "server-round": directory.server_round, "graph-seed": directory.graph_seed,
        "vector-size": directory.vector_size, "node-ids": ids,
        "mask-keys": [directory.public_keys[n].mask for n in ids],
        "encryption-keys": [directory.public_keys[n].encryption for n in ids]})
    if vouched is not None:
        for column, field in enumerate(("signing-keys", "keys-nonces", "keys-signatures")):
            record[field] = [vouched[n][column] for n in ids]
    return record


def read_directory(record: Any) -> KeyDirectory:
    """The :class:`KeyDirectory` of :func:`directory_record`; :class:`PayloadError`
    (``MALFORMED``) on a missing, mistyped or unequal-length field.
    """
    fields = _Fields(record, "key directory")
    ids = fields.get_ints("node-ids")
    masks, encryption = fields.get_bytes_list("mask-keys"), fields.get_bytes_list("encryption-keys")
    fields.same_length(ids, masks, encryption)
    return KeyDirectory(server_round=fields.get_int("server-round"),
                        graph_seed=fields.get_bytes("graph-seed"),
                        vector_size=fields.get_int("vector-size"),
                        public_keys={n: PublicKeys(mask=m, encryption=e)
                                     for n, m, e in zip(ids, masks, encryption, strict=True)})


def relayed_record(relayed: RelayedShares) -> ConfigRecord:
    """Stage 1 to one client: the ciphertexts its neighbours sent it, by sender."""
    senders = sorted(relayed.ciphertexts)
    return _record({"server-round": relayed.server_round, "receiver": relayed.receiver,
                         "senders": senders,
                         "ciphertexts": [relayed.ciphertexts[s] for s in senders]})


def read_relayed(record: Any) -> RelayedShares:
    """The :class:`RelayedShares` of :func:`relayed_record`; :class:`PayloadError` if malformed."""
    fields = _Fields(record, "relayed shares")
    senders, ciphertexts = fields.get_ints("senders"), fields.get_bytes_list("ciphertexts")
    fields.same_length(senders, ciphertexts)
    return RelayedShares(server_round=fields.get_int("server-round"),
                         receiver=fields.get_int("receiver"),
                         ciphertexts=dict(zip(senders, ciphertexts, strict=True)))


def unmask_request_record(request: UnmaskRequest) -> ConfigRecord:
    """Stage 2 to one client: which of its peers survived and which dropped."""
    return _record({"server-round": request.server_round, "receiver": request.receiver,
                         "survivors": sorted(request.survivors),
                         "dropped": sorted(request.dropped)})


def read_unmask_request(record: Any) -> UnmaskRequest:
    """The :class:`UnmaskRequest` of :func:`unmask_request_record`; :class:`PayloadError` if
    malformed.
    """
    fields = _Fields(record, "unmask request")
    return UnmaskRequest(server_round=fields.get_int("server-round"),
                         receiver=fields.get_int("receiver"),
                         survivors=frozenset(fields.get_ints("survivors")),
                         dropped=frozenset(fields.get_ints("dropped")))


# ----------------------------------------------------------------------------- client → server


def advert_record(advert: KeyAdvertisement) -> ConfigRecord:
    """A client's stage-0 reply: its two public keys for the round."""
    return _record({"server-round": advert.server_round, "mask-key": advert.keys.mask,
                         "encryption-key": advert.keys.encryption})


def read_advert(content: RecordDict, sender: int) -> KeyAdvertisement:
    """Stage-0 keys of ``sender`` (the node id Flower reports, never a claimed one)."""
    fields = _Fields(_secagg(content), "key advertisement")
    return KeyAdvertisement(server_round=fields.get_int("server-round"), sender=sender,
                            keys=PublicKeys(mask=fields.get_bytes("mask-key"),
                                            encryption=fields.get_bytes("encryption-key")))


def bundle_record(bundle: ShareBundle) -> ConfigRecord:
    """A client's stage-1 reply: one ciphertext per neighbour and its self-mask commitment."""
    receivers = sorted(bundle.ciphertexts)
    return _record({"server-round": bundle.server_round, "receivers": receivers,
                         "ciphertexts": [bundle.ciphertexts[r] for r in receivers],
                         "commitment": bundle.commitment})


def read_bundle(content: RecordDict, sender: int) -> ShareBundle:
    """The :class:`ShareBundle` of ``sender`` (Flower's node id) from its stage-1 reply;
    :class:`PayloadError` if malformed.
    """
    fields = _Fields(_secagg(content), "share bundle")
    receivers, ciphertexts = fields.get_ints("receivers"), fields.get_bytes_list("ciphertexts")
    fields.same_length(receivers, ciphertexts)
    return ShareBundle(server_round=fields.get_int("server-round"), sender=sender,
                       ciphertexts=dict(zip(receivers, ciphertexts, strict=True)),
                       commitment=fields.get_bytes("commitment"))


def _record(fields: dict[str, Any]) -> ConfigRecord:
    """A ConfigRecord without its empty lists: Flower's ``count_bytes`` (which its message-size
    mods and our byte accounting call) fails on an empty list; a list key that is absent reads
    as empty (``_Fields.get_ints`` / ``get_bytes_list``)."""
    return ConfigRecord({k: v for k, v in fields.items() if not (isinstance(v, list) and not v)})


def masked_content(masked: MaskedInput) -> RecordDict:
    """A client's stage-2 reply: the masked uint32 words as an array, and in the config record
    its complaints (``no-shares-of``) and the pairwise seeds it reveals early.
    """
    seeds = sorted(masked.pair_seeds)
    return RecordDict({SECAGG: _record({"server-round": masked.server_round,
                                             "no-shares-of": sorted(masked.no_shares_of),
                                             "pair-seed-owners": seeds,
                                             "pair-seeds": [masked.pair_seeds[n]
                                                            for n in seeds]}),
                       MASKED: ArrayRecord({MASKED_KEY: Array(masked.masked)})})


def read_masked(content: RecordDict, sender: int, vector_size: int) -> MaskedInput:
    """The masked encoding, its declared dtype and size checked before any byte is decoded."""
    fields = _Fields(_secagg(content), "masked input")
    record = content.array_records.get(MASKED)
    if record is None or set(record) != {MASKED_KEY}:
        raise PayloadError("MALFORMED", f"a masked-input reply carries one ArrayRecord "
                           f"{MASKED!r} holding {MASKED_KEY!r} only")
    array = record[MASKED_KEY]
    expected = (vector_size + 1,)
    if array.dtype != "uint32" or tuple(array.shape) != expected:
        raise PayloadError("MALFORMED", f"the masked input must be uint32 of shape {expected}; "
                           f"got {array.dtype} {tuple(array.shape)}")
    if not isinstance(array.data, bytes) or len(array.data) > 4 * (vector_size + 1) + 1024:
        raise PayloadError("PAYLOAD_TOO_LARGE", f"{len(array.data)} bytes for a masked input "
                           f"of {vector_size + 1} uint32 words")
    # the header is parsed and checked against the bytes there, never allocated from
    offset, dims, _, _ = npy_layout("the masked input", array.data, _UINT32)
    if dims != expected or array.stype != NPY_STYPE:
        raise PayloadError("MALFORMED", f"the masked input decodes to {dims}, not the "
                           f"declared uint32 {expected}")
    words = np.frombuffer(array.data, dtype=np.uint32, count=expected[0], offset=offset)
    seed_owners, seeds = fields.get_ints("pair-seed-owners"), fields.get_bytes_list("pair-seeds")
    fields.same_length(seed_owners, seeds)
    return MaskedInput(server_round=fields.get_int("server-round"), sender=sender,
                       masked=words.copy(),
                       no_shares_of=frozenset(fields.get_ints("no-shares-of")),
                       pair_seeds=dict(zip(seed_owners, seeds, strict=True)))


def unmask_record(response: UnmaskResponse) -> ConfigRecord:
    """A client's stage-3 reply: self-mask shares of survivors, mask-key shares of dropped
    peers and pairwise seeds, each list keyed by owner.
    """
    survivors, dropped = sorted(response.self_mask_shares), sorted(response.mask_key_shares)
    return _record({
        "server-round": response.server_round,
        "self-mask-owners": survivors,
        "self-mask-shares": [response.self_mask_shares[n] for n in survivors],
        "mask-key-owners": dropped,
        "mask-key-shares": [response.mask_key_shares[n] for n in dropped],
        "pair-seed-owners": sorted(response.pair_seeds),
        "pair-seeds": [response.pair_seeds[n] for n in sorted(response.pair_seeds)]})


def read_unmask(content: RecordDict, sender: int) -> UnmaskResponse:
    """The :class:`UnmaskResponse` of ``sender`` from its stage-3 reply; :class:`PayloadError`
    if malformed.
    """
    fields = _Fields(_secagg(content), "unmask response")
    owners = fields.get_ints("self-mask-owners")
    shares = fields.get_bytes_list("self-mask-shares")
    dropped = fields.get_ints("mask-key-owners")
    key_shares = fields.get_bytes_list("mask-key-shares")
    seed_owners, seeds = fields.get_ints("pair-seed-owners"), fields.get_bytes_list("pair-seeds")
    fields.same_length(owners, shares)
    fields.same_length(dropped, key_shares)
    fields.same_length(seed_owners, seeds)
    return UnmaskResponse(server_round=fields.get_int("server-round"), sender=sender,
                          self_mask_shares=dict(zip(owners, shares, strict=True)),
                          mask_key_shares=dict(zip(dropped, key_shares, strict=True)),
                          pair_seeds=dict(zip(seed_owners, seeds, strict=True)))


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the secure-aggregation records of a message (metrics and arrays excluded).

    Counted like ``ConfigRecord.count_bytes`` (8 per number, the length of bytes), which
    itself fails on empty lists (flwr 1.41).
    """
    size = 0
    if isinstance(record := content.config_records.get(SECAGG), ConfigRecord):
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                size += len(item) if isinstance(item, bytes | str) else 8
    if isinstance(masked := content.array_records.get(MASKED), ArrayRecord):
        size += masked.count_bytes()
    return size


# ----------------------------------------------------------------------------- parsing


def _secagg(content: RecordDict) -> ConfigRecord:
    record = content.config_records.get(SECAGG)
    if record is None:
        raise PayloadError("MALFORMED", f"the reply lacks the {SECAGG!r} ConfigRecord")
    return record


class _Fields:
    """Typed access to a record's fields; anything unexpected is ``MALFORMED``."""

    def __init__(self, record: Any, what: str) -> None:
        if not isinstance(record, Mapping):
            raise PayloadError("MALFORMED", f"the {what} is not a record")
        self.record, self.what = record, what

    def _get(self, key: str) -> Any:
        if key not in self.record:
            raise PayloadError("MALFORMED", f"the {self.what} lacks {key!r}")
        return self.record[key]

    def _bad(self, key: str, kind: str) -> PayloadError:
        return PayloadError("MALFORMED", f"{key!r} of the {self.what} must be {kind}, got "
                            f"{type(self.record[key]).__name__}")

    def get_int(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an int")
        return value

    def get_bytes(self, key: str) -> bytes:
        value = self._get(key)
        if not isinstance(value, bytes):
            raise self._bad(key, "bytes")
        return value

    def get_ints(self, key: str) -> list[int]:
        value = self.record.get(key, [])  # an empty list is left out (see _record)
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self._bad(key, "a list of ints")
        if len(set(value)) != len(value):
            raise PayloadError("MALFORMED", f"{key!r} of the {self.what} repeats a node id")
        return value

    def get_bytes_list(self, key: str) -> list[bytes]:
        value = self.record.get(key, [])  # an empty list is left out (see _record)
        if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
            raise self._bad(key, "a list of bytes")
        return value

    def same_length(self, *columns: list) -> None:
        if len({len(c) for c in columns}) > 1:
            raise PayloadError("MALFORMED", f"the {self.what} has columns of different "
                               f"lengths {[len(c) for c in columns]}")
