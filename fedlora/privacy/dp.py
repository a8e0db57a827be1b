"""Client-level differential privacy for adapter updates: clipping, Gaussian noise, accounting.

A client's *update* is what it sends minus what it received, over every array it sends (the
trained LoRA factors and the declared heads), flattened: ``u = x_sent - x_received``.

* Clipping (always on the client): ``u ← u · min(1, C / ‖u‖₂)``.
* ``central`` (trusted server, DP-FedAvg of McMahan et al. 2018): the server checks each
  ``‖u‖ ≤ C``, averages the clipped updates **unweighted** (an example-weighted mean would let
  one client's weight exceed the sensitivity) and adds ``N(0, (σC)²)`` to their sum, i.e.
  ``N(0, (σC/k)²)`` to the mean of ``k`` updates.
* ``local`` (untrusted server): each client adds ``N(0, (σC)²)`` to its own clipped update
  before sending; the server averages unweighted.
* ``distributed`` (untrusted but protocol-following server, with secure aggregation): each
  client adds ``N(0, (σC)²/m)`` to its clipped update and uploads it masked with weight 1, so
  the sum the server unmasks carries ``N(0, (σC)²·m'/m)`` for ``m' ≥ m`` contributors — at
  least central mode's noise, and the server never sees an individual update (nor the
  noise one client added). The server does not unmask a sum of fewer
  than ``m`` (``dp-min-contributors``, default: the clients sampled per round), since its
  noise would fall short (nor one below ``min-accepted``, which it would then discard
  unaccounted). The noise is continuous Gaussian rounded to the secure codec's
  fixed-point grid (with weight 1 the step is ``c·n/(2³¹−1)`` for clip range ``c`` and ``n``
  clients: 1e-8 for 3, 4e-6 for 1,000): the analysis treats that rounding as negligible, where a
  discrete-Gaussian scheme would account for it exactly (Kairouz et al. 2021).

Accounting uses Google's ``dp_accounting`` RDP accountant (the backend of ``flwr[dp]``) with
replace-one neighbours (two clipped updates differ by up to 2C, so the Gaussian's multiplier
is σ/2; see :class:`Accountant`): per round a Gaussian event, amplified by sampling ``k`` of
``N`` clients without replacement where the adversary does not know the sample (``central``:
the trusted server's published adapters), not amplified against a server that draws the
sample itself (``local``, ``distributed``; every round counted). The reported ε is for the
configured δ after each round that released an aggregate. Noise is drawn from fresh OS
entropy, never from the run seed.

The FFA-LoRA mode (``strategy = "ffa"``: A frozen, only B trained and sent) is the recommended
pairing: the noise is added to one factor only, so it is not multiplied by a noisy partner
factor, and the aggregate of B is exact (Sun et al. 2024).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.errors import ConfigError

MODES = ("off", "central", "local", "distributed")
CONTRIBUTORS_KEY = "dp-contributors"  # train config, distributed mode: m of noise_std
# modes whose server is not trusted with anything about one client's training beyond its
# noisy update: the client withholds its train loss and update norm (see withhold_metrics)
UNTRUSTED_SERVER = ("local", "distributed")
# linear, equal-rank: a mean of updates (fedsvd: the SVD of the noisy mean B̄ times the A the
# server sent is post-processing, so it spends no privacy)
DP_STRATEGIES = ("fedit", "ffa", "fedsa", "rolora", "fedsvd")


@dataclass(frozen=True)
class DPSpec:
    """Client-level DP settings: ``mode`` (off, central, local, distributed), the clip norm, the
    noise multiplier and the ``delta`` epsilon is reported for; validated on creation.
    """
    mode: str = "off"
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"dp-mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.mode == "off":
            return
        if not self.clip_norm > 0:
            raise ConfigError(f"dp-clip-norm must be > 0 with dp-mode {self.mode!r}; got "
                              f"{self.clip_norm}")
        if not self.noise_multiplier > 0:
            raise ConfigError(f"dp-noise-multiplier must be > 0 with dp-mode {self.mode!r}; "
                              f"got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp-delta must be in (0, 1); got {self.delta}")

    @property
    def enabled(self) -> bool:
        """Whether DP is on (``mode`` is not ``off``)."""
        return self.mode != "off"


def check_strategy(spec: DPSpec, strategy: str) -> None:
    """DP needs an unweighted mean of updates of one shape: the linear equal-rank rules."""
    if spec.enabled and strategy not in DP_STRATEGIES:
        raise ConfigError(f"dp-mode {spec.mode!r} works with {', '.join(DP_STRATEGIES)} (a "
                          f"noisy mean of equal-shape updates); strategy {strategy!r} combines "
                          f"factors non-linearly. Use ffa (recommended with DP) or fedit")


def check_config(cfg: Any, num_nodes: int | None = None) -> DPSpec:
    """Start-up check of a run's DP settings (before any model is loaded); with the number
    of nodes, also that a round samples at least ``dp-min-contributors`` of them."""
    spec = cfg.fl.dp_spec()
    per_round = None if num_nodes is None else cfg.fl.clients_per_round(num_nodes)
    if spec.mode == "distributed" and per_round is not None and \
            cfg.fl.dp_min_contributors > per_round:
        raise ConfigError(f"dp-min-contributors = {cfg.fl.dp_min_contributors}, but a round "
                          f"samples {per_round} of the {num_nodes} nodes, so no secure sum "
                          f"could ever be unmasked; lower dp-min-contributors or sample more "
                          f"nodes (num-train-nodes / fraction-train)")
    check_strategy(spec, cfg.fl.strategy)
    if spec.mode == "central" and cfg.fl.secure_aggregation:
        raise ConfigError("dp-mode = 'central' needs the server to check each clipped update "
                          "and add the noise itself, but with secure-aggregation = true it "
                          "sees only the sum; use dp-mode = 'distributed' (each client adds "
                          "its share of the noise inside the secure sum) or 'local'")
    if spec.mode == "distributed" and not cfg.fl.secure_aggregation:
        raise ConfigError("dp-mode = 'distributed' splits the noise among the clients of a "
                          "secure sum; without secure-aggregation = true the server would see "
                          "each update with only its share of the noise. Set "
                          "secure-aggregation = true, or use dp-mode = 'local' or 'central'")
    return spec


def noise_std(spec: DPSpec, contributors: int = 1) -> float:
    """Std of the Gaussian noise one client adds to each coordinate of its clipped update:
    ``σC`` in local mode, ``σC/√m`` in distributed mode (``m`` = ``contributors``, the fewest
    updates of a sum the server unmasks), none in central mode (the server adds it)."""
    if spec.mode == "local":
        return spec.noise_multiplier * spec.clip_norm
    if spec.mode == "distributed":
        if contributors < 1:
            raise ConfigError(f"dp-mode = 'distributed' needs the round's minimum number of "
                              f"contributors (>= 1); got {contributors}")
        return spec.noise_multiplier * spec.clip_norm / math.sqrt(contributors)
    return 0.0


def update_norm(sent: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``sent - received`` over every key of ``sent`` (float64)."""
    return math.sqrt(sum(float(np.sum((np.asarray(v, np.float64) - received[k]) ** 2))
                         for k, v in sent.items()))


def _rng() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(128))


def privatize(sent: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
              spec: DPSpec, rng: np.random.Generator | None = None, contributors: int = 1
              ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Client side: clip the update to ``clip_norm`` and add this client's noise
    (:func:`noise_std`; ``contributors`` matters in distributed mode only).

    Returns the arrays to send (received + privatized update) and ``dp-norm`` (before
    clipping) / ``dp-clip-factor`` metrics.
    """
    norm = update_norm(sent, received)
    factor = min(1.0, spec.clip_norm / norm) if norm > 0 else 1.0
    std = noise_std(spec, contributors)
    rng = rng or _rng()
    out = {}
    for key, value in sent.items():
        base = np.asarray(received[key], np.float64)
        update = (np.asarray(value, np.float64) - base) * factor
        if std:
            update = update + rng.normal(0.0, std, size=update.shape)
        out[key] = (base + update).astype(np.float32)
    return out, {"dp-norm": norm, "dp-clip-factor": factor}


TIMINGS = ("train-seconds", "train-cpu-s", "load-seconds")  # grow with the data's size


def withhold_metrics(spec: DPSpec, metrics: dict[str, Any], dp_metrics: Mapping[str, float]
                     ) -> None:
    """The training metrics a client reports under DP, in place.

    A trusted server (``central``) gets the update's norm and clip factor. Where the server is
    not trusted (``local``, ``distributed``) only the noisy update is covered by ε, so the
    client reports neither those nor its train loss (sent as 0.0, which the server does not
    record) nor its timings; ``num-examples`` (the size of its data, not its content) is
    still sent.
    """
    if spec.mode in UNTRUSTED_SERVER:
        metrics["train-loss"] = 0.0
        for key in TIMINGS:
            metrics.pop(key, None)
    elif spec.enabled:
        metrics.update(dp_metrics)


TAIL_Z = 9.0  # P(|N(0,1)| > 9) ≈ 2e-19 per coordinate: negligible next to any δ


def check_secure_range(received: Mapping[str, np.ndarray], spec: DPSpec, contributors: int,
                       clip_range: float) -> None:
    """A DP upload must reach the secure sum unclipped, and the decision must not depend on
    the client's data: every coordinate of ``received + clipped update + noise`` is within
    ``max|received| + C + 9·std`` (``|u_i| ≤ ‖u‖ ≤ C``), which must fit ``secagg-clip-range``.
    Only public values enter the check, so the server and every client reach the same answer.
    """
    largest = max((float(np.abs(v).max()) for v in received.values() if v.size), default=0.0)
    needed = largest + spec.clip_norm + TAIL_Z * noise_std(spec, contributors)
    if needed > clip_range:
        raise ConfigError(f"secagg-clip-range {clip_range:g} is too small for this DP upload: "
                          f"the largest received value {largest:.3g} + dp-clip-norm "
                          f"{spec.clip_norm:g} + 9 x the noise std "
                          f"{noise_std(spec, contributors):.3g} = {needed:.3g} could be "
                          f"clipped, which would change the noise; raise secagg-clip-range to "
                          f"at least {needed:.3g}")


def add_central_noise(mean: Mapping[str, np.ndarray], keys: Any, spec: DPSpec, k: int,
                      rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Server side (central mode): ``N(0, (σC/k)²)`` on the ``keys`` of a mean of ``k``."""
    rng = rng or _rng()
    std = spec.noise_multiplier * spec.clip_norm / k
    out = dict(mean)
    for key in keys:
        out[key] = (np.asarray(mean[key], np.float64) +
                    rng.normal(0.0, std, size=np.shape(mean[key]))).astype(np.float32)
    return out


# Neighbouring runs differ in one client's data (replace-one: the only relation that sampling
# k of N without replacement is analysed for). Two updates clipped to C differ by up to 2C, so
# the Gaussian's noise multiplier relative to that sensitivity is σ/2.
SENSITIVITY = 2.0


@dataclass
class Accountant:
    """Cumulative (ε, δ) of the run's Gaussian releases (``dp_accounting`` RDP).

    Two adversaries: one that sees the released aggregates but not which clients were
    sampled (sampling amplifies privacy), and one that knows the sample — the server, which
    draws it. ``central`` reports the first (the server is trusted); ``local`` and
    ``distributed`` guard against the server, so their ``dp_epsilon`` is the unamplified one
    (every round counted, as if the client took part in each); ``distributed`` also reports
    the amplified ``dp_epsilon_released`` for whoever sees only the published adapters.
    """

    spec: DPSpec
    population: int
    events: list[tuple[int, int]] = field(default_factory=list)  # (sample size, rounds)

    def _accountant(self, amplified: bool) -> Any:
        from dp_accounting import dp_event
        from dp_accounting.privacy_accountant import NeighboringRelation
        from dp_accounting.rdp import RdpAccountant

        accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        for sample, count in self.events:
            gaussian = dp_event.GaussianDpEvent(self.spec.noise_multiplier / SENSITIVITY)
            if amplified and sample < self.population:
                event = dp_event.SampledWithoutReplacementDpEvent(self.population, sample,
                                                                 gaussian)
            else:
                event = gaussian
            accountant.compose(event, count)
        return accountant

    def record_round(self, sampled: int) -> None:
        """Count one noised release with ``sampled`` clients (runs of equal sizes are merged)."""
        if self.events and self.events[-1][0] == sampled:
            self.events[-1] = (sampled, self.events[-1][1] + 1)
        else:
            self.events.append((sampled, 1))

    def epsilon(self, amplified: bool | None = None) -> float:
        """ε for ``delta`` so far; ``amplified`` defaults to the mode's own adversary.

        The amplified ε is never reported above the unamplified one: both bound the same
        adversary (one that does not know the sample is weaker than one that does), and the
        RDP bound for sampling without replacement is looser than no amplification at all
        for small σ (e.g. 10 rounds of 20 of 60 at σ = 0.3: 440 vs 322)."""
        if amplified is None:
            amplified = self.spec.mode == "central"
        if not self.events:
            return 0.0
        plain = float(self._accountant(False).get_epsilon(self.spec.delta))
        if not amplified:
            return plain
        return min(plain, float(self._accountant(True).get_epsilon(self.spec.delta)))

    def report(self) -> dict[str, float]:
        """The metrics of the run's privacy so far (see the class docstring)."""
        out = {"dp_epsilon": self.epsilon(), "dp_delta": self.spec.delta}
        if self.spec.mode == "distributed":
            out["dp_epsilon_released"] = self.epsilon(amplified=True)
        return out

    def state(self) -> list[list[int]]:
        """The recorded releases as ``[[sample size, rounds], ...]`` (for a checkpoint)."""
        return [list(e) for e in self.events]

    def load(self, state: list[list[int]]) -> None:
        """Restore the releases from :meth:`state`'s list."""
        self.events = [(int(s), int(c)) for s, c in state]


RELEASES = "dp-releases.jsonl"  # in the checkpoint directory


class ReleaseLog:
    """Append-only record of the DP rounds that may release an aggregate.

    One line per round attempt — ``{"round", "sample", "population"}`` — written and fsync'ed
    *before* the round's messages leave the server, so it survives a crash at any later
    moment. A resume restores the accountant of its checkpoint and then counts every attempt
    the log holds after that checkpoint's round (:meth:`after`): rounds that ran (or may have
    run) after the checkpoint and are now repeated with fresh noise on the same clipped
    updates are charged once per attempt, never dropped. Conservative: an attempt that
    released nothing (a round abandoned before its aggregate was formed) is charged on resume
    as if it had.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def reset(self) -> None:
        """A fresh run: earlier runs' attempts in the same directory are not this run's."""
        self.path.unlink(missing_ok=True)

    def append(self, server_round: int, sample: int, population: int) -> None:
        """Append and fsync one round attempt (``round``, ``sample``, ``population``), first
        ending a line a crash left torn.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"round": server_round, "sample": sample, "population": population})
        with self.path.open("a+", encoding="utf-8") as fh:
            if fh.tell() and not self._ends_with_newline():  # after a torn line
                line = "\n" + line
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def after(self, server_round: int) -> list[dict[str, int]]:
        """The attempts of rounds after ``server_round``, oldest first (a line torn by a
        crash in mid-write is an attempt whose messages never left: skipped)."""
        if not self.path.exists():
            return []
        attempts = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(entry["round"]) > server_round:
                attempts.append({k: int(entry[k]) for k in ("round", "sample", "population")})
        return attempts
