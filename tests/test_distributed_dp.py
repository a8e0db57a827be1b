"""Differential privacy inside secure aggregation (``dp-mode = "distributed"``), and local DP
with secure aggregation: each client's share of the noise, the size of the noise in the
unmasked sum, no unmasking of a sum too small for its noise, accounting, and bad settings.

The secure rounds run the real strategy against the real ClientApp in process
(``tests/test_secure_rounds.py``'s harness).
"""

from __future__ import annotations

import numpy as np
import pytest

from clients.app import _dp_contributors
from fedlora import config
from fedlora.errors import ConfigError
from fedlora.learning.evaluator import ServerModel
from fedlora.privacy import dp as privacy
from fedlora.privacy.dp import Accountant, DPSpec, noise_std, privatize
from fedlora.privacy.secure_wire import UNMASK
from tests.fl_harness import tiny_config
from tests.test_privacy import analytic_gaussian_epsilon, classic_rdp_epsilon
from tests.test_secure_rounds import NODES, ONE_ROUND, fails_at, run

CLIP, SIGMA = 0.1, 0.5


def dp_config(mode: str = "distributed", sigma: float = SIGMA, **extra) -> dict:
    return tiny_config(**{**ONE_ROUND, "secure_aggregation": True, "strategy": "ffa",
                          "dp_mode": mode, "dp_clip_norm": CLIP, "dp_noise_multiplier": sigma,
                          **extra})


def test_each_client_adds_its_share_of_the_noise():
    spec = DPSpec("distributed", clip_norm=0.5, noise_multiplier=2.0)
    assert noise_std(spec, contributors=4) == pytest.approx(0.5)  # σC/√m = 1/2
    assert noise_std(DPSpec("local", 0.5, 2.0)) == pytest.approx(1.0)  # σC
    assert noise_std(DPSpec("central", 0.5, 2.0)) == 0.0  # the server adds it
    zeros = {"x": np.zeros(200_000, np.float32)}
    out, _ = privatize(zeros, zeros, spec, rng=np.random.default_rng(3), contributors=4)
    assert np.std(out["x"]) == pytest.approx(0.5, rel=0.01)
    # m shares of variance (σC)²/m sum to central mode's (σC)²
    total = sum(privatize(zeros, zeros, spec, rng=np.random.default_rng(s), contributors=4)[0]
                ["x"].astype(np.float64) for s in range(4))
    assert np.std(total) == pytest.approx(1.0, rel=0.01)


def test_epsilon_against_the_server_is_not_amplified_by_its_own_sample():
    """The server draws the sample, so against it a distributed run spends the plain
    Gaussian's ε every round (sensitivity 2C: multiplier σ/2, hand-computed RDP bound); the
    published adapters alone, without the sample, get central mode's amplified ε."""
    central, distributed = (Accountant(DPSpec(mode, 1.0, 2.0), population=100)
                            for mode in ("central", "distributed"))
    for accountant in (central, distributed):
        for _ in range(5):
            accountant.record_round(10)
    reference = classic_rdp_epsilon(2.0 / 2, 5, 1e-5)
    assert 0.7 * reference <= distributed.epsilon() <= reference * 1.001
    report = distributed.report()
    assert report["dp_epsilon"] == distributed.epsilon()
    assert report["dp_epsilon_released"] == central.epsilon() < report["dp_epsilon"] / 2
    assert "dp_epsilon_released" not in central.report()


def noise_of_the_mean(fail=None, **extra) -> tuple[np.ndarray, list[dict], object]:
    """Global B (and heads) of a run with σ minus that of the same run with σ ≈ 0.

    Training is seeded and the noise is not, so both runs clip the same updates; the
    difference is the mean of the contributors' noise shares."""
    records, noisy, *_ = run(dp_config(sigma=SIGMA, **extra), fail=fail)
    _, quiet, *_ = run(dp_config(sigma=1e-9, **extra), fail=fail)
    diff = np.concatenate([(noisy.arrays_for(8)[k] - quiet.arrays_for(8)[k]).ravel()
                           for k in quiet.arrays_for(8) if "lora_A" not in k])
    assert diff.size > 5_000
    return diff, records, noisy


def test_the_unmasked_mean_carries_sigma_c_over_m_of_noise():
    """3 of 3 contribute, each N(0, (σC)²/3): the mean's noise has std σC/3."""
    diff, records, noisy = noise_of_the_mean()
    assert records[1]["num_accepted"] == NODES
    assert np.std(diff) == pytest.approx(SIGMA * CLIP / NODES, rel=0.06)
    assert abs(np.mean(diff)) < 4 * SIGMA * CLIP / NODES / np.sqrt(diff.size)
    initial = ServerModel(config.from_flat(dp_config()), 64).initial_global().arrays_for(8)
    for key, value in noisy.arrays_for(8).items():  # FFA: the frozen A gets no noise
        if "lora_A" in key:
            assert np.array_equal(value, initial[key]), key
    # every node sampled: the sample hides nothing, both adversaries get the same ε
    assert records[1]["dp_epsilon"] == records[1]["dp_epsilon_released"] > 0
    assert records[1]["dp_delta"] == 1e-5
    assert records[1]["secagg_error_bound"] < 1e-7  # weight 1: the fine fixed-point step


def test_with_a_dropout_the_survivors_still_carry_the_whole_noise():
    """dp-min-contributors = 2 and one of 3 drops at the masked input: each client added
    N(0, (σC)²/2), so the sum of the 2 survivors carries (σC)² and their mean std σC/2 — not
    the σC/(2√1.5) it would be had the server sized the shares for 3."""
    diff, records, _ = noise_of_the_mean(fail=fails_at(2, 1), dp_min_contributors=2)
    assert records[1]["num_accepted"] == 2 and not records[1].get("abandoned")
    assert np.std(diff) == pytest.approx(SIGMA * CLIP / 2, rel=0.06)


def test_a_sum_of_fewer_than_dp_min_contributors_is_never_unmasked():
    asked: list[str] = []
    records, glob, grid, error = run(dp_config(), fail=fails_at(2, 1), expect_error=True,
                                     on_reply=lambda r: asked.append(r.metadata.message_type))
    record = records[1]
    assert record["abandoned"] and "2 masked input(s) arrived, 3 needed" in \
        record["errors"][0]
    assert UNMASK not in asked  # no share requested: the masked sum stays masked
    assert "dp_epsilon" not in record  # nothing released, nothing spent
    initial = ServerModel(config.from_flat(dp_config()), 64).initial_global().arrays_for(8)
    for key, value in glob.arrays_for(8).items():
        assert np.array_equal(value, initial[key]), key
    assert "without enough accepted updates" in str(error)  # the one round was abandoned


def test_clip_update_norm_acts_before_the_noise_not_on_it():
    """A tiny clip-update-norm shrinks the update; scaling the noisy upload instead would
    shrink the noise too."""
    diff, records, _ = noise_of_the_mean(clip_update_norm=1e-6)
    assert records[1]["num_accepted"] == NODES
    assert np.std(diff) == pytest.approx(SIGMA * CLIP / NODES, rel=0.06)


def test_a_dropout_at_the_unmask_stage_keeps_every_input_and_is_accounted():
    records, *_ = run(dp_config(), fail=fails_at(3, 1))
    assert records[1]["num_accepted"] == NODES and records[1]["dp_epsilon"] > 0
    assert records[1]["secagg_dropped"]["unmask"] == 1


def test_a_sum_below_min_accepted_is_not_unmasked_either():
    """Unmasked and then abandoned, a sum would be seen without being accounted for."""
    asked: list[str] = []
    records, _, _, error = run(dp_config(dp_min_contributors=2, min_accepted=3),
                               fail=fails_at(2, 1), expect_error=True,
                               on_reply=lambda r: asked.append(r.metadata.message_type))
    assert "without enough accepted updates" in str(error)  # the one round was abandoned
    assert records[1]["abandoned"] and "[DP_TOO_FEW]" in records[1]["errors"][0]
    assert "lower dp-min-contributors" in records[1]["errors"][0]
    assert UNMASK not in asked and "dp_epsilon" not in records[1]


def test_local_dp_runs_under_secure_aggregation():
    records, *_ = run(dp_config("local"))
    assert records[1]["num_accepted"] == NODES and not records[1].get("abandoned")
    # local DP: each client's own Gaussian release, accounted per client and unamplified —
    # between the exact ε of one Gaussian (multiplier σ/2 for sensitivity 2C) and the classic
    # RDP conversion
    eps = records[1]["dp_epsilon"]
    assert analytic_gaussian_epsilon(SIGMA / 2, 1e-5) <= eps <= classic_rdp_epsilon(
        SIGMA / 2, 1, 1e-5)


def test_more_dp_min_contributors_than_sampled_clients_fails_at_start():
    with pytest.raises(ConfigError, match="dp-min-contributors = 5, but a round samples 3"):
        run(dp_config(dp_min_contributors=5))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"secure_aggregation": False}, "without secure-aggregation = true the server would see"),
    ({"dp_mode": "central"}, "use dp-mode = 'distributed'"),
])
def test_dp_modes_that_do_not_fit_the_aggregation_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        privacy.check_config(config.from_flat(dp_config(**overrides)))


def test_distributed_dp_refuses_data_size_sampling_and_negative_contributors():
    with pytest.raises(ConfigError, match="amplified by uniform sampling"):
        config.from_flat(dp_config(sampling="data-size"))
    with pytest.raises(ConfigError, match="dp-min-contributors must be >= 0"):
        config.from_flat(dp_config(dp_min_contributors=-1))


def test_the_clip_range_check_uses_only_public_values():
    received = {"b": np.array([0.5, -2.0], np.float32)}
    spec = DPSpec("distributed", clip_norm=1.0, noise_multiplier=1.0)
    privacy.check_secure_range(received, spec, 4, clip_range=7.6)  # 2 + 1 + 9 × 0.5 = 7.5
    with pytest.raises(ConfigError, match="raise secagg-clip-range to at least 7.5"):
        privacy.check_secure_range(received, spec, 4, clip_range=7.4)


def test_a_clip_range_too_small_for_the_noise_stops_the_run_before_any_upload():
    asked: list[str] = []
    with pytest.raises(ConfigError, match="secagg-clip-range 0.1 is too small"):
        run(dp_config(secagg_clip_range=0.1),
            on_reply=lambda r: asked.append(r.metadata.message_type))
    assert "train" not in asked


def test_a_node_does_not_guess_or_shrink_its_share_of_the_noise():
    spec = DPSpec("distributed", 1.0, 1.0)
    cfg = config.from_flat(dp_config(dp_min_contributors=4))
    assert _dp_contributors(cfg, spec, {privacy.CONTRIBUTORS_KEY: 4}) == 4
    assert _dp_contributors(cfg, spec, {privacy.CONTRIBUTORS_KEY: 2}) == 2  # more noise: fine
    assert _dp_contributors(cfg, DPSpec("local", 1.0, 1.0), {}) == 1
    with pytest.raises(ConfigError, match="refuses to upload an update"):
        _dp_contributors(cfg, spec, {})
    with pytest.raises(ConfigError, match="allows at most 4 contributors"):
        _dp_contributors(cfg, spec, {privacy.CONTRIBUTORS_KEY: 40})


def test_the_release_log_survives_a_torn_line_and_a_fresh_run_resets_it(tmp_path):
    log = privacy.ReleaseLog(tmp_path / "ck" / privacy.RELEASES)
    assert log.after(0) == []
    log.append(1, 3, 10)
    log.append(2, 3, 10)
    with log.path.open("a") as fh:
        fh.write('{"round": 3, "sam')  # a crash in mid-write: its messages never left
    log.append(3, 4, 10)  # the resumed attempt
    assert log.after(1) == [{"round": 2, "sample": 3, "population": 10},
                            {"round": 3, "sample": 4, "population": 10}]
    log.reset()
    assert log.after(0) == []


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_a_resume_charges_the_dp_rounds_run_after_the_checkpoint(tmp_path, mode):
    """A run that crashed after round 3 released its aggregate but before round 3's
    checkpoint resumes from round 2 and repeats round 3 with fresh noise: ε counts four
    releases, not three (and DP needs no checkpoint every round for that)."""
    from clients.app import app as client_app
    from fedlora.federation import checkpoint
    from server.inprocess import InProcessGrid
    from server.strategy import FederatedLora

    flat = dp_config(mode, num_server_rounds=3, checkpoint_every=2, checkpoint_keep=5,
                     secure_aggregation=mode == "distributed")
    cfg = config.from_flat(flat)
    server_model = ServerModel(cfg, cfg.fl.max_rank)
    nodes = [{"partition-id": i, "num-partitions": NODES} for i in range(NODES)]
    records: list[dict] = []
    first = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                          records.append)
    first.run(InProcessGrid(client_app, nodes, flat), checkpoint_dir=tmp_path)
    assert [r["dp_epsilon"] > 0 for r in records[1:]] == [True] * 3
    (tmp_path / "round-000003" / checkpoint.MANIFEST).unlink()  # the crash: no round-3 ck

    ck = checkpoint.load_latest(tmp_path, warn=lambda text: None)
    assert ck.round == 2
    again: list[dict] = []
    second = FederatedLora(config.from_flat({**flat, "resume": True}),
                           server_model.initial_global(), server_model.evaluate, again.append)
    second.restore(ck)
    second.run(InProcessGrid(client_app, nodes, flat), start_round=3, checkpoint_dir=tmp_path)
    want = Accountant(cfg.fl.dp_spec(), NODES)
    for _ in range(4):
        want.record_round(NODES)
    assert again[-1]["dp_epsilon"] == pytest.approx(want.epsilon())
    assert again[-1]["dp_epsilon"] > records[-1]["dp_epsilon"]
    # a fresh run in the same directory starts a new log
    FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                  lambda r: None).run(InProcessGrid(client_app, nodes, flat),
                                      checkpoint_dir=tmp_path)
    assert [a["round"] for a in privacy.ReleaseLog(tmp_path / privacy.RELEASES).after(0)] == \
        [1, 2, 3]


@pytest.mark.parametrize(("overrides", "message"), [
    ("secure-aggregation=true dp-mode=distributed dp-min-contributors=5",
     "dp-min-contributors = 5, but a round samples 3 of the 3 nodes"),
    ("dp-mode=distributed", "Set secure-aggregation = true"),
])
def test_fedlora_run_refuses_distributed_dp_that_cannot_work_before_starting(
        tmp_path, overrides, message):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "fedlora", "run", "--num-clients", "3",
                          "--out", str(tmp_path / "never"), "-c", "strategy=ffa " + overrides],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "never" / "metrics.jsonl").exists()


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_with_an_untrusted_server_only_the_noisy_update_says_anything_about_training(mode):
    metrics_sent: list[dict] = []

    def watch(reply):
        if reply.metadata.message_type == "train" and not reply.has_error():
            metrics_sent.append(dict(reply.content["metrics"]))

    records, *_ = run(dp_config(mode), on_reply=watch)
    assert len(metrics_sent) == NODES
    for metrics in metrics_sent:
        assert metrics["train-loss"] == 0.0
        assert "dp-norm" not in metrics and "dp-clip-factor" not in metrics
        assert not set(privacy.TIMINGS) & set(metrics)
    assert "train_loss" not in records[1] and records[1]["num_accepted"] == NODES


def test_a_trusted_server_gets_the_norms_and_losses():
    metrics, dp = {"train-loss": 1.5}, {"dp-norm": 0.3, "dp-clip-factor": 0.33}
    privacy.withhold_metrics(DPSpec("central", 0.1, 1.0), metrics, dp)
    assert metrics == {"train-loss": 1.5, **dp}
