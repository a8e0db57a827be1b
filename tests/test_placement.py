"""Tests of fedlora.runtime.launcher's placement: what Flower's Ray backend receives."""

from __future__ import annotations

import pytest
from flwr.common.config import parse_config_args
from flwr.simulation.app import _run_simulation_settings
from flwr.supercore.utils import simulation_config_from_json

from fedlora.errors import FedLoraError
from fedlora.runtime.launcher import Placement


def _backend_config(federation_config: str) -> tuple[int, dict]:
    """What flwr-simulation builds from a ``flwr run --federation-config`` value."""
    fields = {k.replace("-", "_"): v for k, v in parse_config_args([federation_config]).items()}
    nodes, _, backend, *_ = _run_simulation_settings(simulation_config_from_json(fields))
    return nodes, backend


@pytest.mark.parametrize(
    ("cpus", "gpus", "resources"),
    [(1.0, 0.0, {"num_cpus": 1, "num_gpus": 0}),
     (2, 0.25, {"num_cpus": 2, "num_gpus": 0.25}),  # four workers share a GPU
     (1, 1, {"num_cpus": 1, "num_gpus": 1}),
     (4, 2, {"num_cpus": 4, "num_gpus": 2})],
)
def test_placement_reaches_flowers_ray_backend_config(cpus, gpus, resources):
    nodes, backend = _backend_config(Placement(cpus, gpus).federation_config(1000))

    assert nodes == 1000
    assert backend["client_resources"] == resources
    assert backend["init_args"] == {}  # Ray sizes itself (or the cluster does)


@pytest.mark.parametrize(
    ("cpus", "gpus", "fragment"),
    [(0, 0, "cpus per client must be a whole number >= 1"),
     (0.5, 0, "cpus per client must be a whole number >= 1"),  # Flower's wire field is an int
     (1.5, 0, "cpus per client must be a whole number >= 1"),
     (1, -0.5, "gpus per client must be >= 0"),
     (1, 1.5, "gpus per client must be >= 0 and, above 1, a whole number")],
)
def test_placement_refuses_what_ray_cannot_reserve(cpus, gpus, fragment):
    with pytest.raises(FedLoraError, match=fragment):
        Placement(cpus, gpus)


@pytest.mark.parametrize(("address", "expected"),
                         [("", "local"), ("127.0.0.1:6380", "127.0.0.1:6380")])
def test_placement_tells_ray_which_cluster_to_join(address, expected):
    assert Placement(ray_address=address).environment() == {"RAY_ADDRESS": expected}
