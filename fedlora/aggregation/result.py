"""The output of one aggregation round."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.diagnostics import round_diagnostics
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.patterns import check_client_rank
from fedlora.aggregation.views import ClientView, PrefixView


@dataclass(frozen=True, eq=False)
class AggregationResult:
    """New global state produced by an aggregation rule.

    The model after the round applies, per module,
    ``W_new = W_base + ΔW_corr + s_g B_g A_g`` where ``W_base`` is the frozen
    weight the round started from, ``ΔW_corr = b_corr @ a_corr`` the
    optional base correction and ``(A_g, B_g, s_g)`` the global adapter.

    Parameters
    ----------
    strategy
        Registered name of the rule.
    global_factors
        The server's new global adapter per module. For FlexLoRA it is the
        factored ``ΔW*`` at full stacked rank with ``scale=1.0``.
    base_correction
        Low-rank factors with ``scale=1.0`` to merge into the frozen base
        weights (FLoRA, FedEx-LoRA); empty for rules that leave the base alone.
    lora_alpha
        ``lora_alpha`` used for global and client scales.
    rslora
        Whether scales follow rsLoRA.
    client_view
        What a client of a given rank receives; see :mod:`fedlora.aggregation.views`.
    frozen
        Factors (``"a"``, ``"b"``) the rule froze this round: every client left them as
        received (RoLoRA's untrained factor, FFA-LoRA's A). Server optimizers leave them alone.
    """

    strategy: str
    global_factors: Mapping[str, LoraFactors]
    base_correction: Mapping[str, LoraFactors]
    lora_alpha: float
    rslora: bool
    client_view: ClientView = field(repr=False)
    frozen: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.frozen, frozenset) or not self.frozen <= {"a", "b"}:
            raise ValueError(f"frozen must be a frozenset of 'a' and/or 'b', got {self.frozen!r}")
        object.__setattr__(self, "global_factors", MappingProxyType(dict(self.global_factors)))
        object.__setattr__(self, "base_correction", MappingProxyType(dict(self.base_correction)))
        if unknown := sorted(set(self.base_correction) - set(self.global_factors)):
            raise ValueError(
                f"base_correction names modules without global factors: {unknown}; "
                "every corrected module needs a global adapter entry"
            )

    @property
    def modules(self) -> tuple[str, ...]:
        """Module names, sorted."""
        return tuple(sorted(self.global_factors))

    def effective_factors(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """Factors of the module's total update, scales folded in.

        Parameters
        ----------
        module
            Module name.

        Returns
        -------
        tuple[np.ndarray, np.ndarray]
            ``B_eff`` ``(m, R)`` and ``A_eff`` ``(R, n)`` in float64 with
            ``B_eff @ A_eff == effective_delta(module)``: the base correction's
            columns first, then the global adapter's.
        """
        if module not in self.global_factors:
            raise KeyError(f"unknown module {module!r}; modules are {list(self.modules)}")
        parts = [self.global_factors[module]]
        if module in self.base_correction:
            parts.insert(0, self.base_correction[module])
        b = np.concatenate([f.scale * f.b.astype(np.float64) for f in parts], axis=1)  # (m, R)
        a = np.concatenate([f.a.astype(np.float64) for f in parts], axis=0)  # (R, n)
        return b, a

    def effective_delta(self, module: str) -> np.ndarray:
        """Dense ``ΔW`` the new global model applies relative to the round's base.

        Includes the base correction. Builds an ``(m, n)`` float64 matrix:
        for tests and diagnostics on small layers only.
        """
        b, a = self.effective_factors(module)
        return b @ a

    def for_client(self, rank: int | Mapping[str, int]) -> dict[str, LoraFactors]:
        """Factors a client of LoRA rank ``rank`` should load.

        ``rank`` is the client's rank, or its rank per module (``module -> rank``); under a
        rank pattern each module's rank follows from the client's
        (:meth:`~fedlora.aggregation.patterns.ModulePattern.rank`).
        The returned scale is the client's own (``scale_for_rank(rank,
        lora_alpha, rslora)``, per module) and the factors are refolded so that
        ``scale · B @ A`` is what the rule intends that client to apply.
        Mixed-rank rules never return a component whose ``A`` row and ``B``
        column are both zero (its gradients would be exactly zero): see
        :mod:`fedlora.aggregation.views` for how such components are filled.
        """
        check_client_rank(rank)
        return self.client_view(rank if isinstance(rank, Mapping) else int(rank))

    def diagnostics(self, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
        """Aggregation error and effective rank per module.

        See :func:`fedlora.aggregation.diagnostics.round_diagnostics`.
        """
        return round_diagnostics(updates, self)


def prefix_result(
    strategy: str,
    global_factors: Mapping[str, LoraFactors],
    context: RoundContext,
    *,
    split: str = "b",
    fixed_rank: bool = True,
    base_correction: Mapping[str, LoraFactors] | None = None,
    frozen: frozenset[str] = frozenset(),
) -> AggregationResult:
    """Result whose clients receive (a rank-r prefix of) the global factors.

    Parameters
    ----------
    strategy
        Rule name.
    global_factors
        New global adapter at the global scale.
    context
        The round's context.
    split, fixed_rank
        How the :class:`~fedlora.aggregation.views.PrefixView` folds the scale into a
        client's factors, and whether it refuses any rank other than the global one.
    base_correction
        Optional factors to merge into the frozen base.
    frozen
        Factors the rule froze this round (see :class:`AggregationResult`).
    """
    return AggregationResult(
        strategy=strategy,
        global_factors=global_factors,
        base_correction=base_correction or {},
        lora_alpha=context.lora_alpha,
        rslora=context.rslora,
        client_view=PrefixView(
            factors=global_factors,
            lora_alpha=context.lora_alpha,
            rslora=context.rslora,
            split=split,
            fixed_rank=fixed_rank,
            strategy=strategy,
            seed=context.seed,
            pattern=context.pattern,
        ),
        frozen=frozen,
    )


def same_rank_result(
    strategy: str,
    global_factors: Mapping[str, LoraFactors],
    context: RoundContext,
    base_correction: Mapping[str, LoraFactors] | None = None,
    frozen: frozenset[str] = frozenset(),
) -> AggregationResult:
    """Result of an equal-rank rule: every client receives the global factors as they are
    (:func:`prefix_result` with a view that refuses any rank other than the global one)."""
    return prefix_result(strategy, global_factors, context, base_correction=base_correction,
                         frozen=frozen)
