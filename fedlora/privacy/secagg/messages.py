"""The messages of one secure-aggregation round, as plain frozen dataclasses.

Stages (Bonawitz et al. 2017, Fig. 4; SecAgg+ neighbourhoods, Bell et al. 2020)::

    0 ADVERTISE_KEYS  client → server  KeyAdvertisement   (two X25519 public keys)
                      server → all     KeyDirectory       (keys of every advertiser, graph seed)
    1 SHARE_KEYS      client → server  ShareBundle        (encrypted shares, one per neighbour,
                                                           commitment to b_u and its keys)
                      server → client  RelayedShares      (the ciphertexts addressed to it)
    2 MASKED_INPUT    client → server  MaskedInput        (uint32 masked encoding, the peers
                                                           whose shares did not decrypt)
                      server → client  UnmaskRequest      (which peers survived, which dropped)
    3 UNMASK          client → server  UnmaskResponse     (self-mask shares of survivors,
                                                           mask-key shares and pairwise seeds
                                                           of dropped peers)

Fields are ints, bytes, numpy arrays and dicts keyed by integer node ids, so
a transport can map them onto Flower records without this package knowing
about Flower. Every message carries ``server_round``; senders and receivers are
node ids in ``[0, 2^64)``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedlora.privacy.secagg.keys import PublicKeys


class Stage(enum.IntEnum):
    """The four client-facing stages of a round, in order."""

    ADVERTISE_KEYS = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    UNMASK = 3

    @property
    def label(self) -> str:
        """Kebab-case name used in messages and logs, e.g. ``"masked-input"``."""
        return self.name.lower().replace("_", "-")


@dataclass(frozen=True)
class KeyAdvertisement:
    """Stage 0 reply: the client's public keys for this round."""

    server_round: int
    sender: int
    keys: PublicKeys


@dataclass(frozen=True)
class KeyDirectory:
    """Stage 0 broadcast: everything a client needs to find and reach its neighbours.

    Parameters
    ----------
    server_round
        The round.
    graph_seed
        Public seed of the neighbour graph (see :mod:`fedlora.privacy.secagg.graph`).
    vector_size
        Float coordinates every client must upload (``d``; the normaliser
        coordinate comes on top).
    public_keys
        ``node id → PublicKeys`` of every client that advertised valid keys;
        its size is the ``n`` of the fixed-point encoding.
    """

    server_round: int
    graph_seed: bytes
    vector_size: int
    public_keys: Mapping[int, PublicKeys]


@dataclass(frozen=True)
class ShareBundle:
    """Stage 1 reply: ``receiver → ciphertext`` of the sender's shares, one per neighbour.

    ``commitment`` is :func:`fedlora.privacy.secagg.keys.commit` of the sender's self-mask seed
    ``b_u`` and its two public keys: the server checks every rebuilt seed against it, so a
    holder that alters its share cannot make the server remove a wrong mask silently.
    """

    server_round: int
    sender: int
    ciphertexts: Mapping[int, bytes]
    commitment: bytes = b""


@dataclass(frozen=True)
class RelayedShares:
    """Stage 1 relay: ``sender → ciphertext`` of the shares addressed to ``receiver``.

    The senders are exactly the neighbours the receiver must mask with.
    """

    server_round: int
    receiver: int
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True)
class MaskedInput:
    """Stage 2 reply: the masked encoding, ``uint32`` of shape ``(d + 1,)``.

    ``no_shares_of``: neighbours whose relayed shares did not authenticate or decode. The
    sender still masked with them, but holds none of their shares. ``pair_seeds``: the
    pairwise seeds ``s_{u,p}`` of those neighbours (when the sender keeps ``t − 1`` readable
    ones), so the server can remove those masks if ``p`` must be left out.
    """

    server_round: int
    sender: int
    masked: np.ndarray
    no_shares_of: frozenset[int] = frozenset()
    pair_seeds: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 2 broadcast: the fate of the receiver's peers (and itself).

    ``survivors`` (including the receiver) sent a masked input: reveal their
    self-mask shares. ``dropped`` did not: reveal their mask-key shares. The
    two sets are disjoint and together are the receiver's share group.
    """

    server_round: int
    receiver: int
    survivors: frozenset[int]
    dropped: frozenset[int]


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 3 reply: ``owner → share`` of self-mask seeds and of mask private keys.

    ``pair_seeds``: ``dropped peer → s_{u,p}``, the pairwise mask seed the sender shares
    with each peer listed as dropped (see :meth:`SecAggClient.unmask` for when it is sent).
    """

    server_round: int
    sender: int
    self_mask_shares: Mapping[int, bytes]
    mask_key_shares: Mapping[int, bytes]
    pair_seeds: Mapping[int, bytes] = field(default_factory=dict)
