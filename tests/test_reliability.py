"""Bad replies never touch the global state; rounds degrade gracefully; checkpoints resume exactly.

The fuzz table runs the real ServerApp strategy against the real ClientApp in process; one
node's round-1 reply is corrupted in one way per case. Every case must be rejected with its
reason code while the run completes, and the global adapter must equal — bit for bit — the
aggregate of the good replies (the same run in which that node simply failed), and the
example-weighted mean of the good replies' arrays computed here, independently, in float64
(within the derived float32 bound of ``tests/tolerances.py``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Message

from clients.app import app as client_app
from fedlora import config
from fedlora.federation import checkpoint
from fedlora.federation.global_adapter import GlobalAdapter
from fedlora.learning import client_round as client
from fedlora.learning.evaluator import ServerModel
from server.inprocess import InProcessGrid
from server.strategy import FederatedLora
from tests.fl_harness import run_rounds, tiny_config
from tests.tolerances import assert_within, weighted_sum_bound

BAD = 2  # the partition whose reply is corrupted


class FuzzGrid(InProcessGrid):
    """Applies ``transform`` to the list of round-1 training replies."""

    def __init__(self, *args, transform=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.transform = transform

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        first = messages[0] if messages else None
        if (self.transform and first is not None and first.metadata.message_type == "train"
                and int(first.content["config"]["server-round"]) == 1):
            replies = self.transform(replies)
        return replies


def run(flat, transform=None, fail=None, nodes=3, on_reply=None):
    cfg = config.from_flat(flat)
    node_configs = [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)]
    grid = FuzzGrid(client_app, node_configs, flat, transform=transform, fail=fail,
                    on_reply=on_reply)
    server_model = ServerModel(cfg, cfg.fl.max_rank)
    records: list[dict] = []
    strategy = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                             records.append)
    strategy.run(grid)
    return records, strategy.glob


def pid(reply: Message) -> int:
    return int(reply.content["metrics"]["partition-id"])


def on_bad(change):
    """A transform that applies ``change(reply)`` to the BAD partition's reply only."""
    def transform(replies):
        for reply in replies:
            if not reply.has_error() and pid(reply) == BAD:
                change(reply)
        return replies
    return transform


def set_array(key_suffix, make):
    def change(reply):
        arrays = reply.content["arrays"]
        key = next(k for k in arrays if k.endswith(key_suffix))
        arrays[key] = Array(make(arrays[key].numpy().copy()))
    return change


def set_metric(name, value):
    def change(reply):
        metrics = dict(reply.content["metrics"])
        if value is _DELETE:
            metrics.pop(name)
        else:
            metrics[name] = value
        reply.content["metrics"] = ConfigRecord(metrics)  # admits bools, strings, None-less
    return change


_DELETE = object()


def poke(value):
    def make(x):
        x.flat[0] = value
        return x
    return make


def drop_keys(predicate):
    def change(reply):
        arrays = reply.content["arrays"]
        for key in [k for k in arrays if predicate(k)]:
            del arrays[key]
    return change


def add_key(name, value):
    def change(reply):
        reply.content["arrays"][name] = Array(value)
    return change


def first_module(reply):
    return next(k for k in reply.content["arrays"] if k.endswith("lora_A.weight"))[
        : -len(".lora_A.weight")]


def wrong_rank(reply):
    arrays = reply.content["arrays"]
    module = first_module(reply)
    a = arrays[module + ".lora_A.weight"].numpy()
    b = arrays[module + ".lora_B.weight"].numpy()
    arrays[module + ".lora_A.weight"] = Array(np.concatenate([a, a]))
    arrays[module + ".lora_B.weight"] = Array(np.concatenate([b, b], axis=1))


def drop_record(name):
    def change(reply):
        del reply.content[name]
    return change


def duplicate(replies):
    bad = next(r for r in replies if pid(r) == BAD)
    return [*replies, bad]


# (case, transform, expected reason, what the global must equal: "without" the bad node's
# update or "all" three updates)
CASES = [
    ("nan", on_bad(set_array("lora_B.weight", poke(np.nan))), "NON_FINITE", "without"),
    ("inf", on_bad(set_array("lora_A.weight", poke(np.inf))), "NON_FINITE", "without"),
    ("norm-1e30", on_bad(set_array("lora_A.weight", poke(1e30))), "NORM_TOO_LARGE", "without"),
    ("int64", on_bad(set_array("lora_A.weight", lambda x: x.astype(np.int64))), "BAD_DTYPE",
     "without"),
    ("uint8", on_bad(set_array("lora_B.weight", lambda x: x.astype(np.uint8))), "BAD_DTYPE",
     "without"),
    ("broadcastable-shape", on_bad(set_array("lora_B.weight", lambda x: x[:, :1])),
     "SHAPE_MISMATCH", "without"),
    ("transposed", on_bad(set_array("lora_A.weight", lambda x: np.ascontiguousarray(x.T))),
     "SHAPE_MISMATCH", "without"),
    ("empty-array", on_bad(set_array("lora_A.weight", lambda x: x[:0])), "SHAPE_MISMATCH",
     "without"),
    ("rank-not-declared", on_bad(wrong_rank), "RANK_MISMATCH", "without"),
    ("examples-1e12", on_bad(set_metric("num-examples", 10**12)), "BAD_EXAMPLE_COUNT",
     "without"),
    ("examples-zero", on_bad(set_metric("num-examples", 0)), "BAD_EXAMPLE_COUNT", "without"),
    ("examples-negative", on_bad(set_metric("num-examples", -5)), "BAD_EXAMPLE_COUNT",
     "without"),
    ("examples-nan", on_bad(set_metric("num-examples", math.nan)), "BAD_EXAMPLE_COUNT",
     "without"),
    ("examples-float", on_bad(set_metric("num-examples", 16.0)), "BAD_EXAMPLE_COUNT", "without"),
    ("examples-bool", on_bad(set_metric("num-examples", True)), "BAD_EXAMPLE_COUNT", "without"),
    ("examples-missing", on_bad(set_metric("num-examples", _DELETE)), "BAD_EXAMPLE_COUNT",
     "without"),
    ("loss-nan", on_bad(set_metric("train-loss", math.nan)), "BAD_METRICS", "without"),
    ("loss-string", on_bad(set_metric("train-loss", "low")), "BAD_METRICS", "without"),
    ("wrong-round", on_bad(set_metric("server-round", 0)), "WRONG_ROUND", "without"),
    ("missing-module", on_bad(drop_keys(lambda k: ".layer.0.attention.self.value." in k)),
     "KEY_MISMATCH", "without"),
    ("extra-module", on_bad(add_key("base_model.model.bert.pooler.dense.lora_A.weight",
                                    np.zeros((8, 384), np.float32))), "KEY_MISMATCH", "without"),
    ("huge-payload", on_bad(add_key("junk", np.zeros(4_000_000, np.float32))),
     "PAYLOAD_TOO_LARGE", "without"),
    ("bad-head", on_bad(set_array("classifier.weight", lambda x: x[:2])), "BAD_HEAD", "without"),
    ("no-arrays", on_bad(drop_record("arrays")), "MALFORMED", "without"),
    ("duplicate-reply", duplicate, "DUPLICATE_OR_UNKNOWN", "all"),
]


def independent_mean(replies: list[Message]) -> tuple[dict, dict]:
    """FedIT at equal rank and scale: the global factors and head are the example-weighted
    means of the good replies' arrays (float64 here), with their float32 bounds."""
    good = [r for r in replies if r.metadata.message_type == "train" and not r.has_error()]
    arrays = [{k: v.numpy() for k, v in r.content["arrays"].items()} for r in good]
    weights = [int(r.content["metrics"]["num-examples"]) for r in good]
    p = np.asarray(weights, dtype=np.float64) / sum(weights)
    mean = {k: sum(pk * a[k].astype(np.float64) for pk, a in zip(p, arrays, strict=True))
            for k in arrays[0]}
    bound = {k: weighted_sum_bound([a[k] for a in arrays], weights) for k in arrays[0]}
    return mean, bound


@pytest.fixture(scope="module")
def references():
    flat = tiny_config(num_server_rounds=1)
    good_replies, all_replies = [], []
    _, without = run(flat, fail=lambda p, msg: p == BAD and msg.metadata.message_type == "train",
                     on_reply=good_replies.append)
    _, everyone = run(flat, on_reply=all_replies.append)
    assert len([r for r in good_replies if r.metadata.message_type == "train"]) == 3
    return {"without": without.arrays_for(8), "all": everyone.arrays_for(8),
            "mean": {"without": independent_mean(good_replies),
                     "all": independent_mean(all_replies)}}


def test_the_table_covers_every_reason_code_a_plain_round_can_give():
    """Every code the plain round's validation can return (README, "Bad replies") is
    produced by a case of the table or by a named test in this file."""
    plain_codes = {"WRONG_ROUND", "BAD_EXAMPLE_COUNT", "BAD_METRICS", "PAYLOAD_TOO_LARGE",
                   "BAD_DTYPE", "KEY_MISMATCH", "SHAPE_MISMATCH", "RANK_MISMATCH",
                   "NON_FINITE", "NORM_TOO_LARGE", "BAD_HEAD", "MALFORMED",
                   "DUPLICATE_OR_UNKNOWN"}
    named_tests = {"NO_REPLY", "CLIENT_ERROR"}  # below / test_federated_rounds
    assert {reason for _, _, reason, _ in CASES} == plain_codes
    assert len(CASES) >= 20 and len({name for name, *_ in CASES}) == len(CASES)
    assert not plain_codes & named_tests


@pytest.mark.parametrize(("name", "transform", "reason", "expect"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_update_is_rejected_and_the_global_is_the_good_aggregate(
        references, name, transform, reason, expect):
    records, glob = run(tiny_config(num_server_rounds=1), transform=transform)
    assert records[1]["rejected"] == {reason: 1}, records[1].get("rejected")
    assert records[1]["num_accepted"] == (3 if expect == "all" else 2)
    arrays = glob.arrays_for(8)
    mean, bound = references["mean"][expect]
    assert arrays.keys() == mean.keys()
    for key, value in arrays.items():
        assert np.all(np.isfinite(value)), key
        assert np.array_equal(value, references[expect][key]), key  # = the node dropped
        assert_within(value, mean[key], bound[key], key)  # = the good replies' mean
    assert math.isfinite(records[1]["eval_loss"])


def test_a_node_that_never_replies_is_counted_as_no_reply(references):
    def transform(replies):  # BAD's reply is lost on the way: the server hears nothing
        return [r for r in replies if r.has_error() or pid(r) != BAD]

    records, glob = run(tiny_config(num_server_rounds=1), transform=transform)
    assert records[1]["rejected"] == {"NO_REPLY": 1}
    assert records[1]["num_sampled"] == 3 and records[1]["clients"] == [0, 1]
    mean, bound = references["mean"]["without"]
    for key, value in glob.arrays_for(8).items():
        assert np.array_equal(value, references["without"][key]), key
        assert_within(value, mean[key], bound[key], key)


def test_a_reply_from_a_node_that_was_not_asked_is_rejected(references):
    def transform(replies):
        stranger = next(r for r in replies if pid(r) == BAD)
        stranger.metadata.__dict__["_src_node_id"] = 424_242
        return replies

    records, glob = run(tiny_config(num_server_rounds=1), transform=transform)
    # the reply answers the message sent to BAD but comes from a node nobody asked: refused
    assert records[1]["rejected"] == {"DUPLICATE_OR_UNKNOWN": 1}
    for key, value in glob.arrays_for(8).items():
        assert np.array_equal(value, references["without"][key])


def test_clipping_scales_a_large_update_down_to_the_bound():
    """One client per round (so the global moves by exactly its clipped update): an update
    far larger than C arrives, and the global (LoRA factors and head: the norm covers every
    array a client sends) moves by C — not less."""
    bound = 1e-3  # ≪ the update norms here (~0.1), ≫ the float32 rounding of the global
    flat = tiny_config(num_server_rounds=1, clip_update_norm=bound, num_train_nodes=1,
                       min_train_nodes=1)
    replies: list[Message] = []
    records, glob = run(flat, on_reply=replies.append)
    initial = ServerModel(config.from_flat(flat), 64).initial_global().arrays_for(8)

    def moved(arrays):
        return math.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - initial[k]) ** 2))
                             for k in initial))

    (reply,) = [r for r in replies if r.metadata.message_type == "train"]
    arrived = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert records[1]["num_accepted"] == 1
    assert moved({**initial, **arrived}) > 10 * bound  # the client really sent a large update
    # float32 storage of initial + δ rounds each coordinate by ≤ u·|x|: ≪ 1e-3 of C here
    assert moved(glob.arrays_for(8)) == pytest.approx(bound, rel=1e-3)


def test_too_few_accepted_replies_abandon_the_round_and_keep_the_global():
    """min-accepted-fraction = 1: one failing node abandons every round; after
    max-failed-rounds the run ends with a clear error and the global is the initial one."""
    flat = tiny_config(num_server_rounds=3, min_accepted_fraction=1.0, max_failed_rounds=2)
    cfg = config.from_flat(flat)
    records: list[dict] = []
    server_model = ServerModel(cfg, 64)
    initial = server_model.initial_global().arrays_for(8)
    strategy = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                             records.append)
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": 3} for i in range(3)],
                         flat, fail=lambda p, msg: p == 0 and msg.metadata.message_type == "train")
    with pytest.raises(RuntimeError, match="2 round\\(s\\) in a row without enough accepted"):
        strategy.run(grid)
    assert [r.get("abandoned") for r in records[1:]] == [True, True]
    for key, value in strategy.glob.arrays_for(8).items():
        assert np.array_equal(value, initial[key])


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_is_atomic_verified_and_pruned(tmp_path):
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones(2, np.float64)}
    for r in range(1, 5):
        checkpoint.save(tmp_path, r, {"note": f"r{r}"}, {**arrays, "r": np.array([r])}, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["round-000003",
                                                                  "round-000004"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    ck = checkpoint.load_latest(tmp_path)
    assert ck.round == 4 and ck.state["note"] == "r4"
    assert ck.arrays["x"].dtype == np.float32 and np.array_equal(ck.arrays["x"], arrays["x"])
    assert ck.arrays["y"].dtype == np.float64


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    for r in (1, 2):
        checkpoint.save(tmp_path, r, {}, {"w": np.full(1000, r, np.float32)}, keep=3)
    latest = tmp_path / "round-000002"
    target = latest / checkpoint.ARRAYS
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "manifest":
        (latest / checkpoint.MANIFEST).write_text("{not json")
    else:
        target.unlink()
    warnings: list[str] = []
    ck = checkpoint.load_latest(tmp_path, warn=warnings.append)
    assert ck.round == 1 and np.all(ck.arrays["w"] == 1)
    assert "round-000002 is unusable" in warnings[0]


def test_no_pickle_in_checkpoints(tmp_path):
    checkpoint.save(tmp_path, 1, {"a": 1}, {"w": np.zeros(3, np.float32)})
    files = {p.name for p in (tmp_path / "round-000001").iterdir()}
    assert files == {checkpoint.ARRAYS, checkpoint.STATE, checkpoint.MANIFEST}
    json.loads((tmp_path / "round-000001" / checkpoint.STATE).read_text())


@pytest.mark.parametrize(("strategy", "extra"), [
    ("fedit", {}), ("fedit", {"server_optimizer": "fedadam"}), ("hetlora", {}),
    ("flexlora", {}), ("flora", {}), ("fedex", {}), ("ffa", {}), ("rolora", {})])
def test_global_adapter_state_round_trips_exactly(strategy, extra):
    mixed = strategy in ("hetlora", "flexlora", "flora")
    flat = tiny_config(strategy=strategy, num_server_rounds=2,
                       rank_by_partition="2,4" if mixed else "", **extra)
    _, _, glob, _ = run_rounds(flat, num_nodes=2)
    state, arrays = glob.state_dict()
    again = GlobalAdapter.from_state(json.loads(json.dumps(state)), arrays)
    for rank in ((2, 4, 8) if mixed else (8,)):
        a, b = glob.arrays_for(rank), again.arrays_for(rank)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert again.version == glob.version and again.updates == glob.updates
    ea, eb = glob.export_factors(), again.export_factors()
    for module in ea:
        assert np.array_equal(ea[module].b, eb[module].b)
        assert np.array_equal(ea[module].a, eb[module].a)


@pytest.mark.parametrize(("strategy", "extra"), [
    ("fedit", {"server_optimizer": "fedadam"}), ("flexlora", {"rank_by_partition": "2,4"}),
    ("rolora", {})])
def test_resume_after_an_interruption_is_bit_identical(tmp_path, strategy, extra):
    """3 rounds straight vs 2 rounds, then a new strategy restored from the round-2
    checkpoint running round 3 on a new grid whose clients start empty: new contexts (no
    ``context.state``) and the client-side model cache cleared — what fresh client
    processes hold. (Real new processes: test_simulation's SIGKILL + resume test.)"""
    flat = tiny_config(strategy=strategy, num_server_rounds=3, **extra)
    _, _, straight, _ = run_rounds(flat, num_nodes=2)

    cfg2 = config.from_flat({**flat, "num-server-rounds": 2})
    server_model = ServerModel(cfg2, 64)
    first = FederatedLora(cfg2, server_model.initial_global(), server_model.evaluate,
                          lambda rec: None)
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)],
                         flat)
    first.run(grid, checkpoint_dir=tmp_path)

    cfg3 = config.from_flat({**flat, "resume": True})
    second = FederatedLora(cfg3, server_model.initial_global(), server_model.evaluate,
                           lambda rec: None)
    ck = checkpoint.load_latest(tmp_path)
    assert ck.round == 2
    second.restore(ck)
    client.MODELS.clear()  # nothing the first clients loaded survives
    fresh_grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": 2}
                                            for i in range(2)], flat)
    resumed = second.run(fresh_grid, start_round=3, checkpoint_dir=tmp_path)
    ranks = (2, 4) if "rank_by_partition" in extra else (8,)
    for rank in ranks:
        want, got = straight.arrays_for(rank), resumed.arrays_for(rank)
        for key in want:
            assert np.array_equal(want[key], got[key]), key


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    flat = tiny_config(num_server_rounds=1)
    cfg = config.from_flat(flat)
    server_model = ServerModel(cfg, 64)
    strategy = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                             lambda rec: None)
    strategy.save_checkpoint(tmp_path, 1)
    other = FederatedLora(config.from_flat({**flat, "train.lr": 0.1}),
                          server_model.initial_global(), server_model.evaluate, lambda rec: None)
    with pytest.raises(checkpoint.CheckpointError, match="different configuration"):
        other.restore(checkpoint.load_latest(tmp_path))


def test_adaptive_clipping_tracks_the_quantile_of_update_norms(tmp_path):
    """The bound starts tiny, so every update is clipped and the bound grows round by round;
    it is checkpointed and restored with the rest of the server state."""
    flat = tiny_config(num_server_rounds=3, clip_update_norm=1e-4, clip_quantile=0.5,
                       clip_learning_rate=1.0)
    cfg = config.from_flat(flat)
    server_model = ServerModel(cfg, 64)
    records: list[dict] = []
    strategy = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                             records.append)
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)],
                         flat)
    strategy.run(grid, checkpoint_dir=tmp_path)
    bounds = [r["clip_bound"] for r in records[1:]]
    assert bounds[0] == pytest.approx(1e-4)
    assert bounds[1] == pytest.approx(1e-4 * math.exp(0.5))  # none fitted: grow by e^(η/2)
    assert bounds[2] == pytest.approx(1e-4 * math.exp(1.0))
    again = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                          lambda rec: None)
    again.restore(checkpoint.load_latest(tmp_path))
    assert again.adaptive_clip.bound == pytest.approx(1e-4 * math.exp(1.5))


def test_a_client_out_of_memory_replies_with_an_error_and_the_round_goes_on(monkeypatch):
    from fedlora.learning import training

    real = training.train

    def train(model, examples, spec, pad, anchors=None):
        if spec.seed == _seed_of(2):  # partition 2, round 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, examples, spec, pad, anchors)

    monkeypatch.setattr(training, "train", train)
    records, glob = run(tiny_config(num_server_rounds=1))
    assert records[1]["rejected"] == {"CLIENT_ERROR": 1} and records[1]["clients"] == [0, 1]
    assert "out of memory while training" in records[1]["errors"][0]


def _seed_of(partition: int, server_round: int = 1) -> int:
    from fedlora.learning import builders

    return builders.train_spec(config.from_flat(tiny_config()), server_round, partition).seed
