"""Registry behaviour and invariants that every registered rule must satisfy."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pytest

from fedlora.aggregation import (
    AggregationResult,
    ClientUpdate,
    RoundContext,
    UnknownStrategyError,
    aggregate,
    available_strategies,
    register,
    registry,
    requires_equal_ranks,
    strategy_info,
)
from fedlora.aggregation.result import same_rank_result

from .helpers import SHAPES, exact_target, random_update, relative_error, shared_a

ALL = available_strategies()
MIXED_RANK_RULES = [n for n in ALL if not requires_equal_ranks(n)]


@pytest.fixture
def round_updates(rng: np.random.Generator) -> list[ClientUpdate]:
    """Equal ranks and a shared A: valid input for every rule."""
    a = shared_a(rng, 4)
    return [random_update(rng, 4, n, a=a, client_id=f"c{n}") for n in (3, 5, 8, 13)]


@pytest.mark.parametrize("name", ALL)
def test_identical_updates_are_a_fixed_point(rng: np.random.Generator, name: str) -> None:
    # Prepare
    update = random_update(rng, 4)
    updates = [copy.deepcopy(update) for _ in range(3)]
    updates = [type(u)(u.factors, n) for u, n in zip(updates, (1, 4, 9), strict=True)]

    # Execute
    result = aggregate(name, updates)
    sent = result.for_client(4)

    # Assert
    for module in SHAPES:
        delta = update.factors[module].delta()
        assert relative_error(result.effective_delta(module), delta) < 1e-6
        if name == "flora":
            assert relative_error(result.base_correction[module].delta(), delta) < 1e-6
        else:
            assert relative_error(sent[module].delta(), delta) < 1e-6


@pytest.mark.parametrize("name", ALL)
def test_effective_delta_is_permutation_invariant(
    round_updates: list[ClientUpdate], name: str
) -> None:
    forward = aggregate(name, round_updates)
    backward = aggregate(name, round_updates[::-1])

    for module in SHAPES:
        np.testing.assert_allclose(
            backward.effective_delta(module),
            forward.effective_delta(module),
            rtol=1e-10,
            atol=1e-12,
        )


@pytest.mark.parametrize("name", ALL)
def test_scaling_all_example_counts_changes_nothing(
    round_updates: list[ClientUpdate], name: str
) -> None:
    scaled = [type(u)(u.factors, 7 * u.num_examples, u.client_id) for u in round_updates]

    base, result = aggregate(name, round_updates), aggregate(name, scaled)

    for module in SHAPES:
        np.testing.assert_array_equal(result.effective_delta(module), base.effective_delta(module))
        np.testing.assert_array_equal(result.for_client(4)[module].b, base.for_client(4)[module].b)


@pytest.mark.parametrize("name", [n for n in ALL if strategy_info(n).exact])
def test_rules_claimed_exact_are_exact(round_updates: list[ClientUpdate], name: str) -> None:
    result = aggregate(name, round_updates)

    for module in SHAPES:
        error = relative_error(result.effective_delta(module), exact_target(round_updates, module))
        assert error < 1e-10


@pytest.mark.parametrize("name", MIXED_RANK_RULES)
def test_mixed_rank_rules_accept_ranks_2_4_8(rng: np.random.Generator, name: str) -> None:
    updates = [random_update(rng, r, n) for r, n in ((2, 3), (4, 5), (8, 2))]

    result = aggregate(name, updates)

    for rank in (2, 4, 8):
        sent = result.for_client(rank)
        assert all(f.rank == rank for f in sent.values())
    if strategy_info(name).exact:
        assert result.diagnostics(updates)["agg_error_max"] < 1e-10


@pytest.mark.parametrize("name", ALL)
def test_rules_are_pure_and_keep_float32(round_updates: list[ClientUpdate], name: str) -> None:
    # Prepare
    updates = [
        type(u)({m: f.astype(np.float32) for m, f in u.factors.items()}, u.num_examples)
        for u in round_updates
    ]
    before = copy.deepcopy(updates)

    # Execute
    result = aggregate(name, updates)

    # Assert
    for u, saved in zip(updates, before, strict=True):
        for module in SHAPES:
            np.testing.assert_array_equal(u.factors[module].a, saved.factors[module].a)
            np.testing.assert_array_equal(u.factors[module].b, saved.factors[module].b)
    assert result.strategy == name
    assert result.modules == tuple(sorted(SHAPES))
    for f in [*result.global_factors.values(), *result.base_correction.values()]:
        assert f.a.dtype == np.float32 and f.b.dtype == np.float32
    assert all(f.a.dtype == np.float32 for f in result.for_client(4).values())


def test_unknown_strategy_lists_the_available_ones(rng: np.random.Generator) -> None:
    with pytest.raises(UnknownStrategyError) as info:
        aggregate("fedavg_typo", [random_update(rng, 4)])

    assert isinstance(info.value, ValueError)
    for name in ALL:
        assert name in str(info.value)


def test_unknown_option_lists_the_valid_ones(rng: np.random.Generator) -> None:
    with pytest.raises(TypeError, match="weight_by_examples") as info:
        aggregate("hetlora", [random_update(rng, 4)], phase="b")

    for option in ("lora_alpha", "rslora", "seed", "max_rank"):
        assert option in str(info.value)


def test_common_options_are_accepted_by_every_rule(round_updates: list[ClientUpdate]) -> None:
    for name in ALL:
        result = aggregate(name, round_updates, lora_alpha=16.0, rslora=False, seed=3,
                           max_rank=8)
        # the options took effect: the rule's result carries them
        assert result.strategy == name and result.lora_alpha == 16.0 and not result.rslora
        assert set(result.modules) == set(round_updates[0].factors)
        rank = next(iter(round_updates[0].factors.values())).rank
        sent = result.for_client(rank)  # what a client of the round's rank receives
        for module, f in round_updates[0].factors.items():
            assert sent[module].a.shape == f.a.shape and sent[module].b.shape == f.b.shape


def test_max_rank_rejects_larger_updates(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="RANK_TOO_LARGE"):
        aggregate("flexlora", [random_update(rng, 8)], max_rank=4)


def test_empty_round_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        aggregate("fedit", [])


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register rules without leaking them into the real registry."""
    monkeypatch.setattr(registry, "_RULES", dict(registry._RULES))


def test_register_adds_a_rule_with_its_own_options(
    scratch_registry: None, rng: np.random.Generator
) -> None:
    # Prepare
    @register("first_client", equal_ranks=True)
    def first_client(
        updates: Sequence[ClientUpdate], context: RoundContext, *, gain: float = 1.0
    ) -> AggregationResult:
        factors = {m: u for m, u in updates[0].factors.items()}
        return same_rank_result("first_client", factors, context)

    # Execute
    result = aggregate("first_client", [random_update(rng, 4)], gain=2.0)

    # Assert
    assert "first_client" in available_strategies()
    assert requires_equal_ranks("first_client")
    assert strategy_info("first_client").options == {"gain": 1.0}
    assert result.strategy == "first_client"


def test_register_rejects_duplicates_and_bad_rules(scratch_registry: None) -> None:
    def rule(updates: Sequence[ClientUpdate], context: RoundContext) -> AggregationResult:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="already registered"):
        register("fedit")(rule)
    with pytest.raises(ValueError, match="lower-case"):
        register("Fed IT")
    with pytest.raises(ValueError, match="signature"):
        register("kwargs_rule")(lambda updates, context, **options: None)
    with pytest.raises(ValueError, match="common option"):
        register("seed_rule")(lambda updates, context, *, seed=0: None)


def test_required_rule_option_must_be_given(
    scratch_registry: None, rng: np.random.Generator
) -> None:
    @register("needs_gain")
    def needs_gain(
        updates: Sequence[ClientUpdate], context: RoundContext, *, gain: float
    ) -> AggregationResult:
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="gain"):
        aggregate("needs_gain", [random_update(rng, 4)])


def test_bad_common_option_is_reported_before_the_updates_are_checked(
    rng: np.random.Generator,
) -> None:
    with pytest.raises(ValueError, match="max_rank must be a positive integer"):
        aggregate("flexlora", [random_update(rng, 4)], max_rank=0)


def test_a_refactoring_rule_must_be_linear() -> None:
    with pytest.raises(ValueError, match="linear=True"):
        register("svd_of_nothing", refactors=True)
