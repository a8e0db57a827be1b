"""Secure aggregation as extra message rounds of the real strategy against the real ClientApp.

A secure round must give the global adapter of the plain round — the example-weighted mean
of the same replies — within the fixed-point codec's error bound, survive dropouts at every
stage while ``t`` clients remain, abandon the round cleanly below ``t``, and never show the
server a client's factors. Runs in process (``server/inprocess.py``); the last test runs once
on Flower's simulation engine.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, Context, Message, RecordDict

from clients.app import app as client_app
from fedlora import config
from fedlora.errors import ConfigError
from fedlora.federation.outputs import read_metrics
from fedlora.federation.transport import unpack
from fedlora.learning import lora
from fedlora.learning.evaluator import ServerModel
from fedlora.privacy import secure_client
from fedlora.privacy.secagg import FixedPointCodec, flatten_arrays
from fedlora.privacy.secure_client import clip_update
from fedlora.privacy.secure_wire import (
    MASKED,
    MASKED_INPUT,
    SECAGG,
    SHARE_KEYS,
    UNMASK,
    check_secure_aggregation,
)
from server.inprocess import InProcessGrid
from server.strategy import FederatedLora, build_optimizer
from tests.fl_harness import tiny_config

NODES = 3  # default threshold: t = 2 of each share group of 3
OFF = 1  # the partition that fails or misbehaves
ONE_ROUND = {"num_server_rounds": 1, "data.eval_samples": 8, "train.local_steps": 1}
STAGES = {0: "train", 1: SHARE_KEYS, 2: MASKED_INPUT, 3: UNMASK}
EPS32 = 2.0**-24


class Grid(InProcessGrid):
    """Applies ``transform(message_type, replies)`` to every batch of replies."""

    def __init__(self, *args, transform=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.transform = transform
        self.updates: dict[int, tuple[np.ndarray, int]] = {}  # node → (plain vector, weight)

    def _deliver(self, msg):
        reply = super()._deliver(msg)
        state = self.contexts[msg.metadata.dst_node_id].state
        if msg.metadata.message_type == "train" and secure_client.UPDATE in state:
            vector, _ = flatten_arrays(unpack(state[secure_client.UPDATE]))  # what it will mask
            weight = int(state[secure_client.STATE][secure_client.WEIGHT])
            self.updates[msg.metadata.dst_node_id] = (vector, weight)
        return reply

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if self.transform is not None and messages:
            replies = self.transform(messages[0].metadata.message_type, replies)
        return replies


def run(flat: dict, *, fail: Callable | None = None, transform: Callable | None = None,
        on_reply: Callable | None = None, client_config: dict | None = None,
        expect_error: bool = False):
    """(records, global adapter, grid, error raised by the run or None). A run that ends
    with an error re-raises it unless the caller said it expects one (``expect_error``)."""
    cfg = config.from_flat(flat)
    grid = Grid(client_app, [{"partition-id": i, "num-partitions": NODES} for i in range(NODES)],
                client_config or flat, fail=fail, transform=transform, on_reply=on_reply)
    server_model = ServerModel(cfg, cfg.fl.max_rank)
    records: list[dict] = []
    strategy = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                             records.append)
    try:
        strategy.run(grid)
    except RuntimeError as exc:
        if not expect_error:
            raise
        return records, strategy.glob, grid, exc
    return records, strategy.glob, grid, None


def flat_config(secure: bool, **extra) -> dict:
    return tiny_config(**ONE_ROUND, secure_aggregation=secure, **extra)


def fails_at(stage: int, *partitions: int) -> Callable[[int, Message], bool]:
    return lambda p, msg: p in partitions and msg.metadata.message_type == STAGES[stage]


def plain(strategy: str = "fedit", optimizer: str = "none", without: int | None = None):
    """The plain round's metrics line and global adapter (optionally without ``without``)."""
    return _plain(strategy, optimizer, without)  # one cache key however it is called


def secure(strategy: str = "fedit", optimizer: str = "none"):
    """The secure round's metrics line, global adapter, every reply and the grid."""
    return _secure(strategy, optimizer)


@functools.cache
def _plain(strategy: str, optimizer: str, without: int | None):
    fail = None if without is None else fails_at(0, without)
    records, glob, _, error = run(flat_config(False, strategy=strategy,
                                              server_optimizer=optimizer), fail=fail)
    assert error is None
    return records[1], glob.arrays_for(8)


@functools.cache
def _secure(strategy: str, optimizer: str):
    replies: list[Message] = []
    records, glob, grid, error = run(flat_config(True, strategy=strategy,
                                                 server_optimizer=optimizer),
                                     on_reply=replies.append)
    assert error is None
    return records[1], glob.arrays_for(8), replies, grid


def tolerance(flat: dict, record: dict, reference: dict[str, np.ndarray]) -> float:
    """Largest |secure − plain| of a mean coordinate, from the codec's error bounds.

    ``|Σ w x − decoded| ≤ m·step/2`` and ``|Σ w − decoded weight| ≤ m·W/(2L)`` for ``m``
    contributors, divided by the total weight; plus float32 rounding of both results.
    """
    cfg = config.from_flat(flat)
    advertised = record["num_sampled"] - record["secagg_dropped"]["advertise-keys"]
    codec = FixedPointCodec(cfg.fl.secagg_clip_range, cfg.fl.secagg_max_weight, advertised)
    m, total = record["num_accepted"], record["num_examples"]
    largest = max(float(np.abs(v).max()) for v in reference.values())
    return ((codec.error_bound(m) + largest * codec.weight_error_bound(m)) / total
            + 4 * EPS32 * largest)


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=atol, err_msg=key)


# --------------------------------------------------------------------------- equal to plain


@pytest.mark.parametrize(("strategy", "optimizer"),
                         [("fedit", "none"), ("ffa", "none"), ("fedit", "fedadam")])
def test_a_secure_round_equals_the_plain_round_within_the_codec_bound(strategy, optimizer):
    flat = flat_config(True, strategy=strategy, server_optimizer=optimizer)
    record, got, _, _ = secure(strategy, optimizer)
    plain_record, want = plain(strategy, optimizer)
    assert record["num_accepted"] == 3 and record["rejected"] == {}
    assert record["num_examples"] == plain_record["num_examples"]
    assert record["train_loss"] == pytest.approx(plain_record["train_loss"], rel=1e-12)
    atol = tolerance(flat, record, want)
    if optimizer == "fedadam":
        # x + η m/(√v + τ) with m = (1−β₁)Δ, v = (1−β₂)Δ² moves by at most η(1−β₁)/τ per unit
        # change of the aggregate Δ in its first step
        adam = build_optimizer(config.from_flat(flat))
        atol *= 1 + adam.lr * (1 - adam.beta_1) / adam.tau
    assert 0 < atol < 1e-4
    assert_close(got, want, atol)
    assert record["secagg_error_bound"] <= atol
    if strategy == "ffa":  # the frozen A is not uploaded: it stays bit-identical
        for key, value in got.items():
            if key.endswith(lora.LORA_A):
                assert np.array_equal(value, want[key])


def test_the_metrics_line_accounts_for_every_stage():
    record, plain_record = secure()[0], plain()[0]
    assert record["secagg_dropped"] == {"advertise-keys": 0, "share-keys": 0,
                                        "masked-input": 0, "unmask": 0}
    assert record["secagg_s"] > 0
    # uint32 words instead of float32 values (4 B per parameter either way) plus the protocol:
    # 64 B of keys, 2 shares per neighbour, 1 normaliser word; minus 5 .npy headers
    assert abs(record["bytes_up"] - plain_record["bytes_up"]) < 0.01 * plain_record["bytes_up"]
    assert record["bytes_down"] > plain_record["bytes_down"]
    assert "agg_error" not in record  # the server cannot know individual products


# --------------------------------------------------------------------------- privacy


def test_the_server_never_receives_a_clients_factors():
    flat = flat_config(True)
    _, _, replies, grid = secure()
    assert len(replies) == 4 * NODES + NODES  # capabilities + four stages
    # each masked upload is uncorrelated with the node's own fixed-point encoding
    cfg = config.from_flat(flat)
    codec = FixedPointCodec(cfg.fl.secagg_clip_range, cfg.fl.secagg_max_weight, NODES)
    uploads = {r.metadata.src_node_id: r.content[MASKED]["masked-input"].numpy()
               for r in replies if MASKED in r.content}
    assert uploads.keys() == grid.updates.keys() and len(uploads) == NODES
    for node, (vector, weight) in grid.updates.items():
        encoded = codec.encode(vector, weight)  # (d + 1,) uint32, what masking hides
        assert encoded.size > 5_000 and np.count_nonzero(encoded.view(np.int32)) > 100
        upload = uploads[node]
        assert upload.shape == encoded.shape and not np.array_equal(upload, encoded)
        corr = np.corrcoef(upload.view(np.int32).astype(np.float64),
                           encoded.view(np.int32).astype(np.float64))[0, 1]
        assert abs(corr) < 5 / np.sqrt(encoded.size), (node, corr)
    for reply in replies:
        content = reply.content
        assert "arrays" not in content
        assert set(content.array_records) <= {MASKED}
        for record in content.array_records.values():
            assert list(record) == ["masked-input"]
            assert record["masked-input"].dtype == "uint32"
        for record in content.config_records.values():
            assert not any(isinstance(v, float) for v in record.values())
    # nothing of the round is left on the nodes: keys, shares and the plain update are gone
    for context in grid.contexts.values():
        assert not [key for key in context.state if key.startswith("fedlora.privacy.secagg")]


def test_a_node_of_a_secure_run_refuses_to_send_its_factors_in_the_clear():
    # the server runs plain rounds, the nodes' run config says secure aggregation
    records, _, _, error = run(flat_config(False), client_config=flat_config(True),
                                  expect_error=True)
    assert records[1]["rejected"] == {"CLIENT_ERROR": 3}
    assert "refuses to send them" in str(error)


# --------------------------------------------------------------------------- dropouts


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_dropout_at_any_stage_leaves_the_aggregate_of_the_survivors(stage):
    flat = flat_config(True)
    records, glob, _, error = run(flat, fail=fails_at(stage, OFF))
    record = records[1]
    assert error is None and not record.get("abandoned")
    assert record["rejected"] == {"CLIENT_ERROR": 1}
    label = ["advertise-keys", "share-keys", "masked-input", "unmask"][stage]
    assert record["secagg_dropped"] == {**dict.fromkeys(
        ["advertise-keys", "share-keys", "masked-input", "unmask"], 0), label: 1}
    # a node lost at unmasking already sent its masked input: it is in the sum
    in_sum = stage == 3
    assert record["clients"] == ([0, 1, 2] if in_sum else [0, 2])
    _, want = plain() if in_sum else plain(without=OFF)
    assert_close(glob.arrays_for(8), want, tolerance(flat, record, want))


def test_below_the_threshold_the_round_is_abandoned_and_the_global_kept():
    flat = flat_config(True)
    records, glob, _, error = run(flat, fail=fails_at(2, 0, OFF), expect_error=True)
    record = records[1]
    assert record["abandoned"] and record["abandon_reason"] == "SECAGG_BELOW_THRESHOLD"
    # the two that failed, and the survivor whose self-mask no one else can now rebuild
    assert record["secagg_dropped"]["masked-input"] == 3
    assert "aborted at stage 'masked-input'" in record["errors"][0]
    assert "without enough accepted updates" in str(error)
    initial = ServerModel(config.from_flat(flat), 64).initial_global().arrays_for(8)
    for key, value in glob.arrays_for(8).items():
        assert np.array_equal(value, initial[key]), key


# --------------------------------------------------------------------------- bad replies


def _on_off(change: Callable[[Message], None]) -> Callable[[str, list], list]:
    """Apply ``change`` to node ``OFF``'s reply of the stage it is bound to."""
    def transform(message_type, replies):
        for reply in replies:
            if reply.metadata.src_node_id == 1000 + 7 * OFF and not reply.has_error():
                change(message_type, reply)
        return replies
    return transform


def _at(stage: int, edit: Callable[[Message], None]) -> Callable[[str, list], list]:
    def change(message_type, reply):
        if message_type == STAGES[stage]:
            edit(reply)
    return _on_off(change)


def _set(key, value):
    def edit(reply):
        reply.content[SECAGG][key] = value
    return edit


def _float_mask(reply):
    words = reply.content[MASKED]["masked-input"].numpy()
    reply.content[MASKED]["masked-input"] = Array(words.astype(np.float32))


def _stranger(reply):
    reply.metadata.__dict__["_src_node_id"] = 424_242  # answers OFF's message, from nobody asked


@pytest.mark.parametrize(("transform", "reason", "stage"), [
    (_at(0, _set("server-round", 0)), "WRONG_ROUND", "advertise-keys"),
    (_at(0, _set("mask-key", b"\x01" * 5)), "MALFORMED", "advertise-keys"),
    (_at(1, _stranger), "DUPLICATE_OR_UNKNOWN", "share-keys"),
    (_at(1, _set("ciphertexts", [1, 2])), "MALFORMED", "share-keys"),
    (_at(2, _float_mask), "MALFORMED", "masked-input"),
    (_at(3, _set("self-mask-shares", [b"short", b"short", b"short"])), "MALFORMED", "unmask"),
], ids=["stale-keys", "bad-key", "shares-from-a-stranger", "bad-ciphertexts", "float-mask",
        "short-shares"])
def test_a_bad_protocol_reply_is_rejected_and_its_node_dropped(transform, reason, stage):
    flat = flat_config(True)
    records, glob, _, error = run(flat, transform=transform)
    record = records[1]
    assert error is None
    assert record["rejected"] == {reason: 1}
    for label, dropped in record["secagg_dropped"].items():
        assert dropped == (1 if label == stage else 0), label
    # a node lost at unmasking already sent its masked input: it is in the sum
    _, want = plain() if stage == "unmask" else plain(without=OFF)
    assert_close(glob.arrays_for(8), want, tolerance(flat, record, want))


# --------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("strategy", ["flora", "flexlora", "fedex", "robust"])
def test_a_strategy_that_cannot_aggregate_securely_fails_before_any_model_loads(
        strategy, monkeypatch):
    import server.app

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(server.app, "ServerModel", no_model)
    flat = tiny_config(strategy=strategy, secure_aggregation=True)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=flat)
    expected = "cannot run with secure"
    with pytest.raises(ConfigError, match=expected):
        server.app.main(None, context)
    with pytest.raises(ConfigError, match=expected):
        FederatedLora(config.from_flat(flat), None, lambda glob: None, lambda rec: None)


def test_fedlora_run_refuses_flora_with_secure_aggregation_before_starting(tmp_path):
    out = tmp_path / "never"
    res = subprocess.run([sys.executable, "-m", "fedlora", "run", "--out", str(out), "-c",
                          "strategy=flora secure-aggregation=true"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "flora cannot run with secure aggregation" in res.stderr
    assert "use one of fedit, fedsa, fedsvd, ffa, hetlora, rolora" in res.stderr
    assert not out.exists()  # preflight only: nothing was started or written


@pytest.mark.parametrize(("overrides", "message"), [
    ({"secagg_threshold": 1}, "secagg-threshold must be 0"),
    ({"secagg_neighbours": -1}, "secagg-neighbours must be >= 0"),
    ({"secagg_clip_range": 0.0}, "secagg-clip-range must be a finite number > 0"),
    ({"secagg_max_weight": 0}, "secagg-max-weight must be > 0"),
])
def test_bad_secure_aggregation_settings_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.from_flat(tiny_config(secure_aggregation=True, **overrides))


@pytest.mark.parametrize(("overrides", "clients", "message"), [
    ({"secagg_threshold": 2, "secagg_neighbours": 4}, 5, "not a strict majority"),
    ({"secagg_threshold": 4}, 3, "needs share groups of at least 4 clients"),
    ({}, 1, "needs at least 2 clients"),
])
def test_secure_settings_that_cannot_work_for_the_clients_fail_at_start_up(
        overrides, clients, message):
    cfg = config.from_flat(tiny_config(secure_aggregation=True, **overrides))
    with pytest.raises(ConfigError, match=message):
        check_secure_aggregation(cfg, clients)


def test_client_side_clipping_is_the_servers_clip_update_norm():
    rng = np.random.default_rng(0)
    received = {"m.lora_A.weight": rng.normal(size=(2, 3)).astype(np.float32),
                "head": np.zeros(4, np.float32)}
    outgoing = {"m.lora_A.weight": received["m.lora_A.weight"] + np.float32(3.0),
                "head": np.full(4, 100.0, np.float32)}
    clipped = clip_update(outgoing, received, max_norm=1.5)
    # the norm covers the head too: sqrt(6·3² + 4·100²) = 200.13 → 1.5, one factor for all
    moved = np.sqrt(sum(np.sum((clipped[k].astype(np.float64) - received[k]) ** 2)
                        for k in received))
    assert moved == pytest.approx(1.5, rel=1e-6)
    keep = 1.5 / np.sqrt(6 * 9.0 + 4 * 100.0**2)
    np.testing.assert_allclose(clipped["head"], 100.0 * keep, rtol=1e-6)
    assert clip_update(outgoing, received, max_norm=0.0)["m.lora_A.weight"] is \
        outgoing["m.lora_A.weight"]


# --------------------------------------------------------------------------- Flower simulation


@pytest.mark.slow
def test_secure_rounds_on_flowers_simulation_engine(tmp_path):
    out = tmp_path / "secure"
    res = subprocess.run(
        [sys.executable, "-m", "fedlora", "run", "--num-clients", "3", "--rounds", "2", "--out",
         str(out), "-c", "secure-aggregation=true model.num-hidden-layers=1 "
         "data.samples-per-client=16 data.eval-samples=32 data.max-length=32 "
         "train.local-steps=2 train.batch-size=8"],
        capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    records = read_metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        assert record["num_accepted"] == 3 and record["rejected"] == {}
        assert sum(record["secagg_dropped"].values()) == 0
    assert json.loads((out / "config.json").read_text())["secure-aggregation"] is True
    assert (out / "adapter" / "adapter_config.json").exists()


def test_hetlora_aggregates_securely_with_mixed_ranks():
    """Ranks 4, 8, 8: clients pad to 8 and pre-scale by their norm weights; the securely summed
    normalisers turn the sum into HetLoRA's norm-weighted mean. The global adapter equals the
    plain round's within the reported bound (codec bound / normaliser, doubled for the
    normaliser's own rounding); heads keep the example weighting."""
    ranks = {"rank_by_partition": "4,8,8"}
    records, glob, _, error = run(flat_config(False, strategy="hetlora", **ranks))
    assert error is None
    want = glob.arrays_for(8)
    replies: list[Message] = []
    records, glob, _, error = run(flat_config(True, strategy="hetlora", **ranks),
                                  on_reply=replies.append)
    assert error is None
    record = records[1]

    assert record["num_accepted"] == 3 and not record.get("abandoned")
    assert 0 < record["secagg_error_bound"] < 1e-3
    assert_close(glob.arrays_for(8), want, 2 * record["secagg_error_bound"])
    # the rank-4 client gets the same prefix view as in the plain round
    assert glob.arrays_for(4)[next(k for k in want if k.endswith(lora.LORA_A))].shape[0] == 4
    # no reply carried plain factors: stage 2 uploads are masked ring elements
    assert not any("arrays" in r.content for r in replies if not r.has_error())
