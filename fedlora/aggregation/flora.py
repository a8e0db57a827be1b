"""FLoRA: stacking-based heterogeneous LoRA (Wang et al. 2024, arXiv 2409.05976).

Stacking the clients' factors gives the exact aggregate as a product::

    B_st = [p_1 s_1 B_1, …, p_K s_K B_K]      # (m, R), R = Σ r_k
    A_st = [A_1; …; A_K]                       # (R, n)
    B_st A_st = Σ_k p_k s_k B_k A_k = ΔW*

``(A_st, B_st, scale=1.0)`` is returned as a *base correction*: the server
and every client merge ``B_st @ A_st`` into their frozen weights, and the
new global adapter is a fresh PEFT-style init (``A ~ U(-1/sqrt(n), 1/sqrt(n))``,
``B = 0``) drawn from the ``seed`` option, so
``effective_delta = B_st A_st + s · 0 · A = ΔW*`` exactly. ``global_factors``
hold the fresh adapter at the round's largest client rank (per module); ``for_client(r)``
draws it at rank ``r`` (a prefix of any larger draw). Pass a different seed
each round. A client that skipped a round must still apply that round's
correction before loading the new adapter — the server keeps the
corrections it has not delivered yet. Mixed ranks allowed.

Code check (branch papers): the authors' code (ATP-1010/FederatedLLM,
``fed_utils/model_aggregation.py``) stacks ``p_k A_k`` along the rank axis and ``B_k``
unweighted (the same product), gives every client ``lora_alpha = 2 r_k`` so that all scales
are equal, loads the stacked adapter onto the global model and gives each client a fresh
PEFT adapter on top of it every round: the rule above, with ``s_k`` folded into ``B`` so that
unequal client scales are allowed too.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.aggregation.context import RoundContext
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.linalg import stack_factors
from fedlora.aggregation.registry import register
from fedlora.aggregation.result import AggregationResult
from fedlora.aggregation.views import FreshInitView


@register("flora", equal_ranks=False, exact=True, linear=False, modifies_base=True)
def flora(updates: Sequence[ClientUpdate], context: RoundContext) -> AggregationResult:
    """Stack the factors into a base correction; restart the adapter (see module docstring)."""
    base_correction = {}
    for module in context.modules:
        b, a = stack_factors(context.factors_of(updates, module), context.weights)  # (m, R), (R, n)
        base_correction[module] = LoraFactors(a=a, b=b, scale=1.0).astype(context.dtype)
    view = FreshInitView(
        shapes=context.shapes,
        lora_alpha=context.lora_alpha,
        rslora=context.rslora,
        seed=context.seed,
        dtype=context.dtype,
        pattern=context.pattern,
    )
    r_max = {m: max(f.rank for f in context.factors_of(updates, m)) for m in context.modules}
    return AggregationResult(
        strategy="flora",
        global_factors=view(r_max),
        base_correction=base_correction,
        lora_alpha=context.lora_alpha,
        rslora=context.rslora,
        client_view=view,
    )
