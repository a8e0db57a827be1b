"""Client side of a secure-aggregation round (Bonawitz et al. 2017 with SecAgg+ neighbourhoods).

One :class:`SecAggClient` per node and round; its methods are the four stages
and must be called in order::

    client = SecAggClient(node_id, config, server_round)
    advert = client.advertise_keys()                        # stage 0
    bundle = client.share_keys(directory)                   # stage 1
    masked = client.mask_input(relayed, vector, weight)     # stage 2
    reply = client.unmask(request)                          # stage 3

Masked input of client ``u`` with neighbours ``P(u)`` that completed stage 1::

    y_u = encode(w_u · x_u) + PRG(b_u) + Σ_{v ∈ P(u)} σ(u, v) · PRG(s_{u,v})   (mod 2^32)
    σ(u, v) = +1 if u < v else −1,   s_{u,v} = HKDF(X25519(s_u^SK, s_v^PK), round, u, v)

so pairwise masks cancel in the sum and only self-masks ``PRG(b_u)`` remain,
which the server removes with reconstructed ``b_u``.

Safety rules an honest client enforces (fail closed: after a violation it
refuses every further message of the round):

* messages must be for this round, this stage and this receiver;
* its own keys must appear unchanged in the directory;
* relayed shares come only from its neighbours. A ciphertext that does not authenticate
  (AES-GCM) or decode does *not* end the round for the receiver: one forging client would
  otherwise make every neighbour leave. The receiver still masks with that peer, keeps no
  share of it and reports it in ``no_shares_of``; the server then decides whether the
  peer's secrets can still be rebuilt (see :class:`~fedlora.privacy.secagg.SecAggServer`);
* every public key in the directory is a usable X25519 key (no point of small order);
* an unmask request must classify its share group exactly, with no peer
  both surviving and dropped — revealing both the self-mask share and the
  mask-key share of one peer would let the server unmask that peer's input;
* it reveals the pairwise seed ``s_{u,p}`` of a peer ``p`` only when ``p``'s shares were
  unreadable (stage 2) or ``p`` is listed as dropped (stage 3), and only while at least
  ``t − 1`` other peers keep seeds it never revealed (:func:`reveals_pair_seeds`), so its
  own input keeps ``t − 1`` pairwise masks the server cannot remove. For a dropped or
  forging ``p`` the seed tells the server no more than ``p``'s rebuilt mask key would (and
  a forging ``p`` knows it anyway); it lets the server remove ``p``'s masks even when too
  few holders can read ``p``'s shares;
* it unmasks at most once.

Out of scope: a server that lies *consistently* to different clients about
who dropped needs the signed consistency-check round of Bonawitz et al.'s
active-security variant, which is not implemented; the majority threshold
(``2t > k + 1``) only ensures two disjoint client sets never both reconstruct.

Between stages the whole state is plain data (:meth:`snapshot` /
:meth:`restore`), so a deployment that runs every message in a fresh process
can keep it in Flower's ``context.state``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np

from fedlora.errors import ConfigError
from fedlora.privacy.secagg.channel import open_share_pairs, seal_share_pairs
from fedlora.privacy.secagg.config import GroupParameters, SecAggConfig
from fedlora.privacy.secagg.encoding import FixedPointCodec
from fedlora.privacy.secagg.errors import ProtocolError, SecAggAborted
from fedlora.privacy.secagg.graph import neighbour_graph
from fedlora.privacy.secagg.ids import check_node_id, check_round
from fedlora.privacy.secagg.keys import (
    MASK_PURPOSE,
    PublicKeys,
    agree,
    check_public_key,
    commit,
    generate_private_key,
    load_private_key,
    private_bytes,
    public_bytes,
)
from fedlora.privacy.secagg.messages import (
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    RelayedShares,
    ShareBundle,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from fedlora.privacy.secagg.prg import SEED_BYTES, apply_mask
from fedlora.privacy.secagg.replies import reveals_pair_seeds
from fedlora.privacy.secagg.shamir import split_secret
from fedlora.privacy.secagg.snapshot import Snapshot, SnapshotReader

T = TypeVar("T")

_DONE = -1
_FAILED = -2


class SecAggClient:
    """One client's protocol state for one round.

    Parameters
    ----------
    node_id
        This client's node id, in ``[0, 2^64)``.
    config
        The settings shared with the server.
    server_round
        The round this instance serves; messages of other rounds are refused.
    """

    def __init__(self, node_id: int, config: SecAggConfig, server_round: int) -> None:
        self.node_id = check_node_id(node_id)
        self.config = config
        self.server_round = check_round(server_round)
        self._next: Stage | None = Stage.ADVERTISE_KEYS
        self._failed = False
        self._mask_key = b""  # raw X25519 private keys
        self._encryption_key = b""
        self._self_seed = b""  # b_u
        self._group: GroupParameters | None = None
        self._vector_size = 0
        self._neighbours: dict[int, PublicKeys] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner → (b share, s^SK share)
        self._peers: frozenset[int] = frozenset()
        self._unreadable: frozenset[int] = frozenset()  # peers whose shares did not decrypt
        self._revealed: frozenset[int] = frozenset()  # peers whose pairwise seed went out

    @property
    def stage(self) -> Stage | None:
        """The next stage this client will perform; ``None`` once finished or failed."""
        return self._next

    @property
    def failed(self) -> bool:
        """Whether the client refused a message and left the round."""
        return self._failed

    def advertise_keys(self) -> KeyAdvertisement:
        """Stage 0: draw this round's two X25519 key pairs and publish the public halves."""
        return self._run(Stage.ADVERTISE_KEYS, self.server_round, self._advertise_keys)

    def share_keys(self, directory: KeyDirectory) -> ShareBundle:
        """Stage 1: secret-share ``b_u`` and ``s_u^SK`` and encrypt one share pair per neighbour.

        Raises
        ------
        ProtocolError
            Wrong round or stage, or the directory misstates this client's keys.
        SecAggAborted
            Too few clients advertised keys to form a share group.
        """
        return self._run(
            Stage.SHARE_KEYS, directory.server_round, lambda: self._share_keys(directory)
        )

    def mask_input(self, relayed: RelayedShares, vector: np.ndarray, weight: float) -> MaskedInput:
        """Stage 2: store the neighbours' shares and upload the masked encoding.

        Parameters
        ----------
        relayed
            Ciphertexts from the neighbours that completed stage 1; exactly
            those neighbours are masked with.
        vector
            This client's float update, shape ``(vector_size,)``.
        weight
            Its weight in ``[0, config.max_weight]``, applied before encoding.

        A relayed ciphertext that does not authenticate or decode is not an error: the
        client masks with its sender all the same and lists it in ``no_shares_of``.

        Raises
        ------
        ProtocolError
            Wrong round, stage or receiver, or shares from a non-neighbour.
        SecAggAborted
            Fewer than ``threshold − 1`` neighbours are left.
        """
        self._check_receiver(relayed.receiver)
        return self._run(
            Stage.MASKED_INPUT,
            relayed.server_round,
            lambda: self._mask_input(relayed, vector, weight),
        )

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 3: reveal self-mask shares of survivors and mask-key shares of dropped peers.

        Only shares this client holds are revealed (none of a peer in ``no_shares_of``).
        With at least ``t − 1`` peers listed as survivors it also reveals, for every
        dropped peer ``p``, the pairwise seed ``s_{u,p}``, so that the server can remove the
        masks of a peer whose own shares were forged.

        Raises
        ------
        ProtocolError
            A peer listed both as survivor and dropped (``"DOUBLE_REVEAL"``), a
            request that does not match the share group, or a second request.
        """
        self._check_receiver(request.receiver)
        return self._run(Stage.UNMASK, request.server_round, lambda: self._unmask(request))

    # -- stages -----------------------------------------------------------------------------

    def _advertise_keys(self) -> KeyAdvertisement:
        self._mask_key = private_bytes(generate_private_key())
        self._encryption_key = private_bytes(generate_private_key())
        return KeyAdvertisement(self.server_round, self.node_id, self._public_keys())

    def _share_keys(self, directory: KeyDirectory) -> ShareBundle:
        keys = directory.public_keys
        if keys.get(self.node_id) != self._public_keys():
            raise ProtocolError(
                "KEY_MISMATCH",
                f"the key directory lists {keys.get(self.node_id)!r} for client {self.node_id}, "
                "not the keys it advertised; the server or the network altered them",
            )
        if isinstance(directory.vector_size, bool) or not isinstance(directory.vector_size, int):
            raise ProtocolError(
                "MALFORMED", f"vector_size must be an int, got {directory.vector_size!r}"
            )
        group = self._resolve(len(keys))
        neighbours = neighbour_graph(keys, group.neighbours, directory.graph_seed)[self.node_id]
        for peer in sorted(neighbours):
            try:
                check_public_key(keys[peer].mask)
                check_public_key(keys[peer].encryption)
            except (AttributeError, ValueError) as error:
                raise ProtocolError(
                    "BAD_PUBLIC_KEY",
                    f"the key directory lists an unusable key for neighbour {peer}: {error}; "
                    "the server must drop such a client at stage 0",
                ) from None
        self._self_seed = secrets.token_bytes(SEED_BYTES)
        holders = sorted(neighbours | {self.node_id})
        seed_shares = split_secret(self._self_seed, group.threshold, holders)
        key_shares = split_secret(self._mask_key, group.threshold, holders)
        ciphertexts = seal_share_pairs(
            load_private_key(self._encryption_key),
            {peer: keys[peer].encryption for peer in neighbours},
            {peer: seed_shares[peer] + key_shares[peer] for peer in neighbours},
            server_round=self.server_round,
            sender=self.node_id,
        )
        self._group = group
        self._vector_size = directory.vector_size
        self._neighbours = {peer: keys[peer] for peer in neighbours}
        self._held = {self.node_id: (seed_shares[self.node_id], key_shares[self.node_id])}
        commitment = commit(
            self._self_seed, self._public_keys(), server_round=self.server_round,
            node_id=self.node_id,
        )
        return ShareBundle(self.server_round, self.node_id, ciphertexts, commitment)

    def _mask_input(self, relayed: RelayedShares, vector: np.ndarray, weight: float) -> MaskedInput:
        group = self._require_group()
        senders = frozenset(relayed.ciphertexts)
        if strangers := sorted(senders - set(self._neighbours)):
            raise ProtocolError(
                "NOT_A_NEIGHBOUR",
                f"client {self.node_id} received shares from {strangers}, which are not among "
                f"its neighbours {sorted(self._neighbours)}",
            )
        if len(senders) + 1 < group.threshold:
            raise SecAggAborted(
                Stage.MASKED_INPUT.label,
                self.server_round,
                f"client {self.node_id} has {len(senders)} neighbour(s) left, its secrets need "
                f"{group.threshold} share holders including itself",
            )
        vector = np.asarray(vector)
        if vector.shape != (self._vector_size,):
            raise ValueError(
                f"the server expects a vector of shape ({self._vector_size},), got {vector.shape}; "
                "flatten the same arrays the server aggregates"
            )
        words = FixedPointCodec(
            self.config.clip_range, self.config.max_weight, group.num_clients
        ).encode(vector, weight)  # (d + 1,)
        self._unreadable = self._receive_shares(relayed.ciphertexts)
        apply_mask(words, self._self_seed, 1)
        mask_key = load_private_key(self._mask_key)
        for peer in sorted(senders):
            apply_mask(words, self._pair_seed(mask_key, peer), 1 if self.node_id < peer else -1)
        self._peers = senders
        early = {}
        if self._unreadable and len(senders - self._unreadable) >= group.threshold - 1:
            early = {peer: self._pair_seed(mask_key, peer) for peer in sorted(self._unreadable)}
        self._revealed = frozenset(early)
        # Stage 3 needs the held shares and the mask key (pairwise seeds of dropped peers);
        # the self-mask seed and the channel key are no longer kept.
        self._self_seed = self._encryption_key = b""
        return MaskedInput(self.server_round, self.node_id, words, self._unreadable, early)

    def _pair_seed(self, mask_key: object, peer: int) -> bytes:
        """``s_{u,p}``: the pairwise mask seed this client shares with ``peer``."""
        return agree(
            mask_key,  # type: ignore[arg-type]
            self._neighbours[peer].mask,
            purpose=MASK_PURPOSE,
            server_round=self.server_round,
            self_id=self.node_id,
            peer_id=peer,
        )

    def _receive_shares(self, ciphertexts: Mapping[int, bytes]) -> frozenset[int]:
        """Decrypt and keep each neighbour's shares; the peers whose shares are unusable."""
        held, unreadable = open_share_pairs(
            load_private_key(self._encryption_key),
            {peer: self._neighbours[peer].encryption for peer in ciphertexts},
            ciphertexts,
            server_round=self.server_round,
            receiver=self.node_id,
        )
        self._held.update(held)
        return unreadable

    def _unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        survivors, dropped = frozenset(request.survivors), frozenset(request.dropped)
        if both := sorted(survivors & dropped):
            raise ProtocolError(
                "DOUBLE_REVEAL",
                f"the server asked client {self.node_id} for both the self-mask share and the "
                f"mask-key share of client(s) {both}; together they would unmask those clients' "
                "individual inputs, so this client refuses and leaves the round",
            )
        if self.node_id not in survivors:
            raise ProtocolError(
                "NOT_A_SURVIVOR",
                f"client {self.node_id} sent its masked input but the request lists it as dropped",
            )
        group = self._peers | {self.node_id}
        if survivors | dropped != group:
            raise ProtocolError(
                "REQUEST_MISMATCH",
                f"the unmask request classifies {sorted(survivors | dropped)}, but client "
                f"{self.node_id} holds shares of exactly {sorted(group)}; each must be listed "
                "once, as survivor or dropped",
            )
        threshold = self._require_group().threshold
        pair_seeds = {}
        if reveals_pair_seeds(survivors, dropped, self.node_id, self._revealed, threshold):
            mask_key = load_private_key(self._mask_key)
            pair_seeds = {peer: self._pair_seed(mask_key, peer)
                          for peer in sorted(dropped - self._revealed)}
        response = UnmaskResponse(
            self.server_round,
            self.node_id,
            self_mask_shares={
                owner: self._held[owner][0] for owner in sorted(survivors) if owner in self._held
            },
            mask_key_shares={
                owner: self._held[owner][1] for owner in sorted(dropped) if owner in self._held
            },
            pair_seeds=pair_seeds,
        )
        self._held, self._mask_key = {}, b""
        return response

    # -- helpers ----------------------------------------------------------------------------

    def _run(self, stage: Stage, server_round: int, step: Callable[[], T]) -> T:
        """Gate a stage (round and order), run it, and fail closed if it raises."""
        if self._failed:
            raise ProtocolError(
                "ABORTED",
                f"client {self.node_id} already left round {self.server_round} after a protocol "
                "violation; start a new SecAggClient for the next round",
            )
        if server_round != self.server_round:
            raise ProtocolError(
                "WRONG_ROUND",
                f"client {self.node_id} serves round {self.server_round}, got a "
                f"{stage.label} message for round {server_round!r}",
            )
        if stage != self._next:
            expected = "nothing (the round is finished)" if self._next is None else self._next.label
            raise ProtocolError(
                "WRONG_STAGE",
                f"client {self.node_id} expects {expected}, got a {stage.label} message",
            )
        try:
            result = step()
        except Exception:
            self._fail()
            raise
        self._next = Stage(stage + 1) if stage < Stage.UNMASK else None
        return result

    def _check_receiver(self, receiver: int) -> None:
        if receiver != self.node_id:
            raise ProtocolError(
                "WRONG_RECEIVER",
                f"client {self.node_id} got a message addressed to client {receiver!r}",
            )

    def _fail(self) -> None:
        self._failed, self._next = True, None
        self._mask_key = self._encryption_key = self._self_seed = b""
        self._held = {}

    def _resolve(self, num_clients: int) -> GroupParameters:
        try:
            return self.config.resolve(num_clients)
        except ConfigError:
            raise
        except ValueError as error:
            raise SecAggAborted(Stage.SHARE_KEYS.label, self.server_round, str(error)) from None

    def _require_group(self) -> GroupParameters:
        if self._group is None:  # unreachable through _run; guards restored snapshots
            raise ProtocolError("WRONG_STAGE", "share_keys has not run for this client")
        return self._group

    def _public_keys(self) -> PublicKeys:
        return PublicKeys(
            mask=public_bytes(load_private_key(self._mask_key)),
            encryption=public_bytes(load_private_key(self._encryption_key)),
        )

    # -- persistence --------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The client's state as plain values (ints, bytes and lists of them).

        Contains private keys and shares: keep it on the client (e.g. Flower's
        ``context.state``), never send it anywhere.
        """
        group = self._group or GroupParameters(0, 0, 0)
        neighbours = sorted(self._neighbours)
        held = sorted(self._held)
        stage = _FAILED if self._failed else _DONE if self._next is None else int(self._next)
        return {
            "node_id": self.node_id,
            "server_round": self.server_round,
            "stage": stage,
            "mask_key": self._mask_key,
            "encryption_key": self._encryption_key,
            "self_seed": self._self_seed,
            "num_clients": group.num_clients,
            "neighbours": group.neighbours,
            "threshold": group.threshold,
            "vector_size": self._vector_size,
            "neighbour_ids": neighbours,
            "neighbour_mask_keys": [self._neighbours[v].mask for v in neighbours],
            "neighbour_encryption_keys": [self._neighbours[v].encryption for v in neighbours],
            "held_ids": held,
            "held_self_mask_shares": [self._held[v][0] for v in held],
            "held_mask_key_shares": [self._held[v][1] for v in held],
            "peer_ids": sorted(self._peers),
            "unreadable_ids": sorted(self._unreadable),
            "revealed_ids": sorted(self._revealed),
        }

    @classmethod
    def restore(cls, config: SecAggConfig, snapshot: Mapping[str, object]) -> SecAggClient:
        """Rebuild a client from :meth:`snapshot` (with the same ``config``).

        Raises
        ------
        ProtocolError
            ``"BAD_SNAPSHOT"`` when a field is missing or has the wrong type.
        """
        state = SnapshotReader(snapshot)
        client = cls(state.get_int("node_id"), config, state.get_int("server_round"))
        stage = state.get_int("stage")
        if stage not in (_DONE, _FAILED, *Stage):
            raise ProtocolError("BAD_SNAPSHOT", f"unknown stage {stage} in the snapshot")
        client._failed = stage == _FAILED
        client._next = None if stage in (_DONE, _FAILED) else Stage(stage)
        client._mask_key = state.get_bytes("mask_key")
        client._encryption_key = state.get_bytes("encryption_key")
        client._self_seed = state.get_bytes("self_seed")
        if num_clients := state.get_int("num_clients"):
            client._group = GroupParameters(
                num_clients, state.get_int("neighbours"), state.get_int("threshold")
            )
        client._vector_size = state.get_int("vector_size")
        client._neighbours = {
            peer: PublicKeys(mask=mask, encryption=encryption)
            for peer, mask, encryption in state.columns(
                "neighbour_ids", "neighbour_mask_keys", "neighbour_encryption_keys"
            )
        }
        client._held = {
            owner: (seed_share, key_share)
            for owner, seed_share, key_share in state.columns(
                "held_ids", "held_self_mask_shares", "held_mask_key_shares"
            )
        }
        client._peers = frozenset(state.get_ints("peer_ids"))
        client._unreadable = frozenset(state.get_ints("unreadable_ids"))
        client._revealed = frozenset(state.get_ints("revealed_ids"))
        return client
