"""Property-based fuzzing of the server's per-reply boundary (hypothesis).

A fake Grid answers for honest clients (a seeded small update of what each received) and for
one fuzzed client, whose reply, capability answer or evaluation is generated: record types,
``.npy`` headers (dtype, shape, length), raw bytes, serialisation types, values, keys and
metrics. Properties, for every generated reply:

* the round (discovery, evaluation) returns — nothing a reply holds aborts it;
* the fuzzed reply is either rejected with a reason code, or is a well-formed update that an
  independent decoder (``np.load``) reads at the expected shape, finite;
* the global adapter equals the weighted mean of the accepted replies, computed here in numpy
  (fedit), or — mixed ranks, partial participation — bit for bit the round in which the fuzzed
  node simply failed.

Budget: a few dozen examples per property by default (CI); ``FEDLORA_FUZZ=long`` runs
:data:`LONG` generated replies in all (at least 10,000).
"""

from __future__ import annotations

import io
import math
import os
import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora import config
from fedlora.aggregation import LoraFactors
from fedlora.federation.global_adapter import GlobalAdapter
from fedlora.federation.wire_schema import TRAIN_METRICS
from server.strategy import FederatedLora, NodeInfo
from tests.fl_harness import tiny_config

LONG = os.environ.get("FEDLORA_FUZZ") == "long"
# examples per property: long mode totals 4,000 + 2,500 + 2,500 + 1,500 = 10,500 replies
BUDGET = {"plain": 4000, "mixed": 2500, "discovery": 2500, "eval": 1500} if LONG else {
    "plain": 40, "mixed": 15, "discovery": 40, "eval": 30}
MODULES = ("base.layer0.q", "base.layer0.v")
HEAD = "classifier.weight"
IN, OUT = 12, 10
FUZZED = 0  # partition of the fuzzed client (sampled in every round it is part of)


def _settings(name: str):
    return settings(max_examples=BUDGET[name], deadline=None, derandomize=not LONG,
                    suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def make_glob(rank: int) -> GlobalAdapter:
    rng = np.random.default_rng(7)
    factors = {m: LoraFactors(a=rng.normal(size=(rank, IN)).astype(np.float32),
                              b=rng.normal(size=(OUT, rank)).astype(np.float32) * 0.1,
                              scale=16.0 / rank) for m in MODULES}
    heads = {HEAD: rng.normal(size=(3, IN)).astype(np.float32)}
    return GlobalAdapter(factors, heads, lora_alpha=16.0, rslora=False)


def honest_arrays(sent: ArrayRecord, partition: int, server_round: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([partition, server_round])
    out = {}
    for key, array in sent.items():
        value = np.load(io.BytesIO(array.data), allow_pickle=False)
        out[key] = (value + 0.01 * rng.normal(size=value.shape)).astype(np.float32)
    return out


def honest_reply(msg: Message, partition: int) -> Message:
    server_round = int(msg.content["config"]["server-round"])
    arrays = honest_arrays(msg.content["arrays"], partition, server_round)
    metrics = {"server-round": server_round, "num-examples": 10 + 3 * partition,
               "train-loss": 0.5, "partition-id": partition, "rss-mb": 100.0}
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord(metrics)}), reply_to=msg)


class FakeGrid:
    """Answers each message with ``respond(msg, partition)`` (``None``: no reply)."""

    def __init__(self, partitions: dict[int, int], respond) -> None:
        self.partitions, self.respond = partitions, respond

    def get_node_ids(self) -> list[int]:
        return list(self.partitions)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            meta = msg.metadata.__dict__
            meta["_message_id"], meta["_src_node_id"] = str(uuid.uuid4()), 1
            reply = self.respond(msg, self.partitions[msg.metadata.dst_node_id])
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
                replies.append(reply)
        return replies


# ----------------------------------------------------------------------------- generators

DESCRS = ["<f4", "<f2", "<f8", ">f4", "<i4", "|b1", "<c8", "|O", "<U3", "|V4", "<f16", "x"]
dims = st.integers(min_value=-2, max_value=1 << 45)
shapes = st.one_of(st.tuples(), st.lists(dims, max_size=4).map(tuple),
                   st.lists(st.integers(0, 16), min_size=1, max_size=3).map(tuple))


@st.composite
def npy_bytes(draw, shape_of: tuple[int, ...]) -> bytes:
    """A ``.npy``-like byte string: a real header of a drawn dtype and shape (often the
    expected one), then a body of the right, a shorter or a longer length — or raw garbage."""
    kind = draw(st.sampled_from(["header", "header", "saved", "garbage", "bad-header"]))
    if kind == "garbage":
        return draw(st.binary(max_size=200))
    if kind == "saved":  # a genuine np.save of another dtype / shape
        dtype = draw(st.sampled_from([np.float16, np.float64, np.int32, np.bool_, np.complex64,
                                      np.uint8]))
        shape = draw(st.sampled_from([shape_of, shape_of[::-1], (1,), ()]))
        buf = io.BytesIO()
        np.save(buf, np.ones(shape, dtype), allow_pickle=False)
        return buf.getvalue()
    descr = draw(st.sampled_from(DESCRS))
    shape = draw(st.one_of(st.just(shape_of), shapes))
    fortran = draw(st.booleans())
    if kind == "bad-header":
        text = draw(st.sampled_from([
            f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape!r}, }}",
            "{'descr': '<f4', 'shape': (3,)}", "[1, 2, 3]", "__import__('os')",
            "{'descr': '<f4', 'fortran_order': 1, 'shape': (2,)}", "((((((((((((((",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2.5,)}"]))
        header = text.encode("latin1")
        version = draw(st.sampled_from([1, 2, 3, 9]))
        width = 2 if version == 1 else 4
        declared = len(header) + draw(st.sampled_from([0, 0, 1, -3, 1 << 20]))
        declared = min(max(declared, 0), (1 << 8 * width) - 1)
        prefix = b"\x93NUMPY" + bytes([version, 0]) + declared.to_bytes(width, "little")
        return prefix + header + draw(st.binary(max_size=64))
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr if descr in ("<f4", "<f2", "<f8",
                                                                           ">f4", "<i4")
                                               else "<f4", "fortran_order": fortran,
                                               "shape": tuple(abs(d) for d in shape)})
    header = buf.getvalue()
    if descr not in ("<f4", "<f2", "<f8", ">f4", "<i4"):
        header = header.replace(b"'<f4'", repr(descr).encode())
    itemsize = {"<f2": 2, "<f8": 8}.get(descr, 4)
    want = itemsize * math.prod(abs(d) for d in shape)
    length = draw(st.sampled_from([want, want, max(want - 1, 0), want + 4, 0, 16]))
    if length > 1 << 16:
        length = 16
    return header + bytes(draw(st.binary(min_size=min(length, 64), max_size=min(length, 64))) +
                          b"\0" * max(length - 64, 0))


metric_values = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True, allow_subnormal=False),
    st.booleans(), st.text(max_size=8), st.binary(max_size=8),
    st.lists(st.floats(allow_nan=False, allow_subnormal=False), max_size=3),
    st.lists(st.integers(-5, 5), max_size=3))
metric_keys = st.one_of(st.sampled_from(sorted(TRAIN_METRICS)), st.text(max_size=10))


def metrics_record(values: dict):
    try:
        return ConfigRecord(values)
    except (TypeError, ValueError):
        return ConfigRecord({})


@st.composite
def mutation(draw):
    """One change to the fuzzed client's otherwise honest reply (a function of the reply)."""
    kind = draw(st.sampled_from(["record", "npy", "stype", "bf16", "value", "keys", "metrics",
                                 "metric-set", "round", "none"]))
    pick = draw(st.integers(0, 100))
    if kind == "record":
        which = draw(st.sampled_from(["arrays-config", "arrays-metric", "no-arrays",
                                      "no-metrics", "metrics-array", "swap"]))

        def change(reply):
            c = reply.content
            if which == "arrays-config":
                c["arrays"] = ConfigRecord({k: a.data for k, a in c["arrays"].items()})
            elif which == "arrays-metric":
                c["arrays"] = MetricRecord({k: 1.0 for k in c["arrays"]})
            elif which == "no-arrays":
                del c["arrays"]
            elif which == "no-metrics":
                del c["metrics"]
            elif which == "metrics-array":
                c["metrics"] = ArrayRecord({"num-examples": Array(np.ones(2, np.float32))})
            else:
                arrays, metrics = c["arrays"], c["metrics"]
                del c["arrays"], c["metrics"]
                c["arrays"] = ConfigRecord(dict(metrics))
                c["metrics"] = arrays
        return change
    if kind == "npy":
        data_for = draw(st.data())

        def change(reply):
            arrays = reply.content["arrays"]
            key = sorted(arrays)[pick % len(arrays)]
            shape = tuple(arrays[key].shape)
            arrays[key] = Array(dtype="float32", shape=list(shape), stype="numpy.ndarray",
                                data=data_for.draw(npy_bytes(shape)))
        return change
    if kind == "stype":
        stype = draw(st.text(max_size=12))

        def change(reply):
            arrays = reply.content["arrays"]
            key = sorted(arrays)[pick % len(arrays)]
            a = arrays[key]
            arrays[key] = Array(dtype=a.dtype, shape=list(a.shape), stype=stype, data=a.data)
        return change
    if kind == "bf16":
        shape = draw(st.lists(st.integers(-1, 20), max_size=3))
        data = draw(st.binary(max_size=100))
        dtype = draw(st.sampled_from(["bfloat16", "float32"]))

        def change(reply):
            arrays = reply.content["arrays"]
            key = sorted(arrays)[pick % len(arrays)]
            arrays[key] = Array(dtype=dtype, shape=shape, stype="fedlora.bfloat16", data=data)
        return change
    if kind == "value":
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -1e30, 1e4, 5e-45, -0.0]))

        def change(reply):
            arrays = reply.content["arrays"]
            key = sorted(arrays)[pick % len(arrays)]
            x = arrays[key].numpy().copy()
            x.flat[pick % x.size] = value
            arrays[key] = Array(x)
        return change
    if kind == "keys":
        op = draw(st.sampled_from(["drop", "add", "rename"]))
        name = draw(st.text(min_size=1, max_size=30))

        def change(reply):
            arrays = reply.content["arrays"]
            key = sorted(arrays)[pick % len(arrays)]
            if op in ("drop", "rename"):
                value = arrays[key]
                del arrays[key]
                if op == "rename" and name not in arrays:
                    arrays[name] = value
            elif name not in arrays:
                arrays[name] = Array(np.zeros(3, np.float32))
        return change
    if kind == "metrics":
        key, value = draw(metric_keys), draw(metric_values)

        def change(reply):
            metrics = dict(reply.content["metrics"])
            metrics[key] = value
            reply.content["metrics"] = metrics_record(metrics)
        return change
    if kind == "metric-set":
        values = draw(st.dictionaries(metric_keys, metric_values, max_size=6))

        def change(reply):
            reply.content["metrics"] = metrics_record(values)
        return change
    if kind == "round":
        value = draw(st.one_of(st.integers(-3, 5), st.text(max_size=3)))

        def change(reply):
            metrics = dict(reply.content["metrics"])
            metrics["server-round"] = value
            reply.content["metrics"] = metrics_record(metrics)
        return change
    return lambda reply: None


def apply_all(changes, reply: Message) -> None:
    """Apply each change that still applies (an earlier one may have removed what it edits)."""
    for change in changes:
        try:
            change(reply)
        except (KeyError, AttributeError, TypeError, ValueError, ZeroDivisionError):
            continue


# ----------------------------------------------------------------------------- independent check


def decode_independently(array: Array) -> np.ndarray | None:
    """What an accepted array holds, read without fedlora (``None``: not a well-formed array)."""
    if array.stype == "fedlora.bfloat16":
        bits = np.frombuffer(array.data, "<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(tuple(array.shape))
    value = np.load(io.BytesIO(array.data), allow_pickle=False)
    return value.astype(np.float32)


def run_plain_round(changes, *, rank=4, nodes=4, fail_fuzzed=False, flat=None):
    flat = flat or tiny_config(**{"min-accepted": 1, "max-update-norm": 50.0})
    cfg = config.from_flat(flat)
    strategy = FederatedLora(cfg, make_glob(rank), lambda _: None, lambda _: None)
    infos = [NodeInfo(node_id=100 + p, partition_id=p, rank=rank) for p in range(nodes)]
    fuzzed_reply: list[Message] = []

    def respond(msg, partition):
        if partition == FUZZED and fail_fuzzed:
            return Message(Error(code=0, reason="failed"), reply_to=msg)
        reply = honest_reply(msg, partition)
        if partition == FUZZED:
            apply_all(changes, reply)
            fuzzed_reply.append(reply)
        return reply

    grid = FakeGrid({n.node_id: n.partition_id for n in infos}, respond)
    record = strategy.train_round(grid, infos, 1)
    return strategy, record, fuzzed_reply, grid


@given(changes=st.lists(mutation(), min_size=1, max_size=3))
@_settings("plain")
def test_fedit_survives_any_reply_and_adopts_the_mean_of_the_accepted(changes):
    strategy, record, fuzzed, _ = run_plain_round(changes)

    honest = [p for p in range(1, 4)]
    assert record["clients"][-3:] == honest and not record.get("abandoned")
    accepted_fuzzed = FUZZED in record["clients"]
    assert sum(record["rejected"].values()) == (0 if accepted_fuzzed else 1), record
    glob = make_glob(4)
    sent = glob.arrays_for(4)
    parts, weights = [], []
    for p in honest:
        parts.append(honest_arrays(ArrayRecord({k: Array(v) for k, v in sent.items()}), p, 1))
        weights.append(10 + 3 * p)
    if accepted_fuzzed:  # a well-formed update after all: read without fedlora, at its shape
        arrays = {k: decode_independently(a) for k, a in fuzzed[0].content["arrays"].items()}
        assert {k: v.shape for k, v in arrays.items()} == {k: v.shape for k, v in sent.items()}
        assert all(np.all(np.isfinite(v)) for v in arrays.values())
        parts.insert(0, arrays)
        weights.insert(0, int(fuzzed[0].content["metrics"]["num-examples"]))
    total = float(sum(weights))
    got = strategy.glob.arrays_for(4)
    for key in sent:
        want = sum(w * part[key].astype(np.float64) for w, part in zip(weights, parts,
                                                                      strict=True)) / total
        np.testing.assert_allclose(got[key], want.astype(np.float32), rtol=2e-6, atol=1e-6,
                                   err_msg=key)


RANKS = (2, 4, 8, 2, 4, 8)


def run_mixed_round(changes, fail_fuzzed=False):
    flat = tiny_config(**{"strategy": "hetlora", "min-accepted": 1, "num-train-nodes": 4,
                          "max-update-norm": 50.0, "max-rank": 8, "seed": 3})
    cfg = config.from_flat(flat)
    strategy = FederatedLora(cfg, make_glob(8), lambda _: None, lambda _: None)
    infos = [NodeInfo(node_id=100 + p, partition_id=p, rank=r) for p, r in enumerate(RANKS)]
    sampled = strategy.sample(infos, 1)
    target = sampled[0].partition_id

    def respond(msg, partition):
        if partition == target and fail_fuzzed:
            return Message(Error(code=0, reason="failed"), reply_to=msg)
        reply = honest_reply(msg, partition)
        if partition == target:
            apply_all(changes, reply)
        return reply

    grid = FakeGrid({n.node_id: n.partition_id for n in infos}, respond)
    record = strategy.train_round(grid, infos, 1)
    return strategy, record, target, sampled


@given(changes=st.lists(mutation(), min_size=1, max_size=3))
@_settings("mixed")
def test_mixed_ranks_partial_participation_one_fuzzed_client(changes):
    strategy, record, target, sampled = run_mixed_round(changes)

    assert len(sampled) == 4 and record["num_sampled"] == 4
    if target in record["clients"]:  # well-formed after all (e.g. a finite value poked in)
        return
    assert record["clients"] == [n.partition_id for n in sampled if n.partition_id != target]
    baseline, base_record, _, _ = run_mixed_round([], fail_fuzzed=True)
    assert base_record["clients"] == record["clients"]
    for rank in (2, 4, 8):
        got, want = strategy.glob.arrays_for(rank), baseline.glob.arrays_for(rank)
        assert got.keys() == want.keys()
        for key in got:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"rank {rank} {key}")


# ----------------------------------------------------------------------------- discovery

cap_values = st.one_of(st.integers(-(1 << 40), 1 << 40), st.integers(0, 8), st.text(max_size=4),
                       st.floats(allow_subnormal=False), st.booleans(), st.binary(max_size=4),
                       st.lists(st.integers(0, 3), max_size=2))


@st.composite
def capability_answer(draw):
    kind = draw(st.sampled_from(["caps", "caps", "no-caps", "metric", "error", "wrong-name"]))
    caps = {"partition-id": 9, "num-partitions": 10, "lora-rank": 4}
    for key in draw(st.lists(st.sampled_from(["partition-id", "lora-rank", "num-partitions",
                                              "num-examples", "extra"]), max_size=3)):
        caps[key] = draw(cap_values)
    if draw(st.booleans()):
        caps.pop(draw(st.sampled_from(sorted(caps))))
    return kind, caps


def _caps_valid(caps: dict, max_rank: int, rank: int) -> bool:
    p, r = caps.get("partition-id"), caps.get("lora-rank")
    return (type(p) is int and 0 <= p < 1 << 31 and p not in (0, 1, 2)
            and type(r) is int and r == rank and r <= max_rank)


@given(answer=capability_answer())
@_settings("discovery")
def test_discovery_drops_a_bad_node_and_keeps_the_others(answer):
    kind, caps = answer
    cfg = config.from_flat(tiny_config(**{"min-available-nodes": 1, "round-timeout": 5}))
    strategy = FederatedLora(cfg, make_glob(8), lambda _: None, lambda _: None)
    partitions = {100: 0, 101: 1, 102: 2, 999: 9}  # the fuzzed node has the largest id

    def respond(msg, partition):
        if partition != 9:
            record = ConfigRecord({"partition-id": partition, "num-partitions": 10,
                                   "lora-rank": 8})
            return Message(RecordDict({"caps": record}), reply_to=msg)
        if kind == "error":
            return Message(Error(code=0, reason="boom"), reply_to=msg)
        try:
            record = ConfigRecord(caps)
        except (TypeError, ValueError):
            record = ConfigRecord({})
        if kind == "metric":
            return Message(RecordDict({"caps": MetricRecord({"partition-id": 9})}),
                           reply_to=msg)
        if kind == "no-caps":
            return Message(RecordDict({}), reply_to=msg)
        return Message(RecordDict({"capabilities" if kind == "wrong-name" else "caps": record}),
                       reply_to=msg)

    nodes = strategy.discover(FakeGrid(partitions, respond))

    honest = [(100, 0, 8), (101, 1, 8), (102, 2, 8)]
    got = [(n.node_id, n.partition_id, n.rank) for n in nodes]
    valid = kind == "caps" and _caps_valid({**caps}, cfg.fl.max_rank, 8)
    assert got == honest + ([(999, caps["partition-id"], 8)] if valid else []), (kind, caps)


# ----------------------------------------------------------------------------- evaluation

eval_keys = st.sampled_from(["num-examples", "eval-loss", "eval-accuracy", "eval-examples",
                             "partition-id", "token-id", "eval-perplexity"])


@given(values=st.dictionaries(eval_keys, metric_values, max_size=5),
       replace=st.booleans(), as_error=st.booleans())
@_settings("eval")
def test_federated_evaluation_survives_any_metrics_and_averages_the_valid(values, replace,
                                                                          as_error):
    cfg = config.from_flat(tiny_config(**{"fraction-evaluate": 1.0}))
    strategy = FederatedLora(cfg, make_glob(4), lambda _: None, lambda _: None)
    infos = [NodeInfo(node_id=100 + p, partition_id=p, rank=4) for p in range(4)]
    honest = {p: {"num-examples": 5 + p, "eval-loss": 0.1 * p, "eval-accuracy": 0.2 * p,
                  "eval-examples": 5 + p, "partition-id": p} for p in range(4)}
    fuzzed = values if replace else {**honest[FUZZED], **values}

    def respond(msg, partition):
        if partition == FUZZED and as_error:
            return Message(Error(code=0, reason="boom"), reply_to=msg)
        metrics = metrics_record(fuzzed) if partition == FUZZED else MetricRecord(
            honest[partition])
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    out = strategy.federated_evaluate(FakeGrid({n.node_id: n.partition_id for n in infos},
                                               respond), infos, 1)

    sent = dict(metrics_record(fuzzed))
    n = sent.get("num-examples")
    ok = (not as_error and set(sent) <= {"num-examples", "eval-loss", "eval-accuracy",
                                         "eval-examples", "partition-id", "eval-perplexity"}
          and type(n) is int and 0 < n <= cfg.fl.max_examples
          and all(type(v) in (int, float) and math.isfinite(v) for v in sent.values())
          and all(type(sent.get(k)) is int for k in ("eval-examples", "partition-id")
                  if k in sent)
          and type(sent.get("eval-loss")) in (int, float) and sent["eval-loss"] >= 0
          and type(sent.get("eval-accuracy")) in (int, float) and 0 <= sent["eval-accuracy"] <= 1
          and sent.get("eval-examples", 0) >= 0
          and sent.get("eval-perplexity", 1.0) >= 1.0)
    used = [honest[p] for p in range(1, 4)] + ([sent] if ok else [])
    total = sum(m["num-examples"] for m in used)
    assert out["fed_eval_clients"] == len(used)
    for key in ("eval-loss", "eval-accuracy"):
        want = sum(float(m[key]) * m["num-examples"] for m in used) / total
        assert out[f"fed_{key.replace('-', '_')}"] == pytest.approx(want, rel=1e-12)
    assert ("fed_eval_rejected" in out) == (not ok)
