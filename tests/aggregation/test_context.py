"""Resolution of the common options."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation.context import build_context

from .helpers import SHAPES, random_update


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_alpha_is_inferred_from_the_first_update(
    rng: np.random.Generator, rslora: bool
) -> None:
    updates = [random_update(rng, 4, alpha=32.0, rslora=rslora), random_update(rng, 8, alpha=16.0)]

    context = build_context(updates, SHAPES, lora_alpha=None, rslora=rslora, seed=0, max_rank=None)

    assert context.lora_alpha == pytest.approx(32.0)
    assert context.modules == tuple(sorted(SHAPES))
    assert context.dtype == np.float64


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"lora_alpha": -1.0}, ValueError),
        ({"lora_alpha": float("nan")}, ValueError),
        ({"seed": -1}, ValueError),
        ({"seed": 1.5}, ValueError),
        ({"max_rank": 0}, ValueError),
        ({"rslora": "yes"}, TypeError),
    ],
)
def test_bad_common_options_are_rejected(
    rng: np.random.Generator, options: dict[str, object], error: type[Exception]
) -> None:
    values: dict[str, object] = {"lora_alpha": None, "rslora": False, "seed": 0, "max_rank": None}

    with pytest.raises(error):
        build_context([random_update(rng, 4)], SHAPES, **{**values, **options})  # type: ignore[arg-type]
