"""Containers for LoRA factors and client updates.

A LoRA module adds ``ΔW = scale · B @ A`` to a frozen weight ``W ∈ R^{m×n}``
(``m`` = out_features, ``n`` = in_features), with ``A ∈ R^{r×n}`` (PEFT's
``lora_A``) and ``B ∈ R^{m×r}`` (PEFT's ``lora_B``). The containers do not
validate their arrays, so that malformed client payloads can be represented
and rejected with a precise reason by
:func:`fedlora.aggregation.validation.validate_update`. They compare by
identity (``eq=False``): element-wise array equality has no single truth
value; compare the arrays explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class LoraFactors:
    """Low-rank factors of one module: ``ΔW = scale · b @ a``.

    Parameters
    ----------
    a
        ``lora_A``, shape ``(r, in_features)``.
    b
        ``lora_B``, shape ``(out_features, r)``.
    scale
        LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` under rsLoRA;
        ``1.0`` for base corrections.
    """

    a: np.ndarray
    b: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        """The LoRA rank ``r`` (rows of ``a``)."""
        return int(self.a.shape[0])

    def delta(self) -> np.ndarray:
        """Dense ``scale · b @ a`` in float64, shape ``(out_features, in_features)``.

        Meant for tests and small diagnostics; aggregation never calls it.
        """
        return self.scale * (self.b.astype(np.float64) @ self.a.astype(np.float64))

    def astype(self, dtype: np.dtype | type) -> LoraFactors:
        """Return a copy with both factors cast to ``dtype``."""
        return LoraFactors(
            a=np.asarray(self.a, dtype=dtype).copy(),
            b=np.asarray(self.b, dtype=dtype).copy(),
            scale=float(self.scale),
        )


@dataclass(frozen=True, eq=False)
class ClientUpdate:
    """What one client sends after local training.

    Parameters
    ----------
    factors
        LoRA factors keyed by PEFT module name, e.g.
        ``"base_model.model.bert.encoder.layer.0.attention.self.query"``.
    num_examples
        Local training examples; the aggregation weight is
        ``p_k = n_k / Σ n``.
    client_id
        Optional identifier used in error messages.
    """

    factors: Mapping[str, LoraFactors]
    num_examples: int
    client_id: str | None = None
