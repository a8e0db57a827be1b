"""Differential privacy: clipping, noise scale, strategy compatibility, accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tolerances import U32, assert_within

from fedlora.errors import ConfigError
from fedlora.privacy.dp import (
    Accountant,
    DPSpec,
    add_central_noise,
    check_strategy,
    privatize,
    update_norm,
)


def arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    received = {"a": rng.normal(size=(4, 6)).astype(np.float32),
                "head": rng.normal(size=(3,)).astype(np.float32)}
    sent = {k: (v + rng.normal(scale=2.0, size=v.shape)).astype(np.float32)
            for k, v in received.items()}
    return sent, received


def test_clipping_scales_the_update_to_the_bound_and_keeps_its_direction():
    sent, received = arrays()
    norm = update_norm(sent, received)
    assert norm > 1.0
    out, metrics = privatize(sent, received, DPSpec("central", clip_norm=1.0))
    assert update_norm(out, received) == pytest.approx(1.0, rel=1e-5)
    assert metrics["dp-norm"] == pytest.approx(norm) and metrics["dp-clip-factor"] < 1
    for key in sent:  # same direction: (out - received) = factor · (sent - received)
        # out = r + f(s − r) in float32, then out − r: four roundings (s − r, f·, r +, − r),
        # each within u of |r| + |s − r| (derived)
        delta = sent[key].astype(np.float64) - received[key]
        bound = 4.04 * U32 * (np.abs(received[key]) + np.abs(delta))
        assert_within(out[key].astype(np.float64) - received[key],
                      metrics["dp-clip-factor"] * delta, bound, key)


def test_small_updates_are_not_changed_by_clipping():
    sent, received = arrays()
    out, metrics = privatize(sent, received, DPSpec("central", clip_norm=1e6))
    assert metrics["dp-clip-factor"] == 1.0
    for key in sent:
        np.testing.assert_allclose(out[key], sent[key], rtol=1e-6)


def test_local_mode_adds_noise_of_std_sigma_c():
    received = {"x": np.zeros(200_000, np.float32)}
    sent = {"x": np.zeros(200_000, np.float32)}
    out, _ = privatize(sent, received, DPSpec("local", clip_norm=0.5, noise_multiplier=2.0),
                       rng=np.random.default_rng(1))
    assert np.std(out["x"]) == pytest.approx(1.0, rel=0.01)  # σC = 2 × 0.5


def test_central_noise_on_a_mean_of_k_has_std_sigma_c_over_k():
    mean = {"b": np.zeros(200_000, np.float32), "frozen": np.ones(3, np.float32)}
    out = add_central_noise(mean, ["b"], DPSpec("central", 1.0, 3.0), k=4,
                            rng=np.random.default_rng(2))
    assert np.std(out["b"]) == pytest.approx(0.75, rel=0.01)
    assert np.array_equal(out["frozen"], mean["frozen"])  # only the released keys


def test_fresh_noise_is_not_reproducible_from_the_seed():
    received = {"x": np.zeros(10, np.float32)}
    spec = DPSpec("local", 1.0, 1.0)
    first, _ = privatize(received, received, spec)
    second, _ = privatize(received, received, spec)
    assert not np.array_equal(first["x"], second["x"])


@pytest.mark.parametrize(("strategy", "ok"), [("fedit", True), ("ffa", True), ("fedsa", True),
                                              ("rolora", True), ("flexlora", False),
                                              ("hetlora", False), ("flora", False),
                                              ("fedex", False), ("fedsvd", True),
                                              ("lora-fair", False), ("raflora", False)])
def test_dp_accepts_only_linear_equal_rank_rules(strategy, ok):
    spec = DPSpec("central")
    if ok:
        check_strategy(spec, strategy)
    else:
        with pytest.raises(ConfigError, match="Use ffa"):
            check_strategy(spec, strategy)
    check_strategy(DPSpec("off"), strategy)  # no DP: anything goes


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "global"}, "dp-mode must be one of"),
    ({"mode": "central", "clip_norm": 0.0}, "dp-clip-norm"),
    ({"mode": "local", "noise_multiplier": -1.0}, "dp-noise-multiplier"),
    ({"mode": "central", "delta": 1.0}, "dp-delta")])
def test_bad_dp_settings_say_what_to_change(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DPSpec(**kwargs)


def classic_rdp_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """ε from the Gaussian's RDP α/(2σ²) composed over rounds (Mironov 2017, Prop. 3)."""
    orders = np.linspace(1.01, 200, 20_000)
    return float(np.min(rounds * orders / (2 * sigma**2) + math.log(1 / delta) / (orders - 1)))


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact ε of one Gaussian mechanism with noise multiplier ``sigma`` at ``delta``
    (Balle & Wang 2018, Thm. 8: δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ), μ = 1/σ), by
    bisection; every valid accountant reports at least this."""
    mu = 1.0 / sigma

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps: float) -> float:
        return phi(mu / 2 - eps / mu) - math.exp(eps) * phi(-mu / 2 - eps / mu)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_accountant_matches_the_gaussian_rdp_bound_without_sampling():
    acc = Accountant(DPSpec("local", 1.0, 2.0, 1e-5), population=3)
    for _ in range(5):
        acc.record_round(3)
    reference = classic_rdp_epsilon(2.0 / 2, 5, 1e-5)  # sensitivity 2C: multiplier σ/2
    assert 0.7 * reference <= acc.epsilon() <= reference * 1.001


def test_epsilon_grows_with_rounds_and_sampling_amplifies_privacy():
    full = Accountant(DPSpec("central", 1.0, 2.0, 1e-5), population=100)
    sampled = Accountant(DPSpec("central", 1.0, 2.0, 1e-5), population=100)
    eps = []
    for _ in range(4):
        full.record_round(100)
        sampled.record_round(10)
        eps.append(full.epsilon())
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert sampled.epsilon() < full.epsilon() / 2
    again = Accountant(sampled.spec, 100)
    again.load(sampled.state())
    assert again.epsilon() == sampled.epsilon()


def test_the_amplified_epsilon_is_never_above_the_unamplified_one():
    """At small σ the RDP bound for sampling without replacement is looser than counting every
    round in full; the reported ε is the smaller of the two valid bounds."""
    weak = Accountant(DPSpec("central", 1.0, 0.3, 1e-5), population=60)
    for _ in range(10):
        weak.record_round(20)
    plain = weak.epsilon(amplified=False)
    loose = float(weak._accountant(True).get_epsilon(1e-5))
    assert loose > plain  # the sampled bound alone would report more (440 vs 322)
    assert weak.epsilon() == weak.epsilon(amplified=True) == plain
    strong = Accountant(DPSpec("central", 1.0, 1.0, 1e-5), population=60)
    for _ in range(10):
        strong.record_round(20)
    assert strong.epsilon() == pytest.approx(float(strong._accountant(True).get_epsilon(1e-5)))
    assert strong.epsilon() < strong.epsilon(amplified=False)


# ------------------------------------------------------------------ in rounds (in process)


def _run(flat, on_reply=None):
    from tests.fl_harness import run_rounds

    return run_rounds(flat, num_nodes=3, on_reply=on_reply)


def test_central_dp_with_ffa_clips_on_clients_noises_once_and_reports_epsilon(monkeypatch):
    from fedlora.federation.global_adapter import GlobalAdapter
    from tests.fl_harness import tiny_config

    norms, raw, replies, adopted = [], [], [], []

    def watch(reply):
        if reply.metadata.message_type == "train" and not reply.has_error():
            norms.append(float(reply.content["metrics"]["dp-norm"]) *
                         float(reply.content["metrics"]["dp-clip-factor"]))
            raw.append(float(reply.content["metrics"]["dp-norm"]))
            replies.append(reply)

    real_apply = GlobalAdapter.apply

    def apply(self, *args, **kwargs):  # the global B after each round
        real_apply(self, *args, **kwargs)
        adopted.append({k: v for k, v in self.arrays_for(8).items() if "lora_B" in k})

    monkeypatch.setattr(GlobalAdapter, "apply", apply)
    clip, sigma = 0.05, 0.5
    flat = tiny_config(strategy="ffa", num_server_rounds=2, dp_mode="central",
                       dp_clip_norm=clip, dp_noise_multiplier=sigma)
    records, grid, glob, _ = _run(flat, on_reply=watch)
    assert len(norms) == 6 and all(n <= clip * (1 + 1e-5) for n in norms)  # reported clipped
    # clipped on the clients, measured from the arrays they sent: ‖reply − received‖ ≤ C
    sent = {(int(m.content["config"]["server-round"]), m.metadata.dst_node_id):
            m.content["arrays"] for m in grid.delivered if m.metadata.message_type == "train"}
    for reply in replies:
        received = sent[(int(reply.content["metrics"]["server-round"]),
                         reply.metadata.src_node_id)]
        out = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        moved = update_norm(out, {k: received[k].numpy() for k in out})
        assert moved <= clip * (1 + 1e-5), moved
    # noised once: the round-1 global B minus the plain mean of the clipped replies is one
    # N(0, (σC)²) draw on one of 3 equally weighted updates, i.e. N(0, (σC/3)²); noised
    # twice (or by every client) its spread would be √2 (√3) times larger
    first = [r for r in replies if int(r.content["metrics"]["server-round"]) == 1]
    counts = {int(r.content["metrics"]["num-examples"]) for r in first}
    assert len(first) == 3 and len(counts) == 1  # equal weights
    noise = np.concatenate([
        (adopted[0][k] - np.mean([r.content["arrays"][k].numpy() for r in first], axis=0))
        .ravel() for k in adopted[0]])
    assert noise.size > 2000
    assert np.std(noise) == pytest.approx(sigma * clip / 3, rel=0.06)  # 0.06 ≈ 4 s.e.
    eps = [r["dp_epsilon"] for r in records[1:]]
    assert 0 < eps[0] < eps[1] and records[1]["dp_delta"] == 1e-5
    assert all(r["num_accepted"] == 3 for r in records[1:])
    for record, round_norms in zip(records[1:], (raw[:3], raw[3:]), strict=True):
        assert record["dp_norm_median"] == pytest.approx(float(np.median(round_norms)))
        assert record["dp_clipped_fraction"] == sum(n > 0.05 for n in round_norms) / 3
    # FFA: A is frozen, so neither clipping nor noise ever touches it
    from fedlora import config
    from fedlora.learning.evaluator import ServerModel

    initial = ServerModel(config.from_flat(flat), 64).initial_global().arrays_for(8)
    for key, value in glob.arrays_for(8).items():
        if key.endswith("lora_A.weight"):
            assert np.array_equal(value, initial[key])


def test_central_dp_rejects_a_client_that_did_not_clip():
    from flwr.app import Array

    from tests.fl_harness import tiny_config

    def unclip(reply):
        if reply.metadata.message_type == "train" and \
                int(reply.content["metrics"]["partition-id"]) == 1:
            arrays = reply.content["arrays"]
            key = next(k for k in arrays if k.endswith("lora_B.weight"))
            arrays[key] = Array(arrays[key].numpy() + 1.0)

    flat = tiny_config(strategy="fedit", num_server_rounds=1, dp_mode="central",
                       dp_clip_norm=0.1)
    records, *_ = _run(flat, on_reply=unclip)
    assert records[1]["rejected"] == {"DP_NORM_EXCEEDED": 1}


def test_local_dp_runs_and_accounts_per_client():
    from tests.fl_harness import tiny_config

    flat = tiny_config(strategy="fedit", num_server_rounds=1, dp_mode="local",
                       dp_clip_norm=0.1, dp_noise_multiplier=2.0)
    records, *_ = _run(flat)
    assert records[1]["num_accepted"] == 3
    # per client, unamplified (each client's release is its own Gaussian mechanism with
    # replace-one sensitivity 2C: multiplier σ/2), one round — not the 3-client aggregate's ε
    # ε of one Gaussian release lies between the exact (analytic) curve and the classic RDP
    # conversion; the server's ε of an aggregate of 3 noisy updates would be far below both
    eps = records[1]["dp_epsilon"]
    assert analytic_gaussian_epsilon(2.0 / 2, 1e-5) <= eps <= classic_rdp_epsilon(1.0, 1, 1e-5)
    assert np.isfinite(records[1]["eval_loss"])


def test_dp_with_a_nonlinear_rule_fails_before_anything_runs(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "never-started"
    res = subprocess.run([sys.executable, "-m", "fedlora", "run", "-c",
                          "strategy=flexlora dp-mode=central", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Use ffa" in res.stderr
    # nothing started: no output directory (config.json, FLWR_HOME, SuperLink state)
    assert not out.exists(), sorted(p.name for p in out.iterdir())
