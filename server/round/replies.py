"""Stage "receive": the per-reply boundary of a round.

Every reply goes through :func:`take_reply` (client error, unknown or duplicate sender, the
signature, then the decoder) inside :func:`receive`. Whatever handling one reply raises becomes
a rejection with a reason code — its own (``UpdateRejected``, ``PayloadError``,
``SignatureRejected``), else ``MALFORMED`` — and is logged; it never aborts the round, and
nothing of that reply is kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common import log

from fedlora.aggregation import ClientUpdate, UpdateRejected
from fedlora.errors import PayloadError
from fedlora.federation.transport import nbytes
from fedlora.privacy.secagg.signing import SignatureRejected
from server.nodes import NodeInfo
from server.round.messages import Outgoing


@dataclass(frozen=True)
class Accepted:
    """A validated reply, ready to be aggregated.

    ``record`` is the reply's ``arrays`` record when ``update`` and ``heads`` are exactly its
    values, and ``None`` once the server changed them (clipping, central DP noise).
    """

    node: NodeInfo
    update: ClientUpdate
    heads: dict[str, np.ndarray]
    metrics: dict[str, Any]
    record: ArrayRecord | None


@dataclass
class Received:
    """What the per-reply boundary made of a round's replies."""

    accepted: list[Accepted] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    bytes_up: int = 0

    def reject(self, reason: str, server_round: int, reply: Message,
               by_id: Mapping[int, NodeInfo], why: object) -> None:
        """Count one rejected reply under ``reason`` and log why (the run goes on)."""
        self.rejected[reason] += 1
        node = by_id.get(reply.metadata.src_node_id)
        who = (f"partition {node.partition_id}" if node is not None
               else f"node {reply.metadata.src_node_id}")
        log(WARNING, "Round %d: rejected the update of %s (%s): %s", server_round, who, reason,
            why)


@dataclass(frozen=True)
class ReplyStages:
    """What :func:`receive` does with one reply, in order.

    Parameters
    ----------
    answered
        Called with the node of a reply that is no client error (it finished its round).
    verify
        ``(content, node_id)``: checks the signature before anything is decoded, or raises
        :class:`~fedlora.privacy.secagg.signing.SignatureRejected`.
    decode
        ``(reply, node, sent)``: validates and decodes the reply, or raises with a reason.
    """

    answered: Callable[[NodeInfo], None]
    verify: Callable[[RecordDict, int], None]
    decode: Callable[[Message, NodeInfo, Mapping[str, np.ndarray]], Accepted]


def receive(replies: list[Message], out: Outgoing, sampled: list[NodeInfo],
            stages: ReplyStages, server_round: int) -> Received:
    """Every reply through :func:`take_reply`, the per-reply boundary (see the module).

    Returns the accepted updates in partition order (reproducible sums), the rejections by
    reason (``NO_REPLY`` for each sampled node nobody answered for), and the bytes uploaded.
    """
    by_id = {n.node_id: n for n in sampled}
    received = Received()
    # the SuperLink's own "node unavailable" replies carry its id as sender: replies are
    # matched to the node that was asked through the message they answer
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in out.messages
             if m.metadata.message_id}
    answered: set[int] = set()
    for reply in replies:
        try:
            answered.add(asked.get(reply.metadata.reply_to_message_id,
                                   reply.metadata.src_node_id))
            item = take_reply(reply, by_id, out, received, stages, server_round)
        except (UpdateRejected, PayloadError, SignatureRejected) as exc:
            received.reject(exc.reason, server_round, reply, by_id, exc)
        except Exception as exc:  # noqa: BLE001 — the boundary: one reply, never the run
            received.reject("MALFORMED", server_round, reply, by_id,
                            f"{type(exc).__name__}: {str(exc)[:300]}")
        else:
            if item is not None:
                received.accepted.append(item)
    received.rejected["NO_REPLY"] += len(set(by_id) - answered)
    received.accepted.sort(key=lambda item: item.node.partition_id)  # reproducible sums
    return received


def take_reply(reply: Message, by_id: Mapping[int, NodeInfo], out: Outgoing,
               received: Received, stages: ReplyStages, server_round: int) -> Accepted | None:
    """One reply: a client error, an unknown or duplicate sender, its signature, then the
    decoder. Returns the validated update, or ``None`` when the reply was counted as
    rejected here; raises (with a reason) when it is rejected."""
    if reply.has_error():
        received.rejected["CLIENT_ERROR"] += 1
        received.errors.append(last_line(str(reply.error.reason)))
        log(WARNING, "Round %d: node %s failed: %s", server_round,
            reply.metadata.src_node_id, str(reply.error.reason)[:2000])
        return None
    arrays = reply.content.get("arrays")
    received.bytes_up += nbytes(arrays) if isinstance(arrays, ArrayRecord) else 0
    node = by_id.get(reply.metadata.src_node_id)
    if node is None:
        received.rejected["DUPLICATE_OR_UNKNOWN"] += 1
        return None
    stages.answered(node)
    # first, so that replayed and duplicate signed replies get their own codes
    stages.verify(reply.content, node.node_id)
    if node.node_id in received.seen:
        received.rejected["DUPLICATE_OR_UNKNOWN"] += 1
        return None
    received.seen.add(node.node_id)
    return stages.decode(reply, node, out.sent[node.node_id])


def last_line(reason: str) -> str:
    """The exception line of a client's error reason (Flower sends the whole traceback)."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    hits = [line for line in lines if "Error: " in line or "Exception: " in line]
    return (hits[-1] if hits else lines[-1] if lines else "")[:500]
