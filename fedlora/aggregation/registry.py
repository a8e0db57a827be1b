"""Registry of aggregation rules and the :func:`aggregate` entry point.

A rule is a pure function ``rule(updates, context, *, option=default, …)``
returning an :class:`~fedlora.aggregation.result.AggregationResult`; it is
registered next to its implementation with :func:`register`. Its
keyword-only parameters are its options: :func:`aggregate` rejects any
other option (besides the common ones) with a :class:`TypeError` listing the
valid names, validates the updates, resolves the common options into a
:class:`~fedlora.aggregation.context.RoundContext` and calls the rule.

Common options, accepted by every rule:

``lora_alpha: float | None = None``
    Global ``lora_alpha``; ``None`` infers ``s·r`` (``s·sqrt(r)`` under
    rsLoRA) from the first update.
``rslora: bool = False``
    Scales are ``alpha / sqrt(r)``.
``seed: int = 0``
    Seed for fresh random initialisations (pass a per-round value).
``max_rank: int | None = None``
    Reject updates above this rank.
``pattern: ModulePattern | None = None``
    Per-module ranks and alphas (:mod:`fedlora.aggregation.patterns`): module scales use
    each module's alpha, and a client of rank ``r`` receives each module at its own rank.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from fedlora.aggregation.context import build_context, check_common_options
from fedlora.aggregation.errors import UnknownStrategyError
from fedlora.aggregation.factors import ClientUpdate
from fedlora.aggregation.result import AggregationResult
from fedlora.aggregation.validation import validate_round

COMMON_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {"lora_alpha": None, "rslora": False, "seed": 0, "max_rank": None, "pattern": None}
)
REQUIRED = inspect.Parameter.empty
_NAME = re.compile(r"[a-z][a-z0-9_]*(-[a-z0-9_]+)*")


R = TypeVar("R", bound=Callable[..., AggregationResult])


@dataclass(frozen=True)
class StrategyInfo:
    """Properties of a registered rule, for compatibility checks.

    Parameters
    ----------
    name
        Registered name.
    equal_ranks
        All clients must share one rank per module.
    exact
        ``effective_delta == Σ p_k s_k B_k A_k`` (FlexLoRA: before the
        per-client truncation; RoLoRA: per round).
    linear
        The global factors are weighted means of client factors, so secure
        aggregation and server optimizers apply.
    modifies_base
        The result carries a base correction to merge into frozen weights.
    refactors
        The server step re-factorises the weighted mean of the uploads (FedSVD): the mean
        is all it needs, so secure aggregation and DP apply, but the global factors are
        not that mean, so server optimizers do not.
    options
        Rule-specific option names and defaults (``REQUIRED`` when none).
    """

    name: str
    equal_ranks: bool
    exact: bool
    linear: bool
    modifies_base: bool
    options: Mapping[str, Any]
    refactors: bool = False


_RULES: dict[str, tuple[Callable[..., AggregationResult], StrategyInfo]] = {}


def register(
    name: str,
    *,
    equal_ranks: bool = False,
    exact: bool = False,
    linear: bool = False,
    modifies_base: bool = False,
    refactors: bool = False,
) -> Callable[[R], R]:
    """Decorator registering an aggregation rule under ``name``.

    Parameters
    ----------
    name
        Lower-case identifier (words may be joined by "-", as in "lora-fair"), unique in
        the registry.
    equal_ranks, exact, linear, modifies_base, refactors
        Rule properties, see :class:`StrategyInfo`.

    Returns
    -------
    Callable
        Decorator returning the rule unchanged.

    Raises
    ------
    ValueError
        On an invalid or already registered name, ``refactors`` without ``linear``, or a
        rule whose options clash with the common ones or are not keyword-only.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"strategy names are lower-case identifiers like 'fedit' or 'lora-fair', "
                         f"got {name!r}")
    if refactors and not linear:
        raise ValueError(f"rule {name!r}: refactors=True re-factorises a weighted mean of the "
                         f"uploads, so the rule must also be linear=True")

    def decorator(rule: R) -> R:
        if name in _RULES:
            raise ValueError(
                f"aggregation strategy {name!r} is already registered "
                f"(by {_RULES[name][0].__module__}); pick another name"
            )
        _RULES[name] = (
            rule,
            StrategyInfo(
                name=name,
                equal_ranks=equal_ranks,
                exact=exact,
                linear=linear,
                modifies_base=modifies_base,
                options=MappingProxyType(_rule_options(name, rule)),
                refactors=refactors,
            ),
        )
        return rule

    return decorator


def available_strategies() -> tuple[str, ...]:
    """Registered rule names, sorted."""
    return tuple(sorted(_RULES))


def strategy_info(name: str) -> StrategyInfo:
    """Properties of the rule ``name``; raises :class:`UnknownStrategyError`."""
    return _lookup(name)[1]


def requires_equal_ranks(name: str) -> bool:
    """Whether rule ``name`` needs every client at the same rank."""
    return strategy_info(name).equal_ranks


def mixed_rank_strategies() -> tuple[str, ...]:
    """Registered rules that accept clients of different ranks, sorted."""
    return tuple(name for name in available_strategies() if not requires_equal_ranks(name))


def aggregate(name: str, updates: Sequence[ClientUpdate], **options: Any) -> AggregationResult:
    """Aggregate one round of client updates with rule ``name``.

    Parameters
    ----------
    name
        A registered rule, see :func:`available_strategies`.
    updates
        Client updates in a fixed order chosen by the caller (e.g. sorted by
        partition id); float sums follow this order. Never mutated.
    **options
        Common options (``lora_alpha``, ``rslora``, ``seed``, ``max_rank``)
        and the rule's own keyword-only options.

    Returns
    -------
    AggregationResult

    Raises
    ------
    UnknownStrategyError
        ``name`` is not registered.
    TypeError
        An option the rule does not declare, or a required one is missing.
    UpdateRejected
        An update is malformed or inconsistent with the first one.
    ValueError
        Mixed ranks given to an equal-rank rule, or bad option values.
    """
    rule, info = _lookup(name)
    valid = [*COMMON_OPTIONS, *info.options]
    if unknown := sorted(set(options) - set(valid)):
        raise TypeError(
            f"aggregation strategy {name!r} got unknown option(s) {unknown}; "
            f"valid options: {', '.join(valid)}"
        )
    if missing := [k for k, v in info.options.items() if v is REQUIRED and k not in options]:
        raise TypeError(f"aggregation strategy {name!r} requires option(s) {missing}")
    common = {k: options.get(k, default) for k, default in COMMON_OPTIONS.items()}
    specific = {k: v for k, v in options.items() if k not in COMMON_OPTIONS}
    check_common_options(**common)
    updates = tuple(updates)
    shapes = validate_round(updates, max_rank=common["max_rank"])
    if info.equal_ranks:
        _check_equal_ranks(name, updates, shapes)
    context = build_context(updates, shapes, **common)
    return rule(updates, context, **specific)


def _lookup(name: str) -> tuple[Callable[..., AggregationResult], StrategyInfo]:
    if name not in _RULES:
        raise UnknownStrategyError(name, _RULES)
    return _RULES[name]


def _rule_options(name: str, rule: Callable[..., AggregationResult]) -> dict[str, Any]:
    params = list(inspect.signature(rule).parameters.values())
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    others = [p for p in params if p not in positional]
    if len(positional) != 2 or any(p.kind != inspect.Parameter.KEYWORD_ONLY for p in others):
        raise ValueError(
            f"rule {name!r} must have the signature (updates, context, *, option=default, ...); "
            f"got {inspect.signature(rule)}"
        )
    if clash := sorted(p.name for p in others if p.name in COMMON_OPTIONS):
        raise ValueError(
            f"rule {name!r} redeclares common option(s) {clash}; read them from the context"
        )
    return {p.name: p.default for p in others}


def _check_equal_ranks(
    name: str, updates: Sequence[ClientUpdate], shapes: Mapping[str, tuple[int, int]]
) -> None:
    for module in sorted(shapes):
        ranks = [u.factors[module].rank for u in updates]
        if len(set(ranks)) > 1:
            mixed = [n for n, (_, info) in sorted(_RULES.items()) if not info.equal_ranks]
            clients = [
                f"{u.client_id if u.client_id is not None else i}: r={r}"
                for i, (u, r) in enumerate(zip(updates, ranks, strict=True))
            ]
            raise ValueError(
                f"{name} requires every client to use the same LoRA rank, but module "
                f"{module!r} arrived with ranks {sorted(set(ranks))} ({', '.join(clients)}); "
                f"configure one rank for all clients, or use a rule that accepts mixed "
                f"ranks: {', '.join(mixed)}"
            )
