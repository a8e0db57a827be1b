"""The seeded SecAgg+ neighbour graph."""

from __future__ import annotations

import pytest

from fedlora.privacy.secagg.graph import default_degree, neighbour_graph, resolve_degree, ring_order

SEED = bytes(range(32))
IDS = [5 * i + 17 for i in range(12)]


@pytest.mark.parametrize(("clients", "degree"), [(12, 4), (12, 5), (13, 6), (12, 11), (13, 12)])
def test_graph_is_regular_symmetric_and_loop_free(clients: int, degree: int) -> None:
    ids = list(range(100, 100 + clients))
    graph = neighbour_graph(ids, degree, SEED)
    assert set(graph) == set(ids)
    for node, peers in graph.items():
        assert len(peers) == degree
        assert node not in peers
        assert all(node in graph[peer] for peer in peers)


def test_full_degree_is_the_complete_graph() -> None:
    graph = neighbour_graph(IDS, len(IDS) - 1, SEED)
    assert all(graph[n] == set(IDS) - {n} for n in IDS)


def test_graph_depends_on_the_seed_not_the_id_order() -> None:
    graph = neighbour_graph(IDS, 4, SEED)
    assert neighbour_graph(list(reversed(IDS)), 4, SEED) == graph
    assert neighbour_graph(IDS, 4, bytes(32)) != graph
    assert ring_order(IDS, SEED) != sorted(IDS)


@pytest.mark.parametrize(
    ("clients", "expected"), [(1, 0), (2, 1), (3, 2), (8, 7), (20, 13), (100, 20), (1000, 30)]
)
def test_default_degree_is_logarithmic(clients: int, expected: int) -> None:
    assert default_degree(clients) == expected


@pytest.mark.parametrize(
    ("clients", "requested", "expected"),
    [(20, None, 13), (13, 5, 6), (14, 5, 5), (5, 100, 4), (6, 100, 5), (1, 3, 0)],
)
def test_resolve_degree(clients: int, requested: int | None, expected: int) -> None:
    assert resolve_degree(clients, requested) == expected


@pytest.mark.parametrize(
    ("ids", "degree", "seed", "match"),
    [
        ([1, 2, 3], 1, SEED, "even when the number of clients is odd"),
        ([1, 2, 3], 3, SEED, r"\[0, 2\]"),
        ([1, 1, 2], 1, SEED, "distinct"),
        ([1, 2], 1, b"short", "16 bytes"),
        ([1, -2], 1, SEED, "node id"),
    ],
)
def test_invalid_graphs(ids: list[int], degree: int, seed: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        neighbour_graph(ids, degree, seed)
