"""FedSA-LoRA: share A, keep B personal (Guo et al. 2024, arXiv 2410.01463).

A learns general knowledge and is shared; B captures client-specific
knowledge and stays on its client (in the client's persistent state)::

    Ā = Σ_k p_k A_k                   # (r, n), sent to every client
    B̄ = Σ_k p_k (s_k / s_g) B_k       # (m, r), NOT sent to clients that hold a personal B

The server-side numbers coincide with FedIT; the difference is on the client,
which loads only ``Ā`` and keeps its own ``B_k``. ``global_factors`` and
``effective_delta`` use ``(Ā, B̄, s_g)`` as the reference global model (e.g. for
evaluating a server-side model); ``for_client(r)`` returns ``Ā`` and ``B̄``,
where ``B̄`` is meant only for clients that have no personal B yet. Not exact
(the true model is personalised). All clients must share one rank.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.factors import ClientUpdate
from fedlora.aggregation.fedit import factorwise_mean
from fedlora.aggregation.registry import register
from fedlora.aggregation.result import AggregationResult, same_rank_result


@register("fedsa", equal_ranks=True, exact=False, linear=True, modifies_base=False)
def fedsa(updates: Sequence[ClientUpdate], context: RoundContext) -> AggregationResult:
    """Shared mean A, reference mean B (see module docstring)."""
    return same_rank_result("fedsa", factorwise_mean(updates, context), context)
