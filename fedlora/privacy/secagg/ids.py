"""Validation of the integers that identify clients and rounds on the wire."""

from __future__ import annotations

from collections.abc import Iterable

MAX_UINT64 = 2**64 - 1


def check_node_id(node_id: object, what: str = "node id") -> int:
    """Return ``node_id`` if it is an int in ``[0, 2**64)`` (Flower node ids), else raise."""
    if isinstance(node_id, bool) or not isinstance(node_id, int) or not 0 <= node_id <= MAX_UINT64:
        raise ValueError(
            f"{what} must be an int in [0, 2**64) like Flower's node ids, got {node_id!r}"
        )
    return node_id


def check_round(server_round: object) -> int:
    """Return ``server_round`` if it is an int in ``[0, 2**64)``, else raise."""
    if (
        isinstance(server_round, bool)
        or not isinstance(server_round, int)
        or not 0 <= server_round <= MAX_UINT64
    ):
        raise ValueError(f"server_round must be an int in [0, 2**64), got {server_round!r}")
    return server_round


def check_participants(participants: Iterable[object]) -> frozenset[int]:
    """The distinct node ids of ``participants`` (each checked by :func:`check_node_id`);
    raise ``ValueError`` naming any repeated id."""
    ids = [check_node_id(node, "participant id") for node in participants]
    if len(set(ids)) != len(ids):
        repeated = sorted({node for node in ids if ids.count(node) > 1})
        raise ValueError(f"participant ids must be distinct, got duplicates {repeated}")
    return frozenset(ids)
