"""Server optimizers: hand-computed steps and checkpoint round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.aggregation import ServerOptimizer, available_server_optimizers

X0 = {"w": np.array([1.0, -2.0], dtype=np.float32)}
Y1 = {"w": np.array([1.5, -2.0], dtype=np.float32)}  # Δ1 = [0.5, 0]
Y2 = {"w": np.array([1.5, -1.0], dtype=np.float32)}  # Δ2 from x1


def test_fedavgm_with_unit_lr_and_no_momentum_returns_the_aggregate_exactly() -> None:
    rng = np.random.default_rng(0)
    previous = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5)}
    aggregated = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5)}
    optimizer = ServerOptimizer("fedavgm", lr=1.0, momentum=0.0)

    new = optimizer.step(previous, aggregated)

    for key in aggregated:
        np.testing.assert_array_equal(new[key], aggregated[key])
        assert new[key].dtype == aggregated[key].dtype


def test_fedavgm_momentum_two_steps_by_hand() -> None:
    optimizer = ServerOptimizer("fedavgm", lr=0.5, momentum=0.9)

    x1 = optimizer.step(X0, Y1)["w"]
    x2 = optimizer.step({"w": x1}, Y2)["w"]

    # u1 = Δ1 = [0.5, 0]; x1 = x0 + 0.5 u1 = [1.25, -2]
    np.testing.assert_allclose(x1, [1.25, -2.0])
    # Δ2 = y2 − x1 = [0.25, 1]; u2 = 0.9 u1 + Δ2 = [0.7, 1]; x2 = x1 + 0.5 u2 = [1.6, -1.5]
    np.testing.assert_allclose(x2, [1.6, -1.5], rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "v1"),
    [
        # Δ = [0.5, 0], β2 = 0.99, v0 = 0
        ("fedadam", [0.01 * 0.25, 0.0]),  # β2 v + (1 − β2) Δ²
        (
            "fedyogi",
            [0.01 * 0.25, 0.0],
        ),  # v − (1 − β2) Δ² sign(v − Δ²), sign(0 − 0.25) = −1, sign(0) = 0
        ("fedadagrad", [0.25, 0.0]),  # v + Δ²
    ],
)
def test_adaptive_first_step_by_hand(name: str, v1: list[float]) -> None:
    optimizer = ServerOptimizer(name, lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)

    x1 = optimizer.step(X0, Y1)["w"]

    m1 = [0.1 * 0.5, 0.0]  # (1 − β1) Δ
    expected = [1.0 + 0.1 * m1[0] / (math.sqrt(v1[0]) + 1e-3), -2.0]
    np.testing.assert_allclose(x1, expected, rtol=1e-6)
    state = optimizer.state_dict()
    np.testing.assert_allclose(state["m/w"], m1)
    np.testing.assert_allclose(state["v/w"], v1)


def test_fedyogi_second_step_grows_v_only_towards_the_new_square() -> None:
    optimizer = ServerOptimizer("fedyogi", lr=0.1, beta_1=0.0, beta_2=0.5, tau=1e-3)
    optimizer.step(X0, Y1)  # v = [0.125, 0]

    optimizer.step(X0, {"w": np.array([1.1, -2.0], np.float32)})  # Δ = [0.1, 0]

    # v = 0.125 − 0.5 · 0.01 · sign(0.125 − 0.01) = 0.12
    np.testing.assert_allclose(optimizer.state_dict()["v/w"], [0.12, 0.0], rtol=1e-6)


@pytest.mark.parametrize("name", available_server_optimizers())
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    # Prepare
    kwargs = {"lr": 0.3, "momentum": 0.5} if name == "fedavgm" else {"lr": 0.3}
    original = ServerOptimizer(name, **kwargs)
    original.step(X0, Y1)
    restored = ServerOptimizer(name, **kwargs)

    # Execute
    restored.load_state_dict(original.state_dict())

    # Assert
    state = original.state_dict()
    assert all(isinstance(v, (float, np.ndarray)) for v in state.values())
    np.testing.assert_array_equal(restored.step(Y1, Y2)["w"], original.step(Y1, Y2)["w"])


def test_load_state_dict_refuses_other_settings() -> None:
    source = ServerOptimizer("fedadam", lr=0.1)
    source.step(X0, Y1)

    with pytest.raises(ValueError, match="lr"):
        ServerOptimizer("fedadam", lr=0.2).load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match="variant"):
        ServerOptimizer("fedyogi", lr=0.1).load_state_dict(source.state_dict())


@pytest.mark.parametrize(
    ("previous", "aggregated", "match"),
    [
        ({"w": np.zeros(2)}, {"v": np.zeros(2)}, "same arrays"),
        ({"w": np.zeros(2)}, {"w": np.zeros((1, 2))}, "shape"),
        ({"w": np.zeros(2, dtype=int)}, {"w": np.zeros(2)}, "floating"),
    ],
)
def test_step_rejects_mismatched_inputs(
    previous: dict[str, np.ndarray], aggregated: dict[str, np.ndarray], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ServerOptimizer("fedadam").step(previous, aggregated)


def test_changed_parameter_layout_needs_a_new_optimizer() -> None:
    optimizer = ServerOptimizer("fedadam")
    optimizer.step(X0, Y1)

    with pytest.raises(ValueError, match="fresh ServerOptimizer"):
        optimizer.step({"w": np.zeros(3)}, {"w": np.ones(3)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "sgd"}, "fedadam"),
        ({"name": "fedadam", "momentum": 0.9}, "fedavgm only"),
        ({"name": "fedadam", "lr": 0.0}, "lr"),
        ({"name": "fedadam", "beta_2": 1.0}, "beta_2"),
        ({"name": "fedyogi", "tau": 0.0}, "tau"),
    ],
)
def test_bad_settings_are_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServerOptimizer(**kwargs)  # type: ignore[arg-type]
