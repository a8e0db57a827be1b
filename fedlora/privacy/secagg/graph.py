"""Sparse neighbour graphs for SecAgg+ (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead").

Full SecAgg (Bonawitz et al. 2017) makes every pair of clients agree on a mask:
O(n) key agreements, mask expansions and secret shares per client. SecAgg+
replaces the complete graph with a random k-regular graph, k = O(log n): each
client masks with, and secret-shares to, its k neighbours only.

The graph is a Harary-style circulant graph on a random relabelling of the
clients, which every party derives from the same public seed: sort the ids by
``SHA-256(seed ‖ id)``, place them on a ring, and connect each client to the
``k // 2`` nearest clients on either side, plus the diametrically opposite one
when ``k`` is odd. ``k = n − 1`` gives the complete graph (classic SecAgg).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from cryptography.hazmat.primitives import hashes

from fedlora.privacy.secagg.ids import check_node_id


def default_degree(num_clients: int) -> int:
    """SecAgg+ neighbourhood size when none is configured: ``⌈3·log₂ n⌉``, at most ``n − 1``.

    A heuristic in the O(log n) regime of Bell et al. with no stated guarantee;
    :class:`~fedlora.privacy.secagg.SecAggConfig` no longer uses it (it derives ``k`` from the
    collusion and dropout fractions, :mod:`fedlora.privacy.secagg.params`).
    """
    if num_clients < 2:
        return 0
    return min(num_clients - 1, max(2, math.ceil(3 * math.log2(num_clients))))


def resolve_degree(num_clients: int, requested: int | None) -> int:
    """Number of neighbours each client actually gets among ``num_clients``.

    ``requested`` (``None`` → :func:`default_degree`) is capped at ``n − 1``; an
    odd degree with an odd ``n`` is raised by one, because no k-regular graph
    exists when both are odd.
    """
    if num_clients < 2:
        return 0
    degree = default_degree(num_clients) if requested is None else min(requested, num_clients - 1)
    if degree % 2 == 1 and num_clients % 2 == 1:
        degree += 1
    return degree


def ring_order(ids: Iterable[int], seed: bytes) -> list[int]:
    """The clients in the seeded pseudo-random order shared by every party."""
    return sorted(ids, key=lambda node: _rank_key(seed, node))


def neighbour_graph(ids: Iterable[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Symmetric neighbour sets of a random ``degree``-regular graph over ``ids``.

    Parameters
    ----------
    ids
        Distinct client ids (order does not matter).
    degree
        Neighbours per client, as returned by :func:`resolve_degree`: at most
        ``n − 1`` and even when ``n`` is odd.
    seed
        Public seed chosen by the server for this round (16 bytes or more).

    Returns
    -------
    dict[int, frozenset[int]]
        ``graph[u]`` is the set of ``u``'s neighbours; ``v in graph[u]`` iff
        ``u in graph[v]``; ``u not in graph[u]``.
    """
    order = ring_order(ids, seed)
    n = len(order)
    if len(set(order)) != n:
        raise ValueError(f"client ids must be distinct, got {sorted(order)}")
    if len(seed) < 16:
        raise ValueError(f"the graph seed must have at least 16 bytes, got {len(seed)}")
    if not 0 <= degree <= max(n - 1, 0) or (degree % 2 == 1 and n % 2 == 1):
        raise ValueError(
            f"no {degree}-regular graph on {n} clients: the degree must be in [0, {n - 1}] "
            "and even when the number of clients is odd; use resolve_degree()"
        )
    offsets = list(range(1, degree // 2 + 1))
    if degree % 2 == 1:
        offsets.append(n // 2)
    graph: dict[int, set[int]] = {node: set() for node in order}
    for position, node in enumerate(order):
        for offset in offsets:
            peer = order[(position + offset) % n]
            graph[node].add(peer)
            graph[peer].add(node)
    return {node: frozenset(peers) for node, peers in graph.items()}


def _rank_key(seed: bytes, node: int) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"fedlora-secagg-v1|graph|" + seed + check_node_id(node).to_bytes(8, "big"))
    return digest.finalize()
