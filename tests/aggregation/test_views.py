"""Client views: prefix slicing with scale refolding, fresh PEFT-style init."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.aggregation import LoraFactors
from fedlora.aggregation.views import FreshInitView, PrefixView, init_rows


def global_factors(rng: np.random.Generator) -> dict[str, LoraFactors]:
    return {"q": LoraFactors(a=rng.normal(size=(8, 5)), b=rng.normal(size=(6, 8)), scale=2.0)}


@pytest.mark.parametrize("split", ["b", "balanced"])
def test_prefix_view_refolds_to_the_client_scale(rng: np.random.Generator, split: str) -> None:
    g = global_factors(rng)
    view = PrefixView(g, lora_alpha=16.0, rslora=False, split=split, fixed_rank=False, strategy="x")

    sent = view(4)["q"]

    assert sent.scale == 4.0
    expected = 2.0 * g["q"].b[:, :4] @ g["q"].a[:4]
    np.testing.assert_allclose(sent.delta(), expected, rtol=1e-12)
    if split == "b":
        np.testing.assert_array_equal(sent.a, g["q"].a[:4])
    else:
        np.testing.assert_allclose(sent.a, g["q"].a[:4] * math.sqrt(0.5), rtol=1e-12)


def test_prefix_view_reinitialises_a_above_the_global_rank(rng: np.random.Generator) -> None:
    g = global_factors(rng)
    view = PrefixView(g, lora_alpha=16.0, rslora=False, split="b", fixed_rank=False,
                      strategy="x", seed=3)

    sent = view(12)["q"]

    assert sent.a.shape == (12, 5) and sent.b.shape == (6, 12)
    np.testing.assert_array_equal(sent.a[8:], init_rows("q", 12, 5, 3)[8:])  # PEFT-like A
    assert not sent.b[:, 8:].any()  # B = 0: the product is unchanged
    np.testing.assert_allclose(sent.delta(), g["q"].delta(), rtol=1e-12)


def test_prefix_view_reinitialises_components_dead_in_the_global(
    rng: np.random.Generator,
) -> None:
    g = global_factors(rng)
    a, b = g["q"].a.copy(), g["q"].b.copy()
    a[2], b[:, 2] = 0.0, 0.0
    view = PrefixView({"q": LoraFactors(a=a, b=b, scale=g["q"].scale)}, lora_alpha=16.0,
                      rslora=False, split="balanced", fixed_rank=False, strategy="x", seed=4)

    sent = view(4)["q"]

    np.testing.assert_array_equal(sent.a[2], init_rows("q", 4, 5, 4)[2])
    np.testing.assert_array_equal(sent.a[[0, 1, 3]], a[[0, 1, 3]] * math.sqrt(0.5))
    assert not sent.b[:, 2].any()


def test_fixed_rank_view_returns_the_global_factors_unchanged(rng: np.random.Generator) -> None:
    g = global_factors(rng)
    view = PrefixView(
        g, lora_alpha=16.0, rslora=False, split="b", fixed_rank=True, strategy="fedit"
    )

    sent = view(8)["q"]

    np.testing.assert_array_equal(sent.a, g["q"].a)
    np.testing.assert_array_equal(sent.b, g["q"].b)
    with pytest.raises(ValueError, match="fedit"):
        view(4)


def test_fresh_init_view_follows_peft_defaults() -> None:
    view = FreshInitView(
        {"q": (6, 400)}, lora_alpha=8.0, rslora=True, seed=3, dtype=np.dtype(np.float32)
    )

    sent = view(4)["q"]

    assert sent.scale == 4.0 and sent.a.dtype == np.float32
    assert not sent.b.any()
    assert np.abs(sent.a).max() <= 0.05 and np.abs(sent.a).max() > 0.045
    np.testing.assert_array_equal(view(2)["q"].a, sent.a[:2])
