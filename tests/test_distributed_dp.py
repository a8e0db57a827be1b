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
from fedlora import config, privacy
from fedlora.errors import ConfigError
from fedlora.evaluator import ServerModel
from fedlora.privacy import Accountant, DPSpec, noise_std, privatize
from fedlora.secure_client import check_fits
from fedlora.secure_wire import UNMASK
from tests.fl_harness import tiny_config
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


def test_distributed_and_central_dp_report_the_same_epsilon():
    central, distributed = (Accountant(DPSpec(mode, 1.0, 1.1), population=100)
                            for mode in ("central", "distributed"))
    for accountant in (central, distributed):
        for _ in range(5):
            accountant.record_round(10)
    assert distributed.epsilon() == central.epsilon() > 0


def test_the_unmasked_mean_carries_sigma_c_over_m_of_noise():
    """Training is seeded and the noise is not, so two runs that differ only in σ give the
    same clipped updates: their global B differs by the mean of 3 clients' noise shares,
    N(0, (σC/√3)²/3) per coordinate, i.e. std σC/3."""
    records, noisy, *_ = run(dp_config(sigma=SIGMA))
    quiet_records, quiet, *_ = run(dp_config(sigma=1e-9))
    assert records[1]["num_accepted"] == quiet_records[1]["num_accepted"] == NODES
    diff = np.concatenate([(noisy.arrays_for(8)[k] - quiet.arrays_for(8)[k]).ravel()
                           for k in quiet.arrays_for(8) if "lora_A" not in k])
    assert diff.size > 5_000
    assert np.std(diff) == pytest.approx(SIGMA * CLIP / NODES, rel=0.06)
    assert abs(np.mean(diff)) < 4 * SIGMA * CLIP / NODES / np.sqrt(diff.size)
    initial = ServerModel(config.from_flat(dp_config()), 64).initial_global().arrays_for(8)
    for key, value in noisy.arrays_for(8).items():  # FFA: the frozen A gets no noise
        if "lora_A" in key:
            assert np.array_equal(value, initial[key]), key
    assert records[1]["dp_epsilon"] > 0 and records[1]["dp_delta"] == 1e-5
    assert records[1]["secagg_error_bound"] < 1e-7  # weight 1: the fine fixed-point step


def test_a_sum_of_fewer_than_dp_min_contributors_is_never_unmasked():
    asked: list[str] = []
    records, glob, grid, error = run(dp_config(), fail=fails_at(2, 1),
                                     on_reply=lambda r: asked.append(r.metadata.message_type))
    record = records[1]
    assert record["abandoned"] and "dp-min-contributors is 3" in record["errors"][0]
    assert UNMASK not in asked  # no share requested: the masked sum stays masked
    assert "dp_epsilon" not in record  # nothing released, nothing spent
    initial = ServerModel(config.from_flat(dp_config()), 64).initial_global().arrays_for(8)
    for key, value in glob.arrays_for(8).items():
        assert np.array_equal(value, initial[key]), key
    assert error is not None


def test_a_lower_dp_min_contributors_tolerates_a_dropout():
    records, *_ = run(dp_config(dp_min_contributors=2), fail=fails_at(2, 1))
    assert records[1]["num_accepted"] == 2 and not records[1].get("abandoned")
    assert records[1]["dp_epsilon"] > 0


def test_local_dp_runs_under_secure_aggregation():
    records, *_ = run(dp_config("local"))
    assert records[1]["num_accepted"] == NODES and records[1]["dp_epsilon"] > 0


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


def test_a_node_does_not_upload_what_the_codec_would_clip():
    check_fits({"b": np.array([0.5, -7.9], np.float32)}, clip_range=8.0)
    with pytest.raises(ConfigError, match="outside secagg-clip-range 8"):
        check_fits({"b": np.array([0.5, -8.5], np.float32)}, clip_range=8.0)


def test_a_node_does_not_guess_its_share_of_the_noise():
    spec = DPSpec("distributed", 1.0, 1.0)
    assert _dp_contributors(spec, {privacy.CONTRIBUTORS_KEY: 4}) == 4
    assert _dp_contributors(DPSpec("local", 1.0, 1.0), {}) == 1
    with pytest.raises(ConfigError, match="refuses to upload"):
        _dp_contributors(spec, {})


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
    assert "train_loss" not in records[1] and records[1]["num_accepted"] == NODES


def test_a_trusted_server_gets_the_norms_and_losses():
    metrics, dp = {"train-loss": 1.5}, {"dp-norm": 0.3, "dp-clip-factor": 0.33}
    privacy.withhold_metrics(DPSpec("central", 0.1, 1.0), metrics, dp)
    assert metrics == {"train-loss": 1.5, **dp}
