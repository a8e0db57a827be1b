"""SecAggConfig validation, per-round resolution, and the strategy compatibility matrix."""

from __future__ import annotations

import pytest

from fedlora.aggregation import available_strategies
from fedlora.errors import ConfigError
from fedlora.privacy.secagg import COMPATIBLE, INCOMPATIBLE, SecAggConfig, secagg_compatible


def test_every_registered_strategy_is_in_the_matrix() -> None:
    registered = set(available_strategies())
    assert registered == set(COMPATIBLE) | set(INCOMPATIBLE)
    assert not set(COMPATIBLE) & set(INCOMPATIBLE)


@pytest.mark.parametrize("name", ["fedit", "ffa", "fedsa", "rolora", "hetlora"])
def test_linear_rules_are_compatible(name: str) -> None:
    ok, reason = secagg_compatible(name)
    assert ok
    assert name in reason


@pytest.mark.parametrize("name", ["flora", "flexlora", "fedex"])
def test_rules_needing_individual_factors_are_refused_with_alternatives(name: str) -> None:
    ok, reason = secagg_compatible(name)
    assert not ok
    assert "individual" in reason or "each client" in reason
    for alternative in COMPATIBLE:
        assert alternative in reason


def test_unknown_strategy_is_not_compatible() -> None:
    ok, reason = secagg_compatible("krum")
    assert not ok
    assert "unknown strategy 'krum'" in reason and "fedit" in reason


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1}, "threshold must be None or an int ≥ 2"),
        ({"threshold": 2.5}, "threshold"),
        ({"threshold": True}, "threshold"),
        ({"neighbours": 0}, "neighbours must be None or an int ≥ 1"),
        ({"clip_range": 0.0}, "clip_range must be a finite number > 0"),
        ({"clip_range": float("inf")}, "clip_range"),
        ({"max_weight": -1.0}, "max_weight"),
        ({"threshold": 3, "neighbours": 5}, r"not a strict majority .* use threshold ≥ 4"),
        ({"threshold": 7, "neighbours": 5}, "exceeds the share group of 6"),
    ],
)
def test_invalid_config_says_what_to_change(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SecAggConfig(**kwargs)


@pytest.mark.parametrize(
    ("config", "clients", "neighbours", "threshold"),
    [
        (SecAggConfig(), 2, 1, 2),
        (SecAggConfig(), 3, 2, 2),
        (SecAggConfig(), 5, 4, 3),  # γ = 1/3, δ = 1/10: 2 colluders, 1 dropout → full
        (SecAggConfig(), 20, 10, 8),  # 7 colluders: t = 8 > 7, and 10 − 2 ≥ 8
        (SecAggConfig(), 100, 42, 32),  # Bell et al. bounds, see test_attacks.py
        (SecAggConfig(gamma=0.05, delta=0.05), 100, 12, 7),
        (SecAggConfig(neighbours=10_000), 20, 19, 11),  # full SecAgg
        (SecAggConfig(neighbours=5), 13, 6, 4),  # odd k with odd n is raised by one
        (SecAggConfig(neighbours=5), 14, 5, 4),
        (SecAggConfig(threshold=4, neighbours=5), 13, 6, 4),
    ],
)
def test_resolve(config: SecAggConfig, clients: int, neighbours: int, threshold: int) -> None:
    group = config.resolve(clients)
    assert (group.num_clients, group.neighbours, group.threshold) == (
        clients,
        neighbours,
        threshold,
    )
    assert 2 * group.threshold > group.group_size >= group.threshold


def test_resolve_with_too_few_clients() -> None:
    with pytest.raises(ValueError, match="at least 2 clients"):
        SecAggConfig().resolve(1)
    with pytest.raises(ValueError, match="threshold 4 needs share groups of at least 4"):
        SecAggConfig(threshold=4, neighbours=5).resolve(3)


def test_explicit_threshold_that_stops_being_a_majority_is_a_config_error() -> None:
    # threshold=3 is a majority of small groups, not of the 14-client groups of n = 20
    with pytest.raises(ConfigError, match="threshold=None"):
        SecAggConfig(threshold=3).resolve(20)
