"""The 2025 rules (fedsvd, lora-fair, raflora) end to end: the real strategy against the real
ClientApp in process (``tests/fl_harness.py``), with partial participation, secure
aggregation and differential privacy where the rule allows them."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora import config
from fedlora.aggregation import scale_for_rank
from fedlora.errors import ConfigError
from fedlora.learning import lora
from fedlora.learning.evaluator import ServerModel
from server.strategy import build_optimizer
from tests.fl_harness import run_rounds, tiny_config
from tests.test_secure_rounds import ONE_ROUND, run, tolerance

RANK = 8  # lora.r of the tiny preset


def modules(arrays: dict[str, np.ndarray]) -> list[str]:
    return sorted(k[: -len(lora.LORA_A)] for k in arrays if k.endswith(lora.LORA_A))


def products(arrays: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    return {m: scale * arrays[m + lora.LORA_B].astype(np.float64)
            @ arrays[m + lora.LORA_A].astype(np.float64) for m in modules(arrays)}


def assert_orthonormal_a(arrays: dict[str, np.ndarray]) -> None:
    for m in modules(arrays):
        a = arrays[m + lora.LORA_A].astype(np.float64)
        np.testing.assert_allclose(a @ a.T, np.eye(a.shape[0]), atol=1e-5, err_msg=m)


def train_replies(replies: list) -> list[dict[str, np.ndarray]]:
    out = []
    for reply in replies:
        if reply.metadata.message_type == "train" and not reply.has_error():
            arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
            out.append((int(reply.content["metrics"]["num-examples"]), arrays))
    return out


# --------------------------------------------------------------------------- fedsvd


def test_fedsvd_round_is_the_svd_of_the_mean_b_times_the_a_the_server_sent():
    """Partial participation (2 of 4 nodes): the round's global ΔW is Σ p_k s B_k A_sent,
    computed densely from the replies, and the new A has orthonormal rows."""
    flat = tiny_config(strategy="fedsvd", num_server_rounds=1, num_train_nodes=2,
                       min_available_nodes=4)
    replies: list = []
    records, _, glob, server_model = run_rounds(flat, num_nodes=4, on_reply=replies.append)
    assert records[1]["num_sampled"] == 2 and records[1]["num_accepted"] == 2
    assert records[1]["agg_error_max"] < 1e-6  # exact
    cfg = config.from_flat(flat)
    scale = scale_for_rank(RANK, cfg.lora.alpha, cfg.lora.use_rslora)
    sent = ServerModel(cfg, cfg.fl.max_rank).initial_global().arrays_for(RANK)
    got = glob.arrays_for(RANK)
    assert_orthonormal_a(got)
    uploads = train_replies(replies)
    assert len(uploads) == 2 and all(not any(k.endswith(lora.LORA_A) for k in a)
                                     for _, a in uploads)  # only B travels
    total = sum(n for n, _ in uploads)
    for m, delta in products(got, scale).items():
        b_mean = sum(n / total * a[m + lora.LORA_B].astype(np.float64) for n, a in uploads)
        want = scale * b_mean @ sent[m + lora.LORA_A].astype(np.float64)
        np.testing.assert_allclose(delta, want, atol=1e-6, err_msg=m)


def test_fedsvd_under_secure_aggregation_equals_the_plain_round():
    records, glob, _, error = run(tiny_config(**ONE_ROUND, secure_aggregation=True,
                                              strategy="fedsvd"))
    plain_records, plain_glob, _, plain_error = run(tiny_config(**ONE_ROUND, strategy="fedsvd"))
    assert error is None and plain_error is None
    assert records[1]["num_accepted"] == 3 and "secagg_error_bound" in records[1]
    got, want = glob.arrays_for(RANK), plain_glob.arrays_for(RANK)
    assert_orthonormal_a(got)
    cfg = config.from_flat(tiny_config(strategy="fedsvd"))
    scale = scale_for_rank(RANK, cfg.lora.alpha, cfg.lora.use_rslora)
    # B̄ is decoded within the codec bound; the product s·B̄·A_sent moves by at most that
    # bound times s·‖A_sent‖ (A's entries are below 1/sqrt(n), n ≤ 384 inputs per row)
    atol = tolerance(tiny_config(**ONE_ROUND, secure_aggregation=True), records[1], want)
    got_p, want_p = products(got, scale), products(want, scale)
    for m in want_p:
        np.testing.assert_allclose(got_p[m], want_p[m], atol=50 * scale * atol + 1e-6,
                                   err_msg=m)


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_fedsvd_runs_under_client_level_dp(mode):
    extra = {"secure_aggregation": True} if mode == "distributed" else {}
    flat = tiny_config(**ONE_ROUND, strategy="fedsvd", dp_mode=mode, dp_clip_norm=0.1,
                       dp_noise_multiplier=0.5, **extra)
    records, glob, _, error = run(flat)
    assert error is None
    assert records[1]["num_accepted"] == 3 and records[1]["dp_epsilon"] > 0
    got = glob.arrays_for(RANK)
    assert_orthonormal_a(got)  # the SVD ran on the noisy mean
    initial = ServerModel(config.from_flat(flat), 64).initial_global().arrays_for(RANK)
    for m in modules(got):  # A was replaced, not left at the seeded init (as FFA would)
        assert not np.allclose(got[m + lora.LORA_A], initial[m + lora.LORA_A])


def test_fedsvd_rejects_a_node_that_uploads_the_frozen_a_and_aggregates_the_others():
    """A hostile node sends a moved A along with B: KEY_MISMATCH, and the round is the SVD of
    the other two nodes' mean B times the A the server sent."""
    from flwr.app import Array

    def tamper(reply):
        if reply.metadata.message_type == "train" and \
                int(reply.content["metrics"]["partition-id"]) == 1:
            arrays = reply.content["arrays"]
            for key in [k for k in arrays if k.endswith(lora.LORA_B)]:
                a_key = key[: -len(lora.LORA_B)] + lora.LORA_A
                rows = arrays[key].numpy().shape[1]
                arrays[a_key] = Array(np.full((rows, 384), 0.5, np.float32))

    flat = tiny_config(strategy="fedsvd", num_server_rounds=1)
    replies: list = []
    records, _, glob, _ = run_rounds(flat, on_reply=lambda r: (tamper(r), replies.append(r)))
    assert records[1]["rejected"] == {"KEY_MISMATCH": 1} and records[1]["clients"] == [0, 2]
    cfg = config.from_flat(flat)
    scale = scale_for_rank(RANK, cfg.lora.alpha, cfg.lora.use_rslora)
    sent = ServerModel(cfg, cfg.fl.max_rank).initial_global().arrays_for(RANK)
    got = glob.arrays_for(RANK)
    assert_orthonormal_a(got)
    honest = [(n, a) for n, a in train_replies(replies)
              if not any(k.endswith(lora.LORA_A) for k in a)]
    assert len(honest) == 2
    total = sum(n for n, _ in honest)
    for m, delta in products(got, scale).items():
        b_mean = sum(n / total * a[m + lora.LORA_B].astype(np.float64) for n, a in honest)
        want = scale * b_mean @ sent[m + lora.LORA_A].astype(np.float64)
        np.testing.assert_allclose(delta, want, atol=1e-6, err_msg=m)


def test_fedsvd_refuses_a_server_optimizer_with_the_reason():
    cfg = config.from_flat(tiny_config(strategy="fedsvd", server_optimizer="fedadam"))
    with pytest.raises(ConfigError, match="rotation"):
        build_optimizer(cfg)


# --------------------------------------------------------------------------- lora-fair


def test_lora_fair_corrects_fedits_aggregation_error_on_the_same_replies():
    """Round 1 starts from the same seeded adapter and trains with the same seeds, so both
    rules aggregate identical replies (2 of 4 nodes sampled); lora-fair's error is lower."""
    common = {"num_server_rounds": 1, "num_train_nodes": 2, "min_available_nodes": 4}
    fair, *_ = run_rounds(tiny_config(strategy="lora-fair", **common), num_nodes=4)
    fedit, *_ = run_rounds(tiny_config(strategy="fedit", **common), num_nodes=4)
    assert fair[1]["clients"] == fedit[1]["clients"] and fair[1]["num_accepted"] == 2
    assert fair[1]["train_loss"] == fedit[1]["train_loss"]  # the same local training
    for module, error in fair[1]["agg_error"].items():
        assert error < fedit[1]["agg_error"][module], module


# --------------------------------------------------------------------------- raflora


def test_raflora_runs_mixed_ranks_with_partial_participation_and_checkpoints():
    """6 nodes of ranks 4/8/16, 3 sampled per round: every rank up to max-rank receives live
    components only, and the global adapter survives a checkpoint round trip."""
    from fedlora.federation.global_adapter import GlobalAdapter

    flat = tiny_config(strategy="raflora", num_server_rounds=2, num_train_nodes=3,
                       min_available_nodes=6, rank_by_partition="4,8,16", max_rank=16)
    records, _, glob, _ = run_rounds(flat, num_nodes=6)
    assert [r["num_accepted"] for r in records[1:]] == [3, 3]
    for rank in (4, 8, 16):
        arrays = glob.arrays_for(rank)
        for m in modules(arrays):
            a, b = arrays[m + lora.LORA_A], arrays[m + lora.LORA_B]
            assert a.shape[0] == rank == b.shape[1]
            dead = (np.abs(a).max(axis=1) == 0) & (np.abs(b).max(axis=0) == 0)
            assert not dead.any(), (rank, m)
    state, arrays = glob.state_dict()
    again = GlobalAdapter.from_state(state, arrays)
    for key, value in glob.arrays_for(16).items():
        np.testing.assert_array_equal(again.arrays_for(16)[key], value)


# --------------------------------------------------------------------------- listing


def test_fedlora_strategies_lists_the_new_rules_with_their_compatibility(capsys):
    from fedlora.cli.main import cmd_strategies

    assert cmd_strategies(None) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "mixed-ranks=no " in lines["fedsvd"] and "exact=yes" in lines["fedsvd"]
    assert "secure-aggregation=yes" in lines["fedsvd"] and lines["fedsvd"].endswith("dp=yes")
    assert "secure-aggregation=no " in lines["lora-fair"] and lines["lora-fair"].endswith("dp=no")
    assert "mixed-ranks=yes" in lines["raflora"] and "secure-aggregation=no " in lines["raflora"]


# --------------------------------------------------------------------------- CLI, on Ray

TINY_CLI = ("model.num-hidden-layers=1 data.samples-per-client=32 data.eval-samples=64 "
            "data.max-length=32 train.local-steps=3")


@pytest.mark.slow
def test_fedsvd_runs_through_fedlora_run_with_secure_aggregation_and_distributed_dp(tmp_path):
    from fedlora.federation.outputs import read_metrics
    from tests.test_simulation import fedlora_cli, reevaluate

    out = tmp_path / "fedsvd"
    res = fedlora_cli("run", "--num-clients", "3", "--rounds", "2", "--out", str(out), "-c",
                      f"strategy=fedsvd secure-aggregation=true dp-mode=distributed "
                      f"dp-clip-norm=0.05 dp-noise-multiplier=0.5 {TINY_CLI}")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    records = read_metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:  # the untrusted server gets no train loss under distributed DP
        assert r["num_accepted"] == 3 and r["dp_epsilon"] > 0 and "secagg_error_bound" in r
        assert "train_loss" not in r
    again = reevaluate(out)  # the exported PEFT adapter reproduces the last metrics
    assert again["eval-accuracy"] == pytest.approx(records[-1]["eval_accuracy"], abs=0.01)
    assert again["eval-loss"] == pytest.approx(records[-1]["eval_loss"], rel=1e-3)


@pytest.mark.long  # 1-3.5 min on 2 cores: make test-long (CI budget)
@pytest.mark.slow
def test_the_new_rules_run_through_fedlora_experiment(tmp_path):
    """fedsvd and lora-fair at equal ranks, raflora with ranks 4/8/16: every cell finishes
    and the report lists the three."""
    import csv
    import json

    from tests.test_experiment import cli

    spec = tmp_path / "new.toml"
    spec.write_text(f"""
name = "new-rules"
preset = "bbc-minilm"
seeds = [0]
baselines = []
[base]
num-clients = 3
num-server-rounds = 2
{chr(10).join(item.replace("=", " = ") for item in TINY_CLI.split())}
[[strategies]]
strategy = "fedsvd"
[[strategies]]
strategy = "lora-fair"
[[strategies]]
strategy = "raflora"
rank-by-partition = "4,8,16"
[[settings]]
label = "iid"
data.partitioner = "iid"
""")
    res = cli(str(spec), "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    for label in ("fedsvd", "lora-fair", "raflora"):
        status = json.loads((tmp_path / "out" / "cells" / f"iid--{label}--seed0" / "cell.json")
                            .read_text())
        assert status["status"] == "done", status
    with (tmp_path / "out" / "runs.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == "federated"]
    assert {r["label"] for r in rows} == {"fedsvd", "lora-fair", "raflora"}
    assert len(rows) == 3 * 3  # rounds 0..2 per cell
