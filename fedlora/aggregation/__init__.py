"""Pure, rank-aware aggregation rules for federated LoRA.

Client ``k`` sends, per LoRA module, ``A_k`` ``(r_k, n)``, ``B_k`` ``(m, r_k)``
and its scale ``s_k`` (``alpha / r_k``, or ``alpha / sqrt(r_k)`` under rsLoRA),
with ``n_k`` training examples. The exact target of a round is
``ΔW* = Σ_k p_k s_k B_k A_k`` with ``p_k = n_k / Σ n``; scales are always
folded in, so clients of different ranks combine correctly.

>>> result = aggregate("flexlora", updates)           # doctest: +SKIP
>>> result.for_client(8)                               # doctest: +SKIP

Rules (one module each, registered by name): ``fedit``, ``ffa``, ``fedsa``,
``rolora``, ``hetlora``, ``flora``, ``flexlora``, ``fedex``, ``robust``, ``fedsvd``,
``lora-fair``, ``raflora``. Everything here is numpy only, never mutates its inputs, and
sums in the order given.
"""

from fedlora.aggregation import (  # noqa: F401  (imported to register the rules)
    fedex,
    fedit,
    fedsa,
    fedsvd,
    ffa,
    flexlora,
    flora,
    hetlora,
    lora_fair,
    raflora,
    robust,
    rolora,
)
from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.diagnostics import aggregation_error, effective_rank, round_diagnostics
from fedlora.aggregation.errors import UnknownStrategyError, UpdateRejected
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.linalg import factored_svd
from fedlora.aggregation.registry import (
    StrategyInfo,
    aggregate,
    available_strategies,
    mixed_rank_strategies,
    register,
    requires_equal_ranks,
    strategy_info,
)
from fedlora.aggregation.result import AggregationResult
from fedlora.aggregation.scaling import scale_for_rank
from fedlora.aggregation.server_opt import ServerOptimizer, available_server_optimizers
from fedlora.aggregation.validation import validate_update
from fedlora.aggregation.weighting import weighted_mean

__all__ = [
    "AggregationResult",
    "ClientUpdate",
    "LoraFactors",
    "RoundContext",
    "ServerOptimizer",
    "StrategyInfo",
    "UnknownStrategyError",
    "UpdateRejected",
    "aggregate",
    "aggregation_error",
    "available_server_optimizers",
    "available_strategies",
    "effective_rank",
    "mixed_rank_strategies",
    "factored_svd",
    "register",
    "requires_equal_ranks",
    "round_diagnostics",
    "scale_for_rank",
    "strategy_info",
    "validate_update",
    "weighted_mean",
]
