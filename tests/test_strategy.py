"""Tests of the server strategy's node handling: discovery once, sampling per round."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fl_harness import tiny_config

from clients.app import app as client_app
from fedlora import config
from fedlora.aggregation import LoraFactors
from fedlora.federation.global_adapter import GlobalAdapter
from server.inprocess import InProcessGrid
from server.strategy import DISCOVERY_BATCH, FederatedLora, NodeInfo


def _strategy(**overrides: Any) -> FederatedLora:
    cfg = config.from_flat(tiny_config(**overrides))
    glob = GlobalAdapter({"m": LoraFactors(a=np.zeros((8, 4)), b=np.zeros((4, 8)), scale=2.0)},
                         {}, lora_alpha=16.0, rslora=False)
    return FederatedLora(cfg, glob, lambda _: None, lambda _: None)


def _nodes(sizes: list[int]) -> list[NodeInfo]:
    return [NodeInfo(node_id=5000 + 3 * p, partition_id=p, rank=8, num_examples=n)
            for p, n in enumerate(sizes)]


def test_uniform_sampling_takes_num_train_nodes_seeded_by_round():
    strategy = _strategy(num_train_nodes=10)
    nodes = _nodes([20] * 1000)

    rounds = [strategy.sample(nodes, r) for r in (1, 2)]

    assert [len(s) for s in rounds] == [10, 10]
    assert all(len({n.partition_id for n in s}) == 10 for s in rounds)
    assert all([n.partition_id for n in s] == sorted(n.partition_id for n in s) for s in rounds)
    assert rounds[0] != rounds[1]
    assert strategy.sample(nodes, 1) == rounds[0]  # the same round draws the same nodes


def test_sampling_every_node_returns_them_all():
    nodes = _nodes([20] * 5)

    assert _strategy(num_train_nodes=5).sample(nodes, 1) == nodes


def test_uniform_sampling_ignores_data_size():
    strategy = _strategy(num_train_nodes=1, min_train_nodes=1)
    nodes = _nodes([1000] + [1] * 9)

    picks = [strategy.sample(nodes, r)[0].partition_id for r in range(1, 2001)]

    assert picks.count(0) / len(picks) == pytest.approx(0.1, abs=0.03)


def test_data_size_sampling_is_proportional_to_examples():
    # Prepare: one node holds 91 % of the examples
    strategy = _strategy(num_train_nodes=1, min_train_nodes=1, sampling="data-size")
    nodes = _nodes([100] + [1] * 10)

    # Execute
    picks = [strategy.sample(nodes, r)[0].partition_id for r in range(1, 2001)]

    # Assert: frequencies match n_k / sum(n); 2,000 draws give a std of ~0.006 for p = 0.91
    assert picks.count(0) / len(picks) == pytest.approx(100 / 110, abs=0.03)
    assert picks.count(3) / len(picks) == pytest.approx(1 / 110, abs=0.01)


def test_data_size_sampling_draws_distinct_nodes():
    strategy = _strategy(num_train_nodes=4, sampling="data-size")
    nodes = _nodes([50, 1, 1, 1, 1, 1])

    for r in range(1, 50):
        picked = [n.partition_id for n in strategy.sample(nodes, r)]
        assert len(set(picked)) == 4


@pytest.mark.parametrize(("sampling", "reported"), [("uniform", False), ("data-size", True)])
def test_discovery_asks_every_node_once_in_bounded_batches(sampling, reported):
    # Prepare: 250 nodes; record each batch the server sends
    num = 250
    flat = tiny_config(sampling=sampling)
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": num}
                                      for i in range(num)], flat)
    batches: list[int] = []
    send = grid.send_and_receive
    grid.send_and_receive = lambda msgs, **kw: batches.append(len(msgs)) or send(msgs, **kw)

    # Execute
    nodes = _strategy(sampling=sampling).discover(grid)

    # Assert: 1,780 BBC training rows over 250 partitions = 7 or 8 each
    assert batches == [DISCOVERY_BATCH, DISCOVERY_BATCH, num - 2 * DISCOVERY_BATCH]
    assert [n.partition_id for n in nodes] == list(range(num))
    assert len({n.node_id for n in nodes}) == num
    sizes = {n.num_examples for n in nodes}
    assert sizes <= {7, 8} if reported else sizes == {0}
