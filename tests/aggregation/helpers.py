"""Small random LoRA updates and reference computations shared by the aggregation tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.aggregation import ClientUpdate, LoraFactors, scale_for_rank

SHAPES = {"layer.0.query": (6, 5), "layer.0.value": (4, 7)}  # module -> (out, in)
ALPHA = 16.0


def random_update(
    rng: np.random.Generator,
    rank: int,
    num_examples: int = 10,
    *,
    shapes: dict[str, tuple[int, int]] = SHAPES,
    alpha: float = ALPHA,
    rslora: bool = False,
    a: dict[str, np.ndarray] | None = None,
    b: dict[str, np.ndarray] | None = None,
    dtype: type = np.float64,
    client_id: str | None = None,
) -> ClientUpdate:
    """Random factors per module; ``a`` / ``b`` override them."""
    factors = {}
    for module, (out_features, in_features) in shapes.items():
        a_k = a[module] if a is not None else rng.normal(size=(rank, in_features))
        b_k = b[module] if b is not None else rng.normal(size=(out_features, rank))
        factors[module] = LoraFactors(
            a=np.asarray(a_k, dtype=dtype),
            b=np.asarray(b_k, dtype=dtype),
            scale=scale_for_rank(rank, alpha, rslora),
        )
    return ClientUpdate(factors=factors, num_examples=num_examples, client_id=client_id)


def shared_a(
    rng: np.random.Generator, rank: int, shapes: dict[str, tuple[int, int]] = SHAPES
) -> dict[str, np.ndarray]:
    """One ``A`` per module, to be shared by all clients (FFA-LoRA, RoLoRA phase "b")."""
    return {m: rng.normal(size=(rank, n)) for m, (_, n) in shapes.items()}


def exact_target(updates: Sequence[ClientUpdate], module: str) -> np.ndarray:
    """Dense ``Σ p_k s_k B_k A_k`` computed the obvious way."""
    total = sum(u.num_examples for u in updates)
    return sum(u.num_examples / total * u.factors[module].delta() for u in updates)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``‖actual − expected‖_F / ‖expected‖_F``."""
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
