"""What the server knows of one node: the facts its capability reply declared.

Its own module because both the plain round (:mod:`server.strategy`) and the secure round
(:mod:`server.secure_round`) hold nodes, and the secure round must not import the strategy that
drives it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeInfo:
    """One node as admitted at discovery: Flower node id, data partition and LoRA rank."""

    node_id: int
    partition_id: int
    rank: int
    num_examples: int = 0  # training examples, reported only when sampling by data size
