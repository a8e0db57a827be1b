"""Paired statistics for experiment sweeps: is a rule better than the reference, over seeds?

The cells of one setting share the data split, the initial adapter and the client sampling of a
seed, so a rule and the spec's ``reference`` strategy are compared **paired by seed**: for each
seed ``s`` in both, ``d_s = m(rule, s) − m(reference, s)``. The seed-to-seed spread (one split
is harder than another for every rule) cancels in ``d_s``; what remains is the rule's effect and
its own noise.

Confidence interval for the mean paired difference ``d̄`` over ``n`` seeds (95 %, two-sided):

- ``n < 10``: Student's t-interval ``d̄ ± t_{0.975, n−1} · s_d / √n`` (exact when the ``d_s``
  are normal; ``scipy.stats.t`` gives the quantile).
- ``n ≥ 10``: a studentized (bootstrap-t) interval, Efron & Tibshirani, *An Introduction to
  the Bootstrap* (1993), ch. 12: resample the ``d_s`` with replacement ``B`` times, form
  ``t*_b = (d̄*_b − d̄) / (s*_b / √n)``, and take ``[d̄ − q*_{0.975}·s_d/√n,
  d̄ − q*_{0.025}·s_d/√n]``. Deviation from the plain percentile bootstrap: that one
  under-covers at n ≈ 10 (its one-sided miss rate is ~4 % instead of 2.5 %), the studentized
  one is second-order accurate. Resamples with ``s*_b = 0`` (every draw the same seed) are
  dropped. The generator is seeded, so a report is reproducible.
- ``n = 1``: no interval and no call.

Call: **win** if the interval lies entirely on the better side of 0 (above for metrics where
higher is better, below for losses), **loss** if entirely on the worse side, **tie** otherwise.
With a zero true difference each of win and loss therefore happens at the one-sided rate
2.5 % (``tests/test_stats.py`` checks this by simulation).

Area under the curve: the trapezoid area of the metric over rounds ``0..R`` divided by ``R``
(the mean level of the curve, in the metric's units), over the rounds both runs logged — it
rewards reaching a level early, which the final value does not see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_MIN_SEEDS = 10
BOOTSTRAP_RESAMPLES = 4000


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided confidence interval (``method``: t, bootstrap-t or none)."""

    mean: float
    low: float
    high: float
    n: int
    method: str

    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below 0 (never for method ``none``)."""
        return self.method != "none" and (self.low > 0 or self.high < 0)


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0,
            resamples: int = BOOTSTRAP_RESAMPLES) -> Interval:
    """Mean and confidence interval of ``values`` (t below 10 values, bootstrap-t from 10)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, "none")
    alpha = 1.0 - confidence
    se = float(x.std(ddof=1)) / math.sqrt(n)
    if se == 0.0:  # every seed gave the same difference: it is exact, not uncertain
        return Interval(mean, mean, mean, n, "t" if n < BOOTSTRAP_MIN_SEEDS else "bootstrap-t")
    if n < BOOTSTRAP_MIN_SEEDS:
        half = t_quantile(1.0 - alpha / 2, n - 1) * se
        return Interval(mean, mean - half, mean + half, n, "t")
    rng = np.random.default_rng(seed)
    draws = x[rng.integers(0, n, size=(resamples, n))]
    se_star = draws.std(axis=1, ddof=1) / math.sqrt(n)
    keep = se_star > 0
    t_star = (draws.mean(axis=1)[keep] - mean) / se_star[keep]
    q_low, q_high = np.quantile(t_star, [alpha / 2, 1.0 - alpha / 2])
    return Interval(mean, mean - float(q_high) * se, mean - float(q_low) * se, n, "bootstrap-t")


def call(interval: Interval, higher_is_better: bool) -> str:
    """``win`` / ``loss`` / ``tie`` of a rule against the reference; ``—`` with one seed."""
    if interval.method == "none":
        return "—"
    if not interval.excludes_zero():
        return "tie"
    better = interval.low > 0 if higher_is_better else interval.high < 0
    return "win" if better else "loss"


def curve_area(records: Sequence[dict[str, Any]], metric: str, upto: int | None = None
               ) -> float | None:
    """Trapezoid area of ``metric`` over rounds ``0..upto`` divided by the rounds spanned."""
    points = sorted((int(r["round"]), float(r[metric])) for r in records
                    if r.get(metric) is not None and (upto is None or int(r["round"]) <= upto))
    if len(points) < 2:
        return None
    xs = np.array([p[0] for p in points], dtype=float)
    ys = np.array([p[1] for p in points], dtype=float)
    span = xs[-1] - xs[0]
    return float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs)) / span) if span > 0 else None


def fmt_mean_sd(values: Sequence[float | None]) -> str:
    """``mean ± sample sd`` of the finite values to 4 decimals (one value: itself; none: —)."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return "—"
    if len(kept) == 1:
        return f"{kept[0]:.4f}"
    return f"{np.mean(kept):.4f} ± {np.std(kept, ddof=1):.4f}"


def final_value(records: Sequence[dict[str, Any]], metric: str) -> float | None:
    """The last value of ``metric`` after round 0, or ``None`` if it was never logged."""
    values = [r[metric] for r in records if r.get(metric) is not None and int(r["round"]) > 0]
    return float(values[-1]) if values else None


def to_target(records: Sequence[dict[str, Any]], metric: str, target: float,
              higher_is_better: bool) -> tuple[int, float] | None:
    """(first round at or past ``target``, cumulative MB up + down until then), or None."""
    cumulative = 0.0
    for rec in sorted(records, key=lambda r: int(r["round"])):
        cumulative += float(rec.get("bytes_up") or 0) + float(rec.get("bytes_down") or 0)
        value = rec.get(metric)
        if value is None:
            continue
        if (value >= target) if higher_is_better else (value <= target):
            return int(rec["round"]), cumulative / 1e6
    return None


@dataclass(frozen=True)
class Comparison:
    """One rule against the reference in one setting, paired over their common seeds."""

    label: str
    seeds: tuple[int, ...]
    final: Interval
    area: Interval
    final_call: str
    area_call: str


def paired(rule: dict[int, list[dict[str, Any]]], reference: dict[int, list[dict[str, Any]]],
           metric: str, higher_is_better: bool, label: str = "") -> Comparison:
    """Compare a rule's runs with the reference's, both keyed by seed, over common seeds.

    The curve areas of a pair are taken over the rounds both logged (``min`` of their last
    rounds), so a run that stopped early is not credited with the other's later rounds.
    """
    seeds = tuple(sorted(set(rule) & set(reference)))
    finals, areas = [], []
    for seed in seeds:
        a, b = final_value(rule[seed], metric), final_value(reference[seed], metric)
        if a is not None and b is not None:
            finals.append(a - b)
        last = min(max(int(r["round"]) for r in runs) for runs in (rule[seed], reference[seed]))
        x, y = curve_area(rule[seed], metric, last), curve_area(reference[seed], metric, last)
        if x is not None and y is not None:
            areas.append(x - y)
    final_ci, area_ci = mean_ci(finals), mean_ci(areas)
    return Comparison(label, seeds, final_ci, area_ci, call(final_ci, higher_is_better),
                      call(area_ci, higher_is_better))


def ranks(finals: dict[str, dict[int, float]], higher_is_better: bool
          ) -> dict[str, Interval]:
    """Each rule's rank (1 = best; ties share the average rank) per seed over the seeds every
    rule finished, then its mean rank over those seeds with a confidence interval (by
    :func:`mean_ci`, then clipped to the possible ranks ``[1, rules]`` — the t-interval of a
    bounded quantity can overshoot its bounds with few seeds)."""
    from scipy.stats import rankdata

    labels = [k for k, v in finals.items() if v]
    if not labels:
        return {}
    common = sorted(set.intersection(*(set(finals[k]) for k in labels)))
    per_seed: dict[str, list[float]] = {k: [] for k in labels}
    for seed in common:
        values = np.array([finals[k][seed] for k in labels], dtype=float)
        order = rankdata(-values if higher_is_better else values, method="average")
        for k, r in zip(labels, order, strict=True):
            per_seed[k].append(float(r))
    out = {}
    for k, v in per_seed.items():  # a rank lies in [1, rules]: so does its interval
        iv = mean_ci(v)
        out[k] = Interval(iv.mean, max(iv.low, 1.0), min(iv.high, float(len(labels))), iv.n,
                          iv.method) if iv.method != "none" else iv
    return out


def spread(values: Sequence[float]) -> str:
    """``median [min, max]`` of a few numbers (one number as is)."""
    if not values:
        return "—"
    if len(values) == 1:
        return _num(values[0])
    return f"{_num(float(np.median(values)))} [{_num(min(values))}, {_num(max(values))}]"


def _num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.2f}"


def fmt_interval(iv: Interval, digits: int = 4) -> str:
    """``+0.0123 [−0.0100, +0.0346]`` (t, n=3); the mean alone with one seed."""
    if iv.n == 0:
        return "—"
    if iv.method == "none":
        return f"{iv.mean:+.{digits}f} (n=1)"
    return f"{iv.mean:+.{digits}f} [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]"
