"""A whole secure-aggregation round in memory, with scripted dropouts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedlora.privacy.secagg import (
    FixedPointCodec,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    SecureSum,
    Stage,
    UnmaskResponse,
)

Drops = Mapping[Stage, Iterable[int]]


@dataclass
class Federation:
    """Clients, server and their inputs for one round."""

    config: SecAggConfig
    server_round: int
    clients: dict[int, SecAggClient]
    server: SecAggServer
    vectors: dict[int, np.ndarray]
    weights: dict[int, float]
    restore_between_stages: bool = False
    masked: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return sorted(self.clients)

    def client(self, node: int) -> SecAggClient:
        """The client, round-tripped through snapshot/restore when requested."""
        if self.restore_between_stages:
            snapshot = self.clients[node].snapshot()
            self.clients[node] = SecAggClient.restore(self.config, snapshot)
        return self.clients[node]


def make_federation(
    num_clients: int,
    config: SecAggConfig,
    *,
    vector_size: int = 64,
    seed: int = 0,
    server_round: int = 1,
    restore_between_stages: bool = False,
) -> Federation:
    """Clients with large random 64-bit node ids, Gaussian vectors (some clipped), int weights."""
    rng = np.random.default_rng(seed)
    ids: set[int] = set()
    while len(ids) < num_clients:
        ids.add(int(rng.integers(0, 2**63 - 1)) * 2 + int(rng.integers(0, 2)))
    vectors = {
        node: rng.normal(0.0, 0.5 * config.clip_range, vector_size).astype(np.float32)
        for node in sorted(ids)
    }
    weights = {node: float(rng.integers(1, int(config.max_weight) + 1)) for node in sorted(ids)}
    return Federation(
        config=config,
        server_round=server_round,
        clients={node: SecAggClient(node, config, server_round) for node in sorted(ids)},
        server=SecAggServer(config, server_round, sorted(ids), vector_size),
        vectors=vectors,
        weights=weights,
        restore_between_stages=restore_between_stages,
    )


def run_round(
    fed: Federation,
    drops: Drops | None = None,
    *,
    responses_hook: Callable[[list[UnmaskResponse]], None] | None = None,
) -> SecureSum:
    """Run the four stages; ``drops[stage]`` are clients that send nothing at ``stage``."""
    drops = drops or {}

    def replying(stage: Stage, candidates: Iterable[int]) -> list[int]:
        return sorted(set(candidates) - set(drops.get(stage, ())))

    server = fed.server
    directory = server.collect_keys(
        fed.client(n).advertise_keys() for n in replying(Stage.ADVERTISE_KEYS, fed.ids)
    )
    relays = server.collect_shares(
        fed.client(n).share_keys(directory)
        for n in replying(Stage.SHARE_KEYS, directory.public_keys)
    )
    inputs = [
        fed.client(n).mask_input(relays[n], fed.vectors[n], fed.weights[n])
        for n in replying(Stage.MASKED_INPUT, relays)
    ]
    fed.masked = {message.sender: message.masked.copy() for message in inputs}
    requests = server.collect_masked_inputs(inputs)
    responses = [fed.client(n).unmask(requests[n]) for n in replying(Stage.UNMASK, requests)]
    if responses_hook is not None:
        responses_hook(responses)
    return server.collect_unmask_responses(responses)


def plain_sum(fed: Federation, contributors: Iterable[int]) -> tuple[np.ndarray, float]:
    """Reference ``Σ w_k clip(x_k)`` (float64) and ``Σ w_k`` over ``contributors``."""
    c = fed.config.clip_range
    total = sum(
        fed.weights[n] * np.clip(fed.vectors[n].astype(np.float64), -c, c) for n in contributors
    )
    return np.asarray(total), float(sum(fed.weights[n] for n in contributors))


def assert_matches_plain_sum(fed: Federation, result: SecureSum) -> None:
    """The secure sum equals the plain weighted sum within the fixed-point bound."""
    expected, weight = plain_sum(fed, result.contributors)
    error = np.abs(result.weighted_sum.astype(np.float64) - expected)
    float32_rounding = 2.0**-24 * np.abs(expected)
    assert np.all(error <= result.error_bound + float32_rounding), (error.max(), result.error_bound)
    group = fed.server.group
    assert group is not None
    codec = FixedPointCodec(fed.config.clip_range, fed.config.max_weight, group.num_clients)
    assert result.error_bound == codec.error_bound(len(result.contributors))
    assert abs(result.total_weight - weight) <= codec.weight_error_bound(len(result.contributors))
