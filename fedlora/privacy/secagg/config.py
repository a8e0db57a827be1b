"""Configuration of secure aggregation and the strategy compatibility matrix.

:class:`SecAggConfig` is shared by the server and every client (it travels in
the run config). Per round, :meth:`SecAggConfig.resolve` turns it into the
concrete neighbourhood size ``k`` and reconstruction threshold ``t`` for the
``n`` clients that advertised keys.

Thresholds are counted in a client's *share group*: its ``k`` neighbours plus
itself (each client keeps one share of its own secrets, as in Bonawitz et al.
2017, which tolerates one more dropout). A secret is recoverable from any ``t``
of the ``k + 1`` shares, and ``t`` must be a strict majority of the group so
that two disjoint sets of clients can never both reconstruct a secret.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedlora.errors import ConfigError
from fedlora.privacy.secagg.graph import resolve_degree
from fedlora.privacy.secagg.params import (
    CORRECTNESS_BITS,
    SECURITY_BITS,
    GraphChoice,
    bounds,
    choose_parameters,
)

#: Rules whose aggregate is a weighted sum of client vectors, with how to run them securely.
COMPATIBLE: dict[str, str] = {
    "fedit": "A and B are weighted means: clients upload w_k·A_k, w_k·B_k and w_k",
    "ffa": "only B is aggregated (A stays frozen at the shared seeded init)",
    "fedsa": "only A is aggregated; each B_k stays on its client",
    "rolora": "the factor trained this round (A or B) is a weighted mean",
    "fedsvd": (
        "only B is aggregated (A is what the server sent); the server takes the SVD of the "
        "decoded mean B̄ times that A"
    ),
    "hetlora": (
        "clients zero-pad to r_max, pre-scale their factors by their own weight "
        "(‖s_k B_k A_k‖_F, times n_k if weighting by examples) and the weights are summed "
        "securely as the normaliser"
    ),
}

#: Rules that need individual client factors, which secure aggregation hides by design.
INCOMPATIBLE: dict[str, str] = {
    "flora": "it stacks every client's individual factors into the global adapter",
    "flexlora": "it needs each client's product s_k B_k A_k to form ΔW* before its SVD",
    "fedex": "its residual Σ p_k s_k B_k A_k − s·B̄Ā needs each client's product B_k A_k",
    "robust": "its median / trimmed mean is taken over each client's own ΔW_k",
    "raflora": "its band-wise means and SVD allocation need each client's product s_k B_k A_k",
    "lora-fair": "its correction ΔB needs Σ p_k B_k (A_k Āᵀ), each client's B_k next to its A_k",
}


def secagg_compatible(strategy_name: str) -> tuple[bool, str]:
    """Whether aggregation rule ``strategy_name`` can run under secure aggregation.

    Returns
    -------
    tuple[bool, str]
        ``(True, how)`` for a compatible rule, ``(False, why)`` otherwise; the
        reason names the compatible rules so the user can switch.
    """
    choices = ", ".join(sorted(COMPATIBLE))
    if strategy_name in COMPATIBLE:
        return True, f"{strategy_name} works with secure aggregation: {COMPATIBLE[strategy_name]}"
    if strategy_name in INCOMPATIBLE:
        return False, (
            f"{strategy_name} cannot run with secure aggregation because "
            f"{INCOMPATIBLE[strategy_name]}, and the server only learns the sum; "
            f"use one of {choices}, or turn secure aggregation off"
        )
    return False, (
        f"unknown strategy {strategy_name!r} has no secure-aggregation support; "
        f"compatible strategies: {choices}"
    )


@dataclass(frozen=True)
class GroupParameters:
    """Per-round sizes derived from :class:`SecAggConfig` and the number of clients.

    Parameters
    ----------
    num_clients
        Clients that advertised keys (``n``); also fixes the fixed-point step.
    neighbours
        Neighbours per client (``k``); ``n − 1`` means full SecAgg.
    threshold
        Shares needed to reconstruct a secret (``t``), ``(k + 1) / 2 < t ≤ k + 1``.
    """

    num_clients: int
    neighbours: int
    threshold: int

    @property
    def group_size(self) -> int:
        """Holders of each client's shares: its neighbours and itself (``k + 1``)."""
        return self.neighbours + 1


@dataclass(frozen=True)
class SecAggConfig:
    """Secure-aggregation settings, identical on the server and on every client.

    Parameters
    ----------
    threshold
        Shares needed to reconstruct a client's secrets (``t``). ``None`` uses the
        smallest safe value, a strict majority of the share group
        (``⌊(k + 1)/2⌋ + 1``), which tolerates the most dropouts; it is fixed
        from the clients that advertise keys, so only later stages can fall
        below it. An explicit value must be ≥ 2 and a strict majority of the
        group, and also aborts a round where fewer clients advertise keys.
    neighbours
        Neighbours each client masks with (``k``). ``None`` derives ``k`` (and, with
        ``threshold=None``, ``t``) from ``gamma`` and ``delta`` by Bell et al. 2020's
        bounds (:mod:`fedlora.privacy.secagg.params`); any value ≥ ``n − 1`` gives full SecAgg.
    clip_range
        Every coordinate is clipped to ``[-clip_range, clip_range]`` before
        fixed-point encoding; the quantisation step grows with it.
    max_weight
        Largest per-client weight (e.g. example count); weights are divided by
        it so that weighted inputs stay within the clip range.
    gamma
        Fraction of clients assumed to collude with the server (``γ``), in ``[0, 1)``.
    delta
        Fraction of clients assumed to drop out during a round (``δ``), in ``[0, 1)``.
    """

    threshold: int | None = None
    neighbours: int | None = None
    clip_range: float = 8.0
    max_weight: float = 10_000.0
    gamma: float = 1 / 3
    delta: float = 0.1

    def __post_init__(self) -> None:
        for name in ("gamma", "delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    0 <= value < 1):
                raise ConfigError(
                    f"secagg {name} must be a fraction in [0, 1), got {value!r}; it is the "
                    f"share of clients assumed to {'collude' if name == 'gamma' else 'drop out'}"
                )
        _check_optional_int("threshold", self.threshold, minimum=2)
        _check_optional_int("neighbours", self.neighbours, minimum=1)
        _check_positive_float("clip_range", self.clip_range)
        _check_positive_float("max_weight", self.max_weight)
        if self.threshold is not None and self.neighbours is not None:
            group = self.neighbours + 1
            if 2 * self.threshold <= group:
                raise ConfigError(
                    f"secagg threshold={self.threshold} is not a strict majority of the share "
                    f"group of {group} (neighbours={self.neighbours} plus the client itself); "
                    f"use threshold ≥ {group // 2 + 1}, fewer neighbours, or threshold=None"
                )
            if self.threshold > group:
                raise ConfigError(
                    f"secagg threshold={self.threshold} exceeds the share group of {group} "
                    f"(neighbours={self.neighbours} plus the client itself); "
                    f"use threshold ≤ {group} or more neighbours"
                )

    def resolve(self, num_clients: int) -> GroupParameters:
        """Concrete ``k`` and ``t`` for a round with ``num_clients`` key holders.

        Raises
        ------
        ConfigError
            An explicit threshold that is not a majority of the resolved group
            (possible when ``neighbours`` is ``None`` and ``n`` grows).
        ValueError
            Fewer than 2 clients, or a threshold larger than the group: the
            caller reports this as "too few clients" for the round.
        """
        if num_clients < 2:
            raise ValueError(f"secure aggregation needs at least 2 clients, got {num_clients}")
        if self.neighbours is None:
            choice = choose_parameters(num_clients, self.gamma, self.delta)
            degree, default_threshold = choice.neighbours, choice.threshold
        else:
            degree = resolve_degree(num_clients, self.neighbours)
            default_threshold = (degree + 1) // 2 + 1
        group = degree + 1
        threshold = default_threshold if self.threshold is None else self.threshold
        if 2 * threshold <= group:
            raise ConfigError(
                f"secagg threshold={threshold} is not a strict majority of the share group of "
                f"{group} ({degree} neighbours among {num_clients} clients, plus the client "
                f"itself); use threshold=None (majority) or set neighbours ≤ {2 * threshold - 2}"
            )
        if threshold > group:
            raise ValueError(
                f"threshold {threshold} needs share groups of at least {threshold} clients, but "
                f"{num_clients} clients give groups of {group}"
            )
        return GroupParameters(num_clients=num_clients, neighbours=degree, threshold=threshold)

    def assess(self, num_clients: int) -> GraphChoice:
        """The resolved ``k`` and ``t`` for ``num_clients`` with their exposure and failure
        bounds under ``gamma`` and ``delta`` (for the start-up log)."""
        group = self.resolve(num_clients)
        choice = choose_parameters(num_clients, self.gamma, self.delta)
        exposure, failure = bounds(num_clients, group.neighbours, group.threshold,
                                   choice.colluders, choice.dropouts)
        meets = exposure <= 2.0**-SECURITY_BITS and failure <= 2.0**-CORRECTNESS_BITS
        return GraphChoice(num_clients, group.neighbours, group.threshold, choice.colluders,
                           choice.dropouts, exposure, failure, meets)


def _check_optional_int(name: str, value: object, *, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"secagg {name} must be None or an int ≥ {minimum}, got {value!r}; "
            f"set it to an integer ≥ {minimum} or leave it unset for the default"
        )


def _check_positive_float(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ConfigError(f"secagg {name} must be a finite number > 0, got {value!r}")
