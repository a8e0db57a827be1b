"""What the server accepts from the clients at each stage, as pure functions.

:func:`sort_replies` keeps one well-formed reply per expected sender and turns every other
into a :class:`Rejection`; the ``check_*`` functions are the per-stage checks it applies
(``None`` for a valid reply, else a detail string, reason ``MALFORMED``, or a
``(reason, detail)`` pair). :func:`reveals_pair_seeds` is the rule both sides apply to
decide whether a stage-3 reply carries pairwise seeds (the client to send them, the server
to expect them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from fedlora.privacy.secagg.channel import NONCE_BYTES, TAG_BYTES
from fedlora.privacy.secagg.keys import KEY_BYTES, check_public_key
from fedlora.privacy.secagg.messages import (
    KeyAdvertisement,
    MaskedInput,
    ShareBundle,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from fedlora.privacy.secagg.prg import SEED_BYTES
from fedlora.privacy.secagg.shamir import SHARE_BYTES

M = TypeVar("M")
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES
COMMITMENT_BYTES = 32

Problem = str | tuple[str, str] | None


@dataclass(frozen=True)
class Rejection:
    """A reply the server discarded.

    ``reason`` is one of ``WRONG_ROUND``, ``UNEXPECTED_SENDER``, ``DUPLICATE``,
    ``DUPLICATE_KEY``, ``MALFORMED``, ``BAD_PUBLIC_KEY`` (a point of small order),
    ``TOO_FEW_NEIGHBOURS`` (pruned after stage 1 because its share group fell below
    the threshold), ``UNRECOVERABLE_SHARES`` (input left out at stage 2: too few holders
    could read its shares) or ``BAD_SHARE`` (a stage-3 share off the verified polynomial;
    the holder's own input stays in the sum, which no longer depends on the share).
    """

    stage: Stage
    node: Any
    reason: str
    detail: str


def reveals_pair_seeds(survivors: frozenset[int], dropped: frozenset[int], node: int,
                       revealed: frozenset[int], threshold: int) -> bool:
    """Whether client ``node`` sends pairwise seeds of its dropped peers at stage 3.

    Only if some dropped peer's seed is still unrevealed and at least ``t − 1`` peers
    listed as survivors have a seed it never revealed (at stage 2, ``revealed``): its own
    input then keeps ``t − 1`` pairwise masks that no reply of its own can remove. The
    server applies the same rule to know which seeds to expect.
    """
    return bool(dropped - revealed) and len(survivors - {node} - revealed) >= threshold - 1


def sort_replies(stage: Stage, messages: Iterable[Any], kind: type[M], server_round: int,
                 expected: frozenset[int], check: Callable[[M], Problem]
                 ) -> tuple[dict[int, M], list[Rejection]]:
    """The valid replies of one stage by sender, and a :class:`Rejection` for every other one.

    A reply is rejected when it is not a ``kind``, is for another round than
    ``server_round``, comes from a sender not in ``expected``, is one of several from its
    sender (all of them are), or fails ``check``.
    """
    rejections: list[Rejection] = []
    by_sender: dict[int, list[M]] = {}
    for message in messages:
        sender = getattr(message, "sender", None)
        if not isinstance(message, kind):
            rejections.append(Rejection(stage, sender, "MALFORMED", f"expected a {kind.__name__}"))
        elif message.server_round != server_round:  # type: ignore[attr-defined]
            rejections.append(Rejection(
                stage,
                sender,
                "WRONG_ROUND",
                f"reply for round {message.server_round!r}, "  # type: ignore[attr-defined]
                f"this is round {server_round}",
            ))
        elif isinstance(sender, bool) or not isinstance(sender, int) or sender not in expected:
            rejections.append(
                Rejection(stage, sender, "UNEXPECTED_SENDER", "not a client of this stage"))
        else:
            by_sender.setdefault(sender, []).append(message)
    accepted: dict[int, M] = {}
    for sender, replies in by_sender.items():
        if len(replies) > 1:
            rejections.append(Rejection(
                stage, sender, "DUPLICATE", f"{len(replies)} replies; all are discarded"))
        elif problem := check(replies[0]):
            reason, detail = problem if isinstance(problem, tuple) else ("MALFORMED", problem)
            rejections.append(Rejection(stage, sender, reason, detail))
        else:
            accepted[sender] = replies[0]
    return accepted, rejections


def check_advert(advert: KeyAdvertisement) -> Problem:
    """Stage 0: two raw X25519 public keys, neither of small order (``BAD_PUBLIC_KEY``)."""
    try:
        keys = (advert.keys.mask, advert.keys.encryption)
    except AttributeError:
        return "expected a PublicKeys pair"
    for key in keys:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            return f"invalid public keys: an X25519 public key is {KEY_BYTES} raw bytes"
        try:
            check_public_key(key)
        except ValueError as error:
            return "BAD_PUBLIC_KEY", str(error)
    return None


def repeated_keys(adverts: Mapping[int, KeyAdvertisement]) -> frozenset[int]:
    """Stage 0, across replies: the senders whose public key (either) also appears in another
    sender's advert (copied or replayed); all of them are rejected."""
    owners: dict[bytes, set[int]] = {}
    for node, advert in adverts.items():
        for key in (advert.keys.mask, advert.keys.encryption):
            owners.setdefault(key, set()).add(node)
    return frozenset(node for holders in owners.values() if len(holders) > 1 for node in holders)


def check_bundle(bundle: ShareBundle, neighbours: frozenset[int]) -> Problem:
    """Stage 1: one ciphertext of :data:`CIPHERTEXT_BYTES` per neighbour of the sender, and a
    :data:`COMMITMENT_BYTES` commitment to its self-mask seed."""
    targets = set(bundle.ciphertexts)
    if targets != neighbours:
        return f"shares addressed to {sorted(targets)}, neighbours are {sorted(neighbours)}"
    sizes = {len(c) if isinstance(c, bytes) else -1 for c in bundle.ciphertexts.values()}
    if sizes - {CIPHERTEXT_BYTES}:
        return f"ciphertexts must be {CIPHERTEXT_BYTES} bytes, got sizes {sorted(sizes)}"
    commitment = getattr(bundle, "commitment", None)
    if not isinstance(commitment, bytes) or len(commitment) != COMMITMENT_BYTES:
        return f"the commitment to the self-mask seed must be {COMMITMENT_BYTES} bytes"
    return None


def check_masked(reply: MaskedInput, vector_size: int, peers: frozenset[int],
                 threshold: int) -> Problem:
    """Stage 2: a uint32 array of shape ``(vector_size + 1,)``, complaints (``no_shares_of``)
    only about ``peers`` (those the sender masked with), and pairwise seeds for exactly those
    peers when ``threshold − 1`` others are readable."""
    masked = reply.masked
    expected = (vector_size + 1,)
    if (
        not isinstance(masked, np.ndarray)
        or masked.dtype != np.uint32
        or masked.shape != expected
    ):
        return (
            f"expected a uint32 array of shape {expected}, got "
            f"{getattr(masked, 'dtype', type(masked).__name__)} "
            f"{getattr(masked, 'shape', '')}"
        )
    complaints = reply.no_shares_of
    if not isinstance(complaints, frozenset) or not complaints <= peers:
        return (
            f"no_shares_of must name peers the sender masked with "
            f"({sorted(peers)}), got {complaints!r:.80}"
        )
    early = complaints and len(peers - complaints) >= threshold - 1
    if set(reply.pair_seeds) != (complaints if early else set()) or any(
            not isinstance(seed, bytes) or len(seed) != SEED_BYTES
            for seed in reply.pair_seeds.values()):
        return "pairwise seeds must be given, 32 bytes each, for exactly the peers in " \
               "no_shares_of (when t − 1 others are readable)"
    return None


def check_unmask(reply: UnmaskResponse, request: UnmaskRequest, unreadable: frozenset[int],
                 revealed: frozenset[int], threshold: int) -> Problem:
    """Stage 3: the shares ``request`` asks for, less those of peers whose shares the sender
    could not read (``unreadable``), and the pairwise seeds :func:`reveals_pair_seeds` implies
    (``revealed``: the seeds it sent at stage 2)."""
    if set(reply.self_mask_shares) != request.survivors - unreadable:
        return "self-mask shares do not match the survivors in the request"
    if set(reply.mask_key_shares) != request.dropped - unreadable:
        return "mask-key shares do not match the dropped peers in the request"
    reveals = reveals_pair_seeds(request.survivors, request.dropped, reply.sender,
                                 revealed, threshold)
    if set(reply.pair_seeds) != (request.dropped - revealed if reveals else set()):
        return "pairwise seeds do not match the dropped peers in the request"
    shares = [*reply.self_mask_shares.values(), *reply.mask_key_shares.values()]
    if any(not isinstance(s, bytes) or len(s) != SHARE_BYTES for s in shares):
        return f"shares must be {SHARE_BYTES} bytes each"
    if any(not isinstance(s, bytes) or len(s) != SEED_BYTES
           for s in reply.pair_seeds.values()):
        return f"pairwise seeds must be {SEED_BYTES} bytes each"
    return None
