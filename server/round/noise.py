"""Stage "noise": central DP's Gaussian noise on the round's accepted updates."""

from __future__ import annotations

import dataclasses

from fedlora.aggregation import ClientUpdate, LoraFactors
from fedlora.privacy import dp as privacy
from server.round.replies import Accepted


def with_central_noise(item: Accepted, send: str, dp: privacy.DPSpec) -> Accepted:
    """Central DP: adding N(0, (σC)²) to one of k equally weighted updates adds exactly
    N(0, (σC/k)²) to their mean — the Gaussian mechanism on the sum of clipped updates."""
    noisy = {}
    for module, f in item.update.factors.items():
        pair = privacy.add_central_noise({"a": f.a, "b": f.b},
                                         [k for k in ("a", "b") if k in send], dp, k=1)
        noisy[module] = LoraFactors(a=pair["a"], b=pair["b"], scale=f.scale)
    heads = privacy.add_central_noise(item.heads, list(item.heads), dp, k=1)
    update = ClientUpdate(factors=noisy, num_examples=item.update.num_examples)
    return dataclasses.replace(item, update=update, heads=heads, record=None)


def noised(accepted: list[Accepted], send: str, dp: privacy.DPSpec) -> list[Accepted]:
    """The accepted updates, the first with the round's noise under ``dp-mode = 'central'``
    (the others, and every update without central DP, unchanged)."""
    if dp.mode != "central":
        return accepted
    return [with_central_noise(accepted[0], send, dp), *accepted[1:]]
