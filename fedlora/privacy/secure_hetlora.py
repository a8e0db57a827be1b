"""HetLoRA under secure aggregation: client-side pre-scaling and securely summed normalisers.

The server of a secure round learns only ``Σ_k n_k x_k`` and ``Σ_k n_k`` (the protocol weight
is the example count ``n_k``). HetLoRA needs, per module ``m``, a norm-weighted mean of the
clients' factors zero-padded to a common rank (see :mod:`fedlora.aggregation.hetlora`)::

    w_km = ‖s_k B_k A_k‖_F  (× n_k with hetlora-weight-by-examples)
    Ā_m = Σ_k w_km [A_k; 0] / Σ_k w_km,   B̄_m = Σ_k w_km (s_k/s_g) [B_k, 0] / Σ_k w_km

Each client therefore uploads, for every module, its padded factors multiplied by
``c_km = g · w_km / n_k`` plus ``c_km`` itself as one extra coordinate. The protocol's weighting
by ``n_k`` turns those into ``g Σ_k w_km x_k`` and ``g Σ_k w_km``; :func:`unscale` divides one
by the other. ``g`` is a public gain the server sends with the round (:func:`gain`: the
inverse of the global adapter's largest module norm, which the client weights are close to) so
that the weighted coordinates span more of the fixed-point range. Heads keep the protocol's
example weighting. The server also sends the padding rank, the largest rank of the round's
sampled clients (as the plain rule pads), so all uploads share one layout.

Not bit-identical to the plain rule: the fixed-point encoding rounds. The error bound of a
factor coordinate (the codec's bound divided by the smallest normaliser) is reported as
``secagg_error_bound``; in round 1 the global adapter is still zero, ``g = 1``, and the bound is
looser (~2.7e-4 on the tiny test model against 2e-6 for FedIT).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.aggregation import LoraFactors, scale_for_rank
from fedlora.aggregation.linalg import factored_frobenius_norm
from fedlora.errors import PayloadError
from fedlora.learning.lora import LORA_A, LORA_B

NORMALISER = ".hetlora-weight"  # suffix of the per-module normaliser coordinate


def gain(global_factors: Mapping[str, LoraFactors]) -> float:
    """``g = 1 / max_m ‖ΔW_global,m‖_F`` (1 while the global adapter is still zero)."""
    norms = [factored_frobenius_norm(f.scale * np.asarray(f.b, np.float64),
                                     np.asarray(f.a, np.float64))
             for f in global_factors.values()]
    largest = max(norms, default=0.0)
    return 1.0 / largest if largest > 0 else 1.0


def prescale(arrays: Mapping[str, np.ndarray], num_examples: int, rank: int, max_rank: int,
             lora_alpha: float, rslora: bool = False, weight_by_examples: bool = False,
             gain: float = 1.0, clip_range: float | None = None) -> dict[str, np.ndarray]:
    """A client's upload: padded, norm-weighted factors, their normalisers, and its heads.

    Raises
    ------
    PayloadError
        ``CLIP_RANGE`` when a pre-scaled coordinate would be clipped by the fixed-point
        encoding (``clip_range``), which would silently bias the mean.
    """
    if not 0 < rank <= max_rank:
        raise ValueError(f"rank {rank} is outside 1..max-rank {max_rank}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    s_k = scale_for_rank(rank, lora_alpha, rslora)
    s_g = scale_for_rank(max_rank, lora_alpha, rslora)
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if key.endswith(LORA_B):
            continue
        if not key.endswith(LORA_A):
            out[key] = np.asarray(value, np.float32)  # a head: the protocol weighs it by n_k
            continue
        module = key[: -len(LORA_A)]
        a = np.asarray(value, np.float64)
        b = np.asarray(arrays[module + LORA_B], np.float64)
        weight = factored_frobenius_norm(s_k * b, a) * (num_examples if weight_by_examples
                                                        else 1.0)
        c = gain * weight / num_examples
        padded_a = np.zeros((max_rank, a.shape[1]))
        padded_b = np.zeros((b.shape[0], max_rank))
        padded_a[:rank] = c * a
        padded_b[:, :rank] = (c * s_k / s_g) * b
        out[key] = padded_a.astype(np.float32)
        out[module + LORA_B] = padded_b.astype(np.float32)
        out[module + NORMALISER] = np.array([c], np.float32)
    if clip_range is not None:
        largest = max(float(np.max(np.abs(v))) for v in out.values())
        if largest > clip_range:
            raise PayloadError("CLIP_RANGE", f"a HetLoRA-weighted coordinate is {largest:.3g}, "
                               f"beyond secagg-clip-range {clip_range}; raise it")
    return out


def unscale(mean: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    """The securely aggregated mean → HetLoRA's padded global factors and the heads, and the
    smallest per-module normaliser (the codec's error bound divides by it).

    Raises
    ------
    PayloadError
        ``ZERO_NORMALISER`` when every client's update of a module had zero norm (no weighted
        mean exists; the round is abandoned).
    """
    out: dict[str, np.ndarray] = {}
    smallest = np.inf
    for key, value in mean.items():
        if key.endswith(NORMALISER):
            continue
        if key.endswith((LORA_A, LORA_B)):
            module = key[: -len(LORA_A if key.endswith(LORA_A) else LORA_B)]
            total = float(mean[module + NORMALISER][0])
            if not total > 0:
                raise PayloadError("ZERO_NORMALISER", f"the summed HetLoRA weight of {module} "
                                   f"is {total}: every client's update of it was zero")
            smallest = min(smallest, total)
            out[key] = (np.asarray(value, np.float64) / total).astype(np.float32)
        else:
            out[key] = np.asarray(value, np.float32)
    return out, float(smallest)
