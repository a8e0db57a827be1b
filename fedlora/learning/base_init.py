"""Base-dependent LoRA inits (``lora.init = pissa | pissa_niter_<k> | olora``), computed once
on the server with peft's own code; the residual base travels as a base correction
(:class:`~fedlora.federation.global_adapter.GlobalAdapter`, ``base_init``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedlora.errors import ConfigError
from fedlora.learning.lora import (
    LORA_A,
    AdapterSpec,
    adapter_arrays,
    base_shape,
    is_quantized,
    peft_config,
)


def base_dependent_init(model: Any, spec: AdapterSpec, task: str, seed: int = 0
                        ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """peft's own ``spec.init`` (PiSSA: Meng et al. 2024, arXiv 2404.02948, ``B0 A0 =
    V_r S_r U_rᵀ / s``; OLoRA: Büyükakyüz 2024, arXiv 2406.01775, ``B0 = Q_r``, ``A0 = R_r``
    of ``W = QR``) at rank ``spec.r`` on ``model``'s base, as ``module -> (A0, B0)``.

    peft computes it by rewriting each adapted base weight to ``W - s B0 A0``; here it runs on
    a temporary adapter and every weight is restored afterwards, so ``model`` keeps ``W`` and
    its active adapter: the residual travels as a base correction instead
    (:class:`~fedlora.federation.global_adapter.GlobalAdapter`). ``seed`` seeds the randomized
    SVD of ``pissa_niter_<k>``.
    """
    modules = sorted(k[: -len(LORA_A)] for k in adapter_arrays(model) if k.endswith(LORA_A))
    for module in modules:
        layer = model.get_submodule(module).base_layer
        if isinstance(layer, torch.nn.Embedding) or not torch.is_floating_point(layer.weight):
            raise ConfigError(f"lora.init = {spec.init}: {module} is a "
                              f"{'quantized layer' if is_quantized(layer) else 'embedding'}, "
                              f"which peft cannot initialise from the base; leave it out of "
                              f"lora.target-modules or set lora.init = default")
        if spec.init == "olora" and base_shape(layer)[2]:
            raise ConfigError(f"lora.init = olora: {module} stores its weight (in, out) "
                              f"(transformers' Conv1D), which peft's OLoRA does not transpose; "
                              f"use lora.init = pissa or default")
    saved = {m: model.get_submodule(m).base_layer.weight.detach().clone() for m in modules}
    config = peft_config(spec, task)
    config.init_lora_weights = spec.init
    active = model.active_adapter
    name = "fedlora-base-init"
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model.add_adapter(name, config)
        out = {}
        for module in modules:
            sub = model.get_submodule(module)
            out[module] = (sub.lora_A[name].weight.detach().to("cpu", torch.float32).numpy().copy(),
                           sub.lora_B[name].weight.detach().to("cpu", torch.float32).numpy().copy())
            sub.base_layer.weight.data = saved[module]
        model.delete_adapter(name)
    model.set_adapter(active)
    return out
