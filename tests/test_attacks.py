"""Attack simulation (``attack``, ``attackers``, ``attack-scale``): the attacking ClientApp
really sends the hostile message, and the real ServerApp strategy faces it in process.

Protocol and secure-aggregation attacks: the run survives, the attacker is rejected with a
reason, and the global adapter equals the honest replies' aggregate computed here. Poisoning
attacks: plain fedit is
measurably hurt, and the robust settings end within a stated margin of their clean run.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Mapping

import numpy as np
import pytest
from flwr.app import Message

from fedlora import config
from fedlora.errors import ConfigError
from fedlora.experiments import attacks
from fedlora.federation.transport import unpack
from fedlora.learning import lora
from fedlora.learning.evaluator import ServerModel
from fedlora.privacy import secure_client
from fedlora.runtime import deploy
from server.inprocess import InProcessGrid
from server.strategy import FederatedLora
from tests.fl_harness import client_app, tiny_config


def partition_of(node_id: int) -> int:
    return (node_id - 1000) // 7  # InProcessGrid's node ids


# --------------------------------------------------------------------------- config, CLI


def test_every_required_attack_is_listed_by_fedlora_attacks():
    required = {"malformed-array", "huge-header", "wrong-record-type", "bad-metrics",
                "bad-discovery", "bad-eval-count", "sign-flip", "scale", "noise", "free-rider",
                "head-poison", "weight-inflation", "low-order-key", "forged-shares",
                "shifted-share", "bad-weight-word"}
    res = subprocess.run([sys.executable, "-m", "fedlora", "attacks"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    listed = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert listed == required == set(attacks.ATTACKS)


@pytest.mark.parametrize(("text", "count", "ids"), [
    ("2", 2, ()), (" 1 ", 1, ()), ("3,7", None, (3, 7)), ("5,", None, (5,)),
    ("7,3,3", None, (3, 7))])
def test_attackers_is_a_count_or_partition_ids_with_a_comma(text, count, ids):
    assert attacks.parse_attackers(text) == (count, ids)


@pytest.mark.parametrize("text", ["0", "-1", "x", ",", "1,-2", "a,b"])
def test_bad_attackers_are_refused_with_both_forms_named(text):
    with pytest.raises(ConfigError, match="a count .* or partition ids"):
        attacks.parse_attackers(text)


def test_a_count_takes_the_first_partitions_and_ids_are_checked_against_the_federation():
    cfg = config.from_flat(tiny_config(attack="scale", attackers="2"))
    assert attacks.attacking_partitions(cfg, 5) == {0, 1}
    with pytest.raises(ConfigError, match="no honest client"):
        attacks.attacking_partitions(cfg, 2)
    cfg = config.from_flat(tiny_config(attack="scale", attackers="1,4"))
    assert attacks.attacking_partitions(cfg, 5) == {1, 4}
    with pytest.raises(ConfigError, match=r"partitions \[4\].*0\.\.3"):
        attacks.attacking_partitions(cfg, 4)


@pytest.mark.parametrize(("keys", "message"), [
    ({"attack": "flood"}, "unknown attack 'flood'"),
    ({"attack": "scale"}, "needs attackers"),
    ({"attackers": "1"}, "no attack is named"),
    ({"attack": "scale", "attackers": "1", "attack-scale": 0.0}, "attack-scale must be"),
    ({"attack": "low-order-key", "attackers": "1"}, "set secure-aggregation = true"),
    ({"attack": "wrong-record-type", "attackers": "1", "secure-aggregation": True},
     "never sends"),
    ({"attack": "bad-eval-count", "attackers": "1"}, "fraction-evaluate > 0"),
    ({"attack": "weight-inflation", "attackers": "1", "dp-mode": "local"},
     "every update weighs the same"),
    ({"attack": "head-poison", "attackers": "1", "model.task": "causal-lm",
      "data.source": "chatterbot"}, "uploads no head"),
    ({"attack": "scale", "attackers": "1", "secure-aggregation": True, "strategy": "hetlora"},
     "secure hetlora"),
])
def test_an_attack_that_cannot_act_is_refused_with_the_reason(keys, message):
    with pytest.raises(ConfigError, match=message):
        config.from_flat(tiny_config(**keys))


def test_deployment_refuses_attacks_before_starting_anything(tmp_path, monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("launch went past its checks with an attack configured")

    monkeypatch.setattr(deploy, "node_count", started)  # the first step after the checks
    with pytest.raises(deploy.DeployError, match="for simulations"):
        deploy.launch({"attack": "scale", "attackers": "1"}, out=tmp_path / "run", nodes=2)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- pure pieces


def test_poisoned_uploads_follow_their_formulas_and_leave_heads_to_head_poison():
    rng = np.random.default_rng(0)
    received = {"m.lora_A.weight": rng.normal(size=(2, 3)).astype(np.float32),
                "m.lora_B.weight": np.zeros((3, 2), np.float32),
                "classifier.weight": rng.normal(size=(4, 3)).astype(np.float32)}
    delta = {k: rng.normal(size=v.shape).astype(np.float32) * 0.01 for k, v in received.items()}
    honest = {k: received[k] + delta[k] for k in received}
    a, b, head = "m.lora_A.weight", "m.lora_B.weight", "classifier.weight"

    def run(name, **kw):
        return attacks.poison(name, honest, received, 7.0, np.random.default_rng(1), **kw)

    np.testing.assert_allclose(run("sign-flip")[a], received[a] - delta[a], atol=1e-6)
    np.testing.assert_allclose(run("scale")[b], received[b] + 7 * delta[b], atol=1e-6)
    for name in ("sign-flip", "scale", "noise"):
        np.testing.assert_array_equal(run(name)[head], honest[head])
    noisy = run("noise")[a] - received[a]
    rms = float(np.sqrt(np.mean(delta[a].astype(np.float64) ** 2)))
    assert 0.2 * 7 * rms < float(np.std(noisy)) < 5 * 7 * rms
    assert all(np.array_equal(run("free-rider")[k], received[k]) for k in received)
    poisoned = run("head-poison")
    assert np.all(poisoned[head] == np.float32(1e30))
    np.testing.assert_array_equal(poisoned[a], honest[a])
    assert np.all(run("head-poison", wire_max=65504.0)[head] == np.float32(32752.0))
    assert all(np.array_equal(run("weight-inflation")[k], honest[k]) for k in received)


def test_malformed_array_truncates_the_body_and_huge_header_declares_2_to_the_42():
    from flwr.app import Array

    original = Array(np.arange(12, dtype=np.float32).reshape(3, 4))
    cut = attacks.corrupt_array("malformed-array", original)
    assert (cut.dtype, tuple(cut.shape)) == ("float32", (3, 4))
    assert original.data.startswith(cut.data) and len(cut.data) == len(original.data) - 24
    with pytest.raises(ValueError):
        cut.numpy()
    huge = attacks.corrupt_array("huge-header", original)
    assert attacks.npy_header("float32", (1 << 42,)) + b"\0" * 16 == huge.data


# --------------------------------------------------------------------------- harness


def run_plain(n: int, **keys):
    """One round of the real strategy and ClientApp; (round record, grid, global, replies)."""
    flat = tiny_config(**{"num-server-rounds": 1, **keys})
    cfg = config.from_flat(flat)
    replies: list[Message] = []
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": n}
                                      for i in range(n)], flat, on_reply=replies.append)
    glob = ServerModel(cfg, cfg.fl.max_rank).initial_global()
    records: list[dict] = []
    FederatedLora(cfg, glob, lambda g: None, records.append, run_id=grid.run_id).run(grid)
    return records, grid, glob, replies


def honest_mean(replies: list[Message], partitions: set[int]) -> dict[str, np.ndarray]:
    """The example-weighted mean of the train replies of ``partitions`` (fedit's aggregate)."""
    total, weight = {}, 0
    for reply in replies:
        if (reply.metadata.message_type != "train" or reply.has_error()
                or partition_of(reply.metadata.src_node_id) not in partitions):
            continue
        n = int(reply.content["metrics"]["num-examples"])
        for key, value in unpack(reply.content["arrays"]).items():
            total[key] = total.get(key, 0.0) + n * value.astype(np.float64)
        weight += n
    return {k: v / weight for k, v in total.items()}


def assert_global_is(glob, expected: Mapping[str, np.ndarray], atol: float = 1e-6) -> None:
    got = glob.arrays_for(8)
    assert set(expected) <= set(got)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=atol, rtol=1e-5, err_msg=key)


def rejected(record: Mapping) -> int:
    return sum(v for k, v in record.get("rejected", {}).items() if k != "NO_REPLY")


# --------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("attack", [
    "malformed-array",
    "huge-header",
    "wrong-record-type",
    "bad-metrics",
])
def test_a_malformed_train_reply_is_rejected_with_a_reason_and_the_round_keeps_the_rest(attack):
    records, grid, glob, replies = run_plain(3, attack=attack, attackers="2,")

    last = records[-1]
    assert last["round"] == 1 and not last.get("abandoned")
    assert last["clients"] == [0, 1] and rejected(last) == 1
    assert_global_is(glob, honest_mean(replies, {0, 1}))


def test_bad_discovery_answers_drop_those_nodes_and_the_rest_train():
    records, grid, glob, replies = run_plain(5, attack="bad-discovery", attackers="1,2,3")

    last = records[-1]
    assert last["clients"] == [0, 4] and not last.get("abandoned")
    assert_global_is(glob, honest_mean(replies, {0, 4}))


def test_a_negative_evaluation_count_is_left_out_of_federated_evaluation():
    records, grid, glob, replies = run_plain(3, attack="bad-eval-count", attackers="1,",
                                             **{"fraction-evaluate": 1.0})

    assert [r["fed_eval_clients"] for r in records] == [2, 2]
    evals = [r for r in replies if r.metadata.message_type == "evaluate"
             and partition_of(r.metadata.src_node_id) != 1][-2:]
    n = [int(r.content["metrics"]["num-examples"]) for r in evals]
    loss = sum(float(r.content["metrics"]["eval-loss"]) * k for r, k in zip(evals, n,
                                                                             strict=True))
    assert records[-1]["fed_eval_loss"] == pytest.approx(loss / sum(n))


def test_a_signed_attacker_signs_its_poisoned_reply_and_the_server_accepts_the_signature():
    records, grid, glob, replies = run_plain(3, attack="scale", attackers="0,",
                                             **{"sign-updates": True})

    assert not records[-1].get("rejected")
    assert records[-1]["clients"] == [0, 1, 2]
    assert_global_is(glob, honest_mean(replies, {0, 1, 2}))  # the poisoned reply included


# --------------------------------------------------------------------------- poisoning


def dense_update(glob) -> dict[str, np.ndarray]:
    """The global ΔW = s·B·A of every module (heads excluded: see the module docstring)."""
    return {m: f.scale * f.b.astype(np.float64) @ f.a.astype(np.float64)
            for m, f in glob.export_factors().items()}


@functools.cache
def poisoned_run(strategy: str, attack: str, extra: tuple = ()) -> dict[str, np.ndarray]:
    keys = {"strategy": strategy, **dict(extra)}
    if attack:
        keys.update(attack=attack, attackers="2,")
    records, grid, glob, replies = run_plain(5, **keys)
    assert records[-1]["num_accepted"] == 5
    return dense_update(glob)


def distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """‖a − b‖ over all modules, relative to the clean fedit round's ‖ΔW‖ (one yardstick for
    every rule)."""
    clean = poisoned_run("fedit", "")
    num = sum(float(np.sum((a[m] - b[m]) ** 2)) for m in clean)
    return (num / sum(float(np.sum(v ** 2)) for v in clean.values())) ** 0.5


# attack → (fedit hurt at least, the robust rule within), as distances relative to the clean
# fedit round's ‖ΔW‖, 1 attacker of 5, one round of the tiny harness model. Measured: fedit
# 0.87 / 113 / 73 / 0.44 / 2.0; robust (coordinate-wise median) 1.5 / 1.2 / 1.3 / 0.86 / 0.
# Two local steps on 24 examples give updates that agree little across clients, so replacing
# one of five moves the median by about one clean update: robust bounds the boosted and noisy
# updates (~1 instead of ~100) and ignores declared weights exactly, but does worse than the
# mean against a sign flip or a free rider, whose updates are no larger than honest ones.
POISONING = {
    "sign-flip": (0.5, 2.0),
    "scale": (20.0, 2.0),
    "noise": (20.0, 2.0),
    "free-rider": (0.25, 2.0),
    "weight-inflation": (1.0, 1e-9),
}


@pytest.mark.parametrize("attack", list(POISONING))
def test_a_poisoning_attack_hurts_fedit_and_the_robust_rule_stays_within_its_margin(attack):
    hurt, margin = POISONING[attack]

    fedit_gap = distance(poisoned_run("fedit", attack), poisoned_run("fedit", ""))
    robust_gap = distance(poisoned_run("robust", attack), poisoned_run("robust", ""))

    assert fedit_gap >= hurt
    assert robust_gap <= margin


@pytest.mark.parametrize("attack", ["scale", "noise"])
def test_clipped_fedit_bounds_a_boosted_or_noisy_update(attack):
    # every honest update is longer than 0.05 here, so the boosted one clips back onto its own
    # honest direction (measured gap 0.0), the noisy one to a short random one (0.08)
    clip = (("clip-update-norm", 0.05),)
    gap = distance(poisoned_run("fedit", attack, clip), poisoned_run("fedit", "", clip))
    assert gap <= 0.2
    assert distance(poisoned_run("fedit", attack), poisoned_run("fedit", "")) >= 20


def test_free_rider_sends_back_exactly_what_it_received():
    records, grid, glob, replies = run_plain(3, attack="free-rider", attackers="1,")

    sent = [m for m in grid.delivered if m.metadata.message_type == "train"
            and partition_of(m.metadata.dst_node_id) == 1]
    reply = [r for r in replies if r.metadata.message_type == "train"
             and partition_of(r.metadata.src_node_id) == 1]
    got, received = unpack(reply[0].content["arrays"]), unpack(sent[0].content["arrays"])
    assert got and all(np.array_equal(v, received[k]) for k, v in got.items())
    assert records[-1]["clients"] == [0, 1, 2]
    assert_global_is(glob, honest_mean(replies, {0, 1, 2}))


def test_a_poisoned_head_is_rejected_by_the_norm_bound():
    records, grid, glob, replies = run_plain(3, attack="head-poison", attackers="1,")

    assert records[-1]["clients"] == [0, 2] and rejected(records[-1]) == 1
    assert_global_is(glob, honest_mean(replies, {0, 2}))


def test_a_poisoned_head_is_really_sent_at_1e30():
    records, grid, glob, replies = run_plain(3, attack="head-poison", attackers="1,")

    reply = [r for r in replies if r.metadata.message_type == "train"
             and partition_of(r.metadata.src_node_id) == 1][0]
    heads = {k: v for k, v in unpack(reply.content["arrays"]).items()
             if not k.endswith((lora.LORA_A, lora.LORA_B))}
    assert heads and all(np.all(v == np.float32(1e30)) for v in heads.values())


# --------------------------------------------------------------------------- secure rounds


def secure_round(attack: str, n: int = 5, attacker: int = 2):
    """Discovery and one secure round; (record, global, {partition: (upload, weight)})."""
    flat = tiny_config(**{"num-server-rounds": 1, "secure-aggregation": True,
                          "attack": attack, "attackers": f"{attacker}," if attack else ""})
    cfg = config.from_flat(flat)
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": n}
                                      for i in range(n)], flat)
    uploads: dict[int, tuple[dict[str, np.ndarray], int]] = {}
    begin = secure_client.begin

    def record_upload(context, settings, server_round, outgoing, weight):
        uploads[partition_of(context.node_id)] = ({k: np.array(v) for k, v in
                                                   outgoing.items()}, int(weight))
        return begin(context, settings, server_round, outgoing, weight)

    glob = ServerModel(cfg, cfg.fl.max_rank).initial_global()
    initial = glob.arrays_for(8)
    strategy = FederatedLora(cfg, glob, lambda g: None, lambda r: None, run_id=grid.run_id)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(secure_client, "begin", record_upload)
        nodes = strategy.discover(grid)
        record = strategy.train_round(grid, nodes, 1)
    return record, strategy.glob, uploads, initial


def weighted_mean(uploads, partitions) -> dict[str, np.ndarray]:
    weight = sum(uploads[p][1] for p in partitions)
    keys = uploads[min(partitions)][0]
    return {k: sum(uploads[p][1] * uploads[p][0][k].astype(np.float64) for p in partitions)
            / weight for k in keys}


def assert_secure_outcome(record, glob, uploads, initial, *, attacker: int,
                          must_complete: bool, attacker_input_corrupt: bool) -> None:
    """Abandoned with a reason (global unchanged), or completed with the mean of exactly the
    uploads it names; never a wrong adopted sum."""
    if record.get("abandoned"):
        assert not must_complete, f"round abandoned: {record.get('errors')}"
        assert record.get("abandon_reason") and record.get("errors")
        assert_global_is(glob, initial, atol=0)
        return
    clients = set(record["clients"])
    assert set(uploads) - {attacker} <= clients
    if attacker_input_corrupt:
        assert attacker not in clients
    assert_global_is(glob, weighted_mean(uploads, clients),
                     atol=2 * record["secagg_error_bound"] + 1e-6)


def test_an_honest_secure_round_adopts_the_weighted_mean_of_every_upload():
    record, glob, uploads, initial = secure_round("")

    assert record["clients"] == [0, 1, 2, 3, 4]
    assert_secure_outcome(record, glob, uploads, initial, attacker=-1, must_complete=True,
                          attacker_input_corrupt=False)


def test_a_low_order_key_is_rejected_at_stage_0_and_the_round_completes_without_it():
    record, glob, uploads, initial = secure_round("low-order-key")

    assert rejected(record) >= 1
    assert_secure_outcome(record, glob, uploads, initial, attacker=2, must_complete=True,
                          attacker_input_corrupt=True)


def test_forged_share_ciphertexts_do_not_make_the_honest_clients_leave():
    record, glob, uploads, initial = secure_round("forged-shares")

    assert_secure_outcome(record, glob, uploads, initial, attacker=2, must_complete=True,
                          attacker_input_corrupt=False)


def test_a_shifted_share_is_outvoted_by_the_surplus_shares_and_the_sum_is_right():
    # 5 holders, threshold 3: the two surplus shares expose the bad one, so the round completes
    record, glob, uploads, initial = secure_round("shifted-share")

    assert_secure_outcome(record, glob, uploads, initial, attacker=2, must_complete=True,
                          attacker_input_corrupt=False)


def test_a_bad_weight_word_never_yields_a_wrong_adopted_sum():
    record, glob, uploads, initial = secure_round("bad-weight-word")

    assert_secure_outcome(record, glob, uploads, initial, attacker=2, must_complete=False,
                          attacker_input_corrupt=True)


def test_secure_poisoning_is_masked_in_and_moves_the_secure_mean():
    record, glob, uploads, initial = secure_round("scale")

    # uploads holds what each node trained; the attacker masked 100x its own update instead
    assert record["clients"] == [0, 1, 2, 3, 4]
    honest = weighted_mean(uploads, {0, 1, 2, 3, 4})
    moved = max(float(np.max(np.abs(glob.arrays_for(8)[k] - honest[k]))) for k in honest)
    assert moved > 100 * record["secagg_error_bound"]


# --------------------------------------------------------------------------- fedlora run

TINY_RUN = ("model.num-hidden-layers=1 data.samples-per-client=24 data.eval-samples=32 "
            "data.max-length=32 train.local-steps=2")


def fedlora_run(out, keys: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlora", "run", "--num-clients", "3",
                           "--rounds", "1", "--out", str(out), "-c", f"{TINY_RUN} {keys}"],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_weight_inflation_crosses_flower_in_a_real_simulation(tmp_path):
    from fedlora.federation.outputs import read_metrics

    res = fedlora_run(tmp_path / "run", "attack=weight-inflation attackers='1,'")

    assert res.returncode == 0, res.stdout + res.stderr
    last = read_metrics(tmp_path / "run")[-1]
    assert last["clients"] == [0, 1, 2]
    honest = (last["num_examples"] - 10_000_000) / 2  # partitions 0 and 2 declare their own
    assert honest == int(honest) and 0 < honest <= 100


@pytest.mark.slow
def test_bad_metrics_in_a_real_simulation_are_rejected_and_counted_in_metrics_jsonl(tmp_path):
    from fedlora.federation.outputs import read_metrics

    res = fedlora_run(tmp_path / "run", "attack=bad-metrics attackers='1,'")

    assert res.returncode == 0, res.stdout + res.stderr
    last = read_metrics(tmp_path / "run")[-1]
    assert last["clients"] == [0, 2] and rejected(last) == 1


def upload_move(replies: list[Message], grid, partition: int) -> float:
    """RMS of (uploaded − received) of one partition's train reply."""
    sent = [m for m in grid.delivered if m.metadata.message_type == "train"
            and partition_of(m.metadata.dst_node_id) == partition][0]
    reply = [r for r in replies if r.metadata.message_type == "train"
             and partition_of(r.metadata.src_node_id) == partition][0]
    got, received = unpack(reply.content["arrays"]), unpack(sent.content["arrays"])
    moved = [got[k].astype(np.float64) - received[k] for k in got
             if k.endswith((lora.LORA_A, lora.LORA_B))]
    return float(np.sqrt(np.mean(np.concatenate([m.ravel() for m in moved]) ** 2)))


@pytest.mark.parametrize("strategy", ["fedex", "fedit", "fedsa", "ffa", "flexlora", "flora",
                                      "hetlora", "robust", "rolora"])
def test_the_scale_attack_acts_under_every_rule_and_the_round_still_aggregates(strategy):
    keys = {"strategy": strategy, "attack": "scale", "attackers": "1,"}
    records, grid, glob, replies = run_plain(3, **keys)

    assert records[-1]["clients"] == [0, 1, 2] and not records[-1].get("abandoned")
    honest = max(upload_move(replies, grid, p) for p in (0, 2))
    assert upload_move(replies, grid, 1) > 30 * honest
