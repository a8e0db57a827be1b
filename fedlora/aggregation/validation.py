"""Validation of client updates before aggregation.

Every check compares exact shapes — nothing is ever broadcast — and raises
:class:`~fedlora.aggregation.errors.UpdateRejected` with a reason code, so a
server can drop one bad client instead of aborting the run.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from fedlora.aggregation.errors import UpdateRejected
from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.patterns import ModulePattern, module_rank

_LAYOUT_HINT = (
    "send lora_A as (r, in_features) and lora_B as (out_features, r) with the same r, "
    "exactly as the PEFT model stores them (arrays are never broadcast)"
)


def validate_update(
    update: ClientUpdate,
    expected: Mapping[str, tuple[int, int]],
    *,
    max_rank: int | None,
    declared_rank: int | Mapping[str, int] | None = None,
    pattern: ModulePattern | None = None,
) -> None:
    """Check one client update against the expected module shapes.

    Parameters
    ----------
    update
        The client's update.
    expected
        ``module -> (out_features, in_features)`` of the model being trained.
    max_rank
        Largest rank the server accepts; ``None`` for no limit.
    declared_rank
        The rank the client announced (e.g. from its node config); every
        module must have exactly this rank when given (under ``pattern``, the
        module's rank for a client of that rank; a mapping gives each module's).
    pattern
        Per-module ranks (:mod:`fedlora.aggregation.patterns`), or ``None``.

    Raises
    ------
    UpdateRejected
        With ``reason`` one of ``BAD_EXAMPLE_COUNT``, ``MISSING_MODULES``,
        ``EXTRA_MODULES``, ``BAD_DTYPE``, ``SHAPE_MISMATCH``,
        ``RANK_TOO_LARGE``, ``RANK_MISMATCH``, ``BAD_SCALE``, ``NON_FINITE``.
    """
    client_id = update.client_id
    _check_num_examples(update.num_examples, client_id)
    got, want = set(update.factors), set(expected)
    if missing := sorted(want - got):
        raise UpdateRejected(
            "MISSING_MODULES",
            f"expected factors for {len(want)} modules, {len(missing)} are missing: "
            f"{missing}; send every LoRA module of the global adapter",
            client_id=client_id,
        )
    if extra := sorted(got - want):
        raise UpdateRejected(
            "EXTRA_MODULES",
            f"got factors for {len(extra)} modules the global adapter does not have: "
            f"{extra}; train with the server's target_modules",
            client_id=client_id,
        )
    for module in sorted(expected):
        _check_module(
            module,
            update.factors[module],
            expected[module],
            max_rank=max_rank,
            declared_rank=None if declared_rank is None
            else module_rank(pattern, module, declared_rank),
            client_id=client_id,
        )


def validate_round(
    updates: Sequence[ClientUpdate], *, max_rank: int | None
) -> dict[str, tuple[int, int]]:
    """Validate a round's updates against each other.

    The first update defines the module set and the ``(out, in)`` shapes;
    every update (the first included) is then checked with
    :func:`validate_update`.

    Parameters
    ----------
    updates
        The round's updates, in aggregation order.
    max_rank
        Largest accepted rank, or ``None``.

    Returns
    -------
    dict[str, tuple[int, int]]
        ``module -> (out_features, in_features)``.
    """
    if len(updates) == 0:
        raise ValueError("aggregation needs at least one client update, got none")
    first = updates[0]
    if len(first.factors) == 0:
        raise UpdateRejected(
            "MISSING_MODULES",
            "the update holds no LoRA modules; send at least one module's factors",
            client_id=first.client_id,
        )
    expected: dict[str, tuple[int, int]] = {}
    for module, factors in first.factors.items():
        for label, array in (("lora_A", factors.a), ("lora_B", factors.b)):
            _check_array_kind(module, label, array, first.client_id)
        expected[module] = (int(factors.b.shape[0]), int(factors.a.shape[1]))
    for update in updates:
        validate_update(update, expected, max_rank=max_rank)
    return expected


def check_shared_factor(
    factors: Sequence[LoraFactors],
    which: Literal["a", "b"],
    *,
    module: str,
    client_ids: Sequence[str | None],
    rule: str,
    rtol: float,
) -> None:
    """Check that a factor meant to be frozen is the same on every client.

    Parameters
    ----------
    factors
        One module's factors, one per client, in aggregation order.
    which
        ``"a"`` for ``lora_A``, ``"b"`` for ``lora_B``.
    module
        Module name, for the message.
    client_ids
        Client identifiers aligned with ``factors``.
    rule
        Name of the rule that requires the factor to be frozen.
    rtol
        Allowed ``max|X_k - X_1| / max|X_1|``.

    Raises
    ------
    UpdateRejected
        ``FROZEN_FACTOR_MISMATCH`` naming the first client that differs.
    """
    label = "lora_A" if which == "a" else "lora_B"
    reference = np.asarray(getattr(factors[0], which), dtype=np.float64)
    bound = rtol * max(float(np.max(np.abs(reference))), np.finfo(np.float64).tiny)
    for item, client_id in zip(factors[1:], client_ids[1:], strict=True):
        array = np.asarray(getattr(item, which), dtype=np.float64)
        deviation = float(np.max(np.abs(array - reference)))
        if deviation > bound:
            raise UpdateRejected(
                "FROZEN_FACTOR_MISMATCH",
                f"{rule} keeps {label} of module {module!r} frozen and identical on all "
                f"clients, but this client's differs from the first client's by "
                f"{deviation:.3g} (allowed {bound:.3g}); send the {label} the server "
                f"distributed, unchanged",
                client_id=client_id,
                module=module,
            )


def _check_num_examples(num_examples: object, client_id: str | None) -> None:
    valid_type = isinstance(num_examples, numbers.Integral) and not isinstance(num_examples, bool)
    if not valid_type or int(num_examples) <= 0:  # type: ignore[call-overload]
        raise UpdateRejected(
            "BAD_EXAMPLE_COUNT",
            f"num_examples must be a positive integer, got {num_examples!r} "
            f"({type(num_examples).__name__}); report the number of local training examples",
            client_id=client_id,
        )


def _check_array_kind(module: str, label: str, array: object, client_id: str | None) -> None:
    if not isinstance(array, np.ndarray):
        raise UpdateRejected(
            "BAD_DTYPE",
            f"module {module!r}: {label} must be a numpy array, got {type(array).__name__}; "
            "decode the payload to numpy before aggregation",
            client_id=client_id,
            module=module,
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise UpdateRejected(
            "BAD_DTYPE",
            f"module {module!r}: {label} must have a floating dtype "
            f"(float16/float32/float64), got {array.dtype}; cast the factors to float32",
            client_id=client_id,
            module=module,
        )
    if array.ndim != 2:
        raise UpdateRejected(
            "SHAPE_MISMATCH",
            f"module {module!r}: {label} must be 2-D, got shape {array.shape}; {_LAYOUT_HINT}",
            client_id=client_id,
            module=module,
        )


def _check_module(
    module: str,
    factors: LoraFactors,
    expected: tuple[int, int],
    *,
    max_rank: int | None,
    declared_rank: int | None,
    client_id: str | None,
) -> None:
    a, b = factors.a, factors.b
    _check_array_kind(module, "lora_A", a, client_id)
    _check_array_kind(module, "lora_B", b, client_id)
    out_features, in_features = expected
    rank = a.shape[0]
    if a.shape[1] != in_features or b.shape != (out_features, rank) or rank == 0:
        raise UpdateRejected(
            "SHAPE_MISMATCH",
            f"module {module!r}: expected lora_A (r, {in_features}) and lora_B "
            f"({out_features}, r) with the same rank r >= 1, got lora_A {a.shape} and "
            f"lora_B {b.shape}; {_LAYOUT_HINT}",
            client_id=client_id,
            module=module,
        )
    if max_rank is not None and rank > max_rank:
        raise UpdateRejected(
            "RANK_TOO_LARGE",
            f"module {module!r}: rank {rank} exceeds the server's max_rank {max_rank}; "
            f"train with r <= {max_rank}",
            client_id=client_id,
            module=module,
        )
    if declared_rank is not None and rank != declared_rank:
        raise UpdateRejected(
            "RANK_MISMATCH",
            f"module {module!r}: expected rank {declared_rank} (the client's declared rank, "
            f"through lora.rank-pattern when set) but got rank {rank}; send factors of the "
            f"declared rank or declare the rank this module was trained at",
            client_id=client_id,
            module=module,
        )
    scale = factors.scale
    if (
        isinstance(scale, bool)
        or not isinstance(scale, numbers.Real)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise UpdateRejected(
            "BAD_SCALE",
            f"module {module!r}: scale must be a positive finite number "
            f"(lora_alpha / r), got {scale!r}",
            client_id=client_id,
            module=module,
        )
    bad = int(np.size(a) - np.count_nonzero(np.isfinite(a))) + int(
        np.size(b) - np.count_nonzero(np.isfinite(b))
    )
    if bad:
        raise UpdateRejected(
            "NON_FINITE",
            f"module {module!r}: expected finite factors, got {bad} NaN/Inf entries; "
            "lower the learning rate or enable gradient clipping on this client",
            client_id=client_id,
            module=module,
        )


def check_tolerance(name: str, value: float) -> None:
    """Reject a tolerance option that is not a finite non-negative number."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
