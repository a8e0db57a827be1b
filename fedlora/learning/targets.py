"""Which layers of a model LoRA adapts: the candidates, the heads kept out, the checks of
``lora.target-modules`` and of the rank/alpha patterns against the real module names."""

from __future__ import annotations

from typing import Any

import torch

from fedlora.errors import ConfigError

HEAD_MODULES = ("classifier", "score", "lm_head")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the layers LoRA can adapt (the candidates for ``target_modules``)."""
    from transformers.pytorch_utils import Conv1D

    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.Linear | Conv1D)}
    return sorted(names)


def check_targets(model: torch.nn.Module, spec: Any) -> None:
    """Refuse target modules (and rank/alpha pattern keys) that name no module of ``model``
    (``spec``: a :class:`fedlora.learning.lora.AdapterSpec`)."""
    candidates = linear_module_names(model)
    module_names = [name for name, _ in model.named_modules()]
    if spec.target_modules != "all-linear":
        missing = [t for t in spec.target_modules
                   if not any(n == t or n.endswith("." + t) for n in module_names)]
        if missing:
            raise ConfigError(
                f"lora.target-modules {missing} are not modules of this model; candidates: "
                f"{', '.join(candidates)}"
            )
    if spec.rank_pattern or spec.alpha_pattern:
        _check_patterns(model, spec)


def _check_patterns(model: torch.nn.Module, spec: Any) -> None:
    """Every rank/alpha pattern key must match a module LoRA adapts (else peft ignores it)."""
    from transformers.pytorch_utils import Conv1D

    from fedlora.aggregation.patterns import match_key

    linear, targets = (torch.nn.Linear, Conv1D), spec.target_modules
    adapted = [n for n, m in model.named_modules() if (
        isinstance(m, linear) and n.rsplit(".", 1)[-1] not in HEAD_MODULES
        if targets == "all-linear" else any(n == t or n.endswith("." + t) for t in targets))]
    for label, pattern in (("rank", spec.rank_pattern), ("alpha", spec.alpha_pattern)):
        unknown = [k for k, _ in pattern if not any(match_key([k], n) for n in adapted)]
        if unknown:
            raise ConfigError(
                f"lora.{label}-pattern keys {unknown} match none of the adapted modules "
                f"(lora.target-modules = {spec.target_modules!r}, e.g. "
                f"{', '.join(adapted[:3])}); name a suffix of one of them, like "
                f"{adapted[0].rsplit('.', 1)[-1]!r}")
