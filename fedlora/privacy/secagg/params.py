"""SecAgg+ neighbourhood size ``k`` and threshold ``t`` from collusion and dropout bounds.

Bell et al. 2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS)
pick ``k`` and ``t`` so that, for at most a fraction ``γ`` of clients colluding with the
server and a fraction ``δ`` dropping out, two bad events have small probability over the
random neighbour graph:

* **exposure** (security): an honest client ``u`` has ``t`` or more colluding neighbours.
  They then hold ``t`` shares of both ``b_u`` and ``s_u^SK`` and, with the server, unmask
  ``u``'s input;
* **failure** (correctness): a client keeps fewer than ``t`` surviving neighbours, so its
  secrets cannot be rebuilt and the round aborts.

Here, with ``c = ⌈γ n⌉`` colluders and ``m = ⌈δ n⌉`` dropouts among ``n`` clients: a client's
``k`` neighbours on the randomly relabelled circulant graph (:mod:`fedlora.privacy.secagg.graph`)
are a uniform ``k``-subset of the other ``n − 1``, so the colluders among an honest client's
neighbours follow ``X ~ Hypergeometric(n − 1, c, k)`` and the dropouts among a client's
neighbours ``Y ~ Hypergeometric(n − 1, m, k)``. By the union bound over clients::

    P_exposure ≤ (n − c) · P(X ≥ t)          P_failure ≤ n · P(Y > k − t)

and :func:`choose_parameters` takes the smallest ``k`` (even when ``n`` is odd) for which some
``t`` — at least a strict majority ``⌊(k + 1)/2⌋ + 1`` of the share group, as the
double-reveal defence needs — meets ``P_exposure ≤ 2^−σ`` and ``P_failure ≤ 2^−η``, with the
smallest such ``t`` (most dropouts tolerated). Without one it falls back to the complete graph
(``k = n − 1``, classic SecAgg) with the smallest ``t`` that meets the exposure target, and
reports the failure probability it then has.

Deviations from Bell et al.: their Theorem bounds are asymptotic in ``n`` with an
Erdős–Rényi/Harary analysis; here the probabilities are evaluated exactly per client (a
hypergeometric tail) and combined with a union bound, so the reported values are upper
bounds. Bell et al.'s further condition, that the graph of honest survivors stays connected (else
the server learns the sums of its components), is not evaluated. The
failure bound does not credit a client's own share (conservative), and it counts only
dropouts, not colluders that withhold shares. ``σ = 40`` and ``η = 30`` are this project's
targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SECURITY_BITS = 40  # σ: target exposure probability 2^−σ
CORRECTNESS_BITS = 30  # η: target failure probability 2^−η


@dataclass(frozen=True)
class GraphChoice:
    """``k`` and ``t`` for ``n`` clients, with the bounds they give.

    Parameters
    ----------
    neighbours, threshold
        ``k`` and ``t``.
    colluders, dropouts
        ``c = ⌈γ n⌉`` and ``m = ⌈δ n⌉``.
    exposure, failure
        Union-bound probabilities that some honest client is exposed, and that some client's
        secrets cannot be rebuilt.
    meets_targets
        Whether both are within ``2^−σ`` and ``2^−η``.
    """

    num_clients: int
    neighbours: int
    threshold: int
    colluders: int
    dropouts: int
    exposure: float
    failure: float
    meets_targets: bool

    def describe(self) -> str:
        """One line for the start-up log."""
        return (
            f"SecAgg+ for n = {self.num_clients}: k = {self.neighbours} neighbours, threshold "
            f"t = {self.threshold}; with {self.colluders} colluding and {self.dropouts} "
            f"dropped client(s), P(an honest client exposed) ≤ {self.exposure:.3g}, "
            f"P(round fails) ≤ {self.failure:.3g}"
            + ("" if self.meets_targets else
               f" (above the targets 2^-{SECURITY_BITS} / 2^-{CORRECTNESS_BITS})")
        )


def hypergeometric_tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """``P(X ≥ at_least)`` for ``X ~ Hypergeometric(population, marked, draws)``."""
    low, high = max(0, draws - (population - marked)), min(marked, draws)
    if at_least <= low:
        return 1.0
    if at_least > high:
        return 0.0
    log_total = _log_comb(population, draws)
    return min(1.0, sum(
        math.exp(_log_comb(marked, x) + _log_comb(population - marked, draws - x) - log_total)
        for x in range(at_least, high + 1)
    ))


def bounds(num_clients: int, neighbours: int, threshold: int, colluders: int,
           dropouts: int) -> tuple[float, float]:
    """Union bounds ``(P_exposure, P_failure)`` for one ``(k, t)`` (see the module doc)."""
    others = num_clients - 1
    exposure = (num_clients - colluders) * hypergeometric_tail(
        others, colluders, neighbours, threshold)
    failure = num_clients * hypergeometric_tail(
        others, dropouts, neighbours, neighbours - threshold + 1)
    return min(1.0, exposure), min(1.0, failure)


def choose_parameters(num_clients: int, gamma: float, delta: float) -> GraphChoice:
    """The smallest ``k`` (and its smallest ``t``) that meets both targets; see the module doc.

    Parameters
    ----------
    num_clients
        ``n ≥ 2``.
    gamma, delta
        Fractions of colluding and of dropped clients, each in ``[0, 1)``.
    """
    if num_clients < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {num_clients}")
    colluders = min(num_clients - 1, math.ceil(gamma * num_clients - 1e-9))
    dropouts = min(num_clients - 1, math.ceil(delta * num_clients - 1e-9))
    exposure_target, failure_target = 2.0**-SECURITY_BITS, 2.0**-CORRECTNESS_BITS
    others, honest = num_clients - 1, num_clients - colluders
    for k in range(1, num_clients):
        if k % 2 == 1 and num_clients % 2 == 1:
            continue  # no k-regular graph when n and k are both odd
        exposed = _tails(others, colluders, k)  # exposed[t] = P(X ≥ t)
        lost = _tails(others, dropouts, k)  # lost[j] = P(Y ≥ j)
        for t in range((k + 1) // 2 + 1, k + 2):
            if honest * exposed[t] <= exposure_target:
                if num_clients * lost[k - t + 1] <= failure_target:
                    exposure, failure = bounds(num_clients, k, t, colluders, dropouts)
                    return GraphChoice(num_clients, k, t, colluders, dropouts, exposure,
                                       failure, True)
                break  # a larger t only tolerates fewer dropouts
    k = num_clients - 1
    exposed = _tails(others, colluders, k)
    t = next((t for t in range((k + 1) // 2 + 1, k + 2)
              if honest * exposed[t] <= exposure_target), k + 1)
    exposure, failure = bounds(num_clients, k, t, colluders, dropouts)
    return GraphChoice(num_clients, k, t, colluders, dropouts, exposure, failure, False)


def _tails(population: int, marked: int, draws: int) -> list[float]:
    """``[P(X ≥ j) for j in 0 … draws + 1]`` for ``X ~ Hypergeometric(population, marked,
    draws)``, from one pass over the probability mass function."""
    log_total = _log_comb(population, draws)
    low, high = max(0, draws - (population - marked)), min(marked, draws)
    mass = [0.0] * (draws + 2)
    for x in range(low, high + 1):
        mass[x] = math.exp(_log_comb(marked, x) + _log_comb(population - marked, draws - x)
                           - log_total)
    tails = [0.0] * (draws + 2)
    for j in range(draws, -1, -1):
        tails[j] = tails[j + 1] + mass[j]
    return [min(1.0, value) for value in tails]


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
