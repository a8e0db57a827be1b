"""Default server learning rates of the adaptive optimizers on LoRA-scale pseudo-gradients.

Flower's FedAdam default (η = 0.1 with τ = 1e-3) makes the first step
``η (1−β1) Δ / ((1−β1)|Δ| + τ)``: on LoRA factors, whose per-round changes are 1e-4..1e-2
per coordinate, that is 5–10× the pseudo-gradient, a sign-like step. (FedAdagrad keeps
Flower's η = 0.1: its summed ``v`` shrinks later steps, and 0.1 measured best.)"""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import ServerOptimizer


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
@pytest.mark.parametrize("scale", [1e-4, 1e-3, 1e-2])
def test_default_first_step_stays_within_a_few_pseudo_gradients(name, scale):
    rng = np.random.default_rng(0)
    x = {"lora_A": rng.normal(size=(8, 64)) * 0.3, "lora_B": np.zeros((64, 8))}
    delta = {k: rng.normal(size=v.shape) * scale for k, v in x.items()}
    y = {k: x[k] + delta[k] for k in x}
    new = ServerOptimizer(name).step(x, y)
    for key in x:
        ratio = np.linalg.norm(new[key] - x[key]) / np.linalg.norm(delta[key])
        assert 0.05 < ratio <= 4.0, (key, ratio)  # Flower's η = 0.1: 5–10


def test_an_explicit_lr_is_used_as_given():
    optimizer = ServerOptimizer("fedadam", lr=0.1)
    assert optimizer.lr == 0.1
    x, y = {"a": np.zeros(4)}, {"a": np.full(4, 1e-3)}
    step = optimizer.step(x, y)["a"]
    np.testing.assert_allclose(step, 0.1 * 1e-4 / (1e-4 + 1e-3))  # ≈ 9× the pseudo-gradient
