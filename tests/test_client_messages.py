"""What a client sends, in every mode: exactly the declared outgoing schema, nothing else.

For every registered rule × {plain, DP, secure, signed} × {classifier, causal LM} × {with,
without ``lora.modules-to-save``}: when the server's start-up checks accept the combination, one
round of the real ServerApp strategy (RoLoRA: two, one per phase) and a federated evaluation run
against the real ClientApp handlers in process (3 nodes, 2 sampled: partial participation;
mixed ranks for the rules that allow them), and every reply a node sends is checked against an
allow list written out here:

* capability replies: the node's partition, partition count and rank (and its signing key
  with ``sign-updates``);
* a train reply's ``arrays``: exactly the factors the round's ``send`` names, at the node's own
  tier rank (the shapes it received), and the declared heads (the classifier for seq-cls, each
  module to save); each a float32 ``.npy`` whose bytes end where the array does; nothing else —
  no base weights, no token ids or labels, no optimizer state;
* metrics: keys from the declared train (evaluate) list only, each a number (no strings, no
  lists); an evaluate reply carries nothing else;
* secure rounds: public keys, the commitment, encrypted shares and seeds in their declared
  fields, and one uint32 masked vector exactly as long as the update the node would send;
* signed replies: the envelope's six fields.

Combinations the start-up refuses (DP or secure aggregation with a rule that is not a mean of
updates) are not run; the refusal's message is asserted instead.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from fl_harness import save_tiny_llama, tiny_config
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from clients.app import app as client_app
from fedlora import config
from fedlora.aggregation import available_strategies, strategy_info
from fedlora.errors import ConfigError
from fedlora.federation.wire_schema import EVAL_METRICS, TRAIN_METRICS
from fedlora.learning.evaluator import ServerModel
from fedlora.privacy import dp as privacy
from fedlora.privacy.secure_wire import check_secure_aggregation
from server.inprocess import InProcessGrid
from server.strategy import FederatedLora

# what the start-up accepts, written out (a new rule must be added to one list or refused)
DP_RULES = {"fedit", "ffa", "fedsa", "rolora", "fedsvd"}
SECURE_RULES = {"fedit", "ffa", "fedsa", "rolora", "hetlora", "fedsvd"}
MODES = {
    "plain": {},
    "dp": {"dp-mode": "central", "dp-clip-norm": 1.0, "dp-noise-multiplier": 0.1},
    "secure": {"secure-aggregation": True},
    "signed": {"sign-updates": True},
}
TASKS = ("seq-cls", "causal-lm")
SAVED = {"seq-cls": "pooler", "causal-lm": "lm_head"}  # a module to save for each task
RANKS = (2, 3, 4)  # per partition, for the rules that allow mixed ranks (max-rank 4)

CAPS = {"partition-id", "num-partitions", "lora-rank"}
SIGNING_CAPS = {"signing-key", "signing-nonce", "signing-proof"}
ENVELOPE = {"run-id", "server-round", "node-id", "nonce", "payload-hash", "signature"}
SECURE_FIELDS = {  # message type -> the secagg record's allowed fields
    "train": {"server-round", "mask-key", "encryption-key"},
    "query.secagg_share_keys": {"server-round", "receivers", "ciphertexts", "commitment"},
    "query.secagg_masked_input": {"server-round", "no-shares-of", "pair-seed-owners",
                                  "pair-seeds"},
    "query.secagg_unmask": {"server-round", "self-mask-owners", "self-mask-shares",
                            "mask-key-owners", "mask-key-shares", "pair-seed-owners",
                            "pair-seeds"},
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden=16, heads=2)


def flat_config(rule: str, mode: str, task: str, saved: bool, llama: str) -> dict:
    keys = {"strategy": rule, "lora.r": 4, "max-rank": 4, "num-train-nodes": 2,
            "min-accepted": 2, "train.local-steps": 1, "train.batch-size": 4,
            "data.samples-per-client": 8, "data.eval-samples": 4, "data.max-length": 16,
            "lora.modules-to-save": SAVED[task] if saved else "",
            "rank-by-partition": "" if strategy_info(rule).equal_ranks else
            ",".join(map(str, RANKS)), **MODES[mode]}
    if task == "causal-lm":
        keys.update({"model.name": llama, "model.task": "causal-lm",
                     "data.source": "chatterbot", "data.partitioner": "natural",
                     "lora.target-modules": "q_proj,v_proj"})
    return tiny_config(**keys)


def start_up(flat: dict) -> config.RunConfig:
    """What the ServerApp checks before anything is loaded (server/app.py)."""
    cfg = config.from_flat(flat)
    check_secure_aggregation(cfg)
    privacy.check_config(cfg)
    return cfg


@functools.cache
def server_model(flat_items: tuple) -> ServerModel:
    cfg = config.from_flat(dict(flat_items))
    return ServerModel(cfg, cfg.fl.max_rank)


def model_key(flat: dict) -> tuple:
    """The keys the server's model depends on (one model per task and modules to save)."""
    return tuple(sorted((k, v) for k, v in flat.items() if k.startswith(("model.", "lora."))
                        or k in ("max-rank", "seed", "data.source", "data.eval-samples",
                                 "data.max-length", "data.partitioner")))


def run_rounds(flat: dict, cfg: config.RunConfig):
    """Discovery, round 1 (RoLoRA: rounds 1 and 2, one per phase) and a federated evaluation
    of the real strategy on the real ClientApp; every message each way."""
    replies = []
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": 3}
                                      for i in range(3)], flat, on_reply=replies.append)
    glob = server_model(model_key(flat)).initial_global()
    base = glob.arrays_for(cfg.fl.max_rank)  # the server's adapter before the round
    strategy = FederatedLora(cfg, glob, lambda _: None, lambda _: None, run_id=grid.run_id)
    nodes = strategy.discover(grid)
    records = [strategy.train_round(grid, nodes, server_round) for server_round in
               ((1, 2) if cfg.fl.strategy == "rolora" else (1,))]  # RoLoRA: B, then A
    evaluation = strategy.federated_evaluate(grid, nodes, len(records))
    assert evaluation["fed_eval_clients"] == 2 and "fed_eval_rejected" not in evaluation
    sent = {m.metadata.message_id: m for m in grid.delivered}
    return records, [(sent[r.metadata.reply_to_message_id], r) for r in replies], base


def declared_heads(task: str, saved: bool, base: dict) -> set[str]:
    """The non-LoRA keys the server's adapter holds, which must be exactly the declared ones."""
    heads = {k for k in base if ".lora_" not in k}
    wanted = (["classifier"] if task == "seq-cls" else []) + ([SAVED[task]] if saved else [])
    assert all(any(f".{name}." in k for name in wanted) for k in heads), sorted(heads)
    assert all(any(f".{name}." in k for k in heads) for name in wanted), sorted(heads)
    return heads


def expected_arrays(msg, heads: set[str]) -> dict[str, tuple[int, ...]]:
    """Key -> shape a train reply to ``msg`` may carry: the factors ``send`` names and the
    heads, each at the shape the node received (its tier's rank)."""
    send = str(msg.content["config"]["send"])
    out = {}
    for key, array in msg.content["arrays"].items():
        if key in heads or (".lora_A." in key and "a" in send) or (
                ".lora_B." in key and "b" in send):
            out[key] = tuple(array.shape)
    return out


def check_npy(array: Array, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    buffer = io.BytesIO(array.data)
    value = np.load(buffer, allow_pickle=False)
    assert value.dtype == np.dtype(dtype) and value.shape == shape
    assert buffer.tell() == len(array.data), "bytes after the array's end"
    return value


def check_metrics(metrics) -> None:
    assert isinstance(metrics, MetricRecord)
    assert set(metrics) <= set(TRAIN_METRICS), sorted(set(metrics) - set(TRAIN_METRICS))
    assert all(isinstance(v, int | float) and not isinstance(v, bool)
               for v in metrics.values())


def check_signature(content, signed: bool) -> set[str]:
    if not signed:
        assert "signature" not in content
        return set()
    record = content["signature"]
    assert isinstance(record, ConfigRecord) and set(record) == ENVELOPE
    return {"signature"}


def update_size(msg, heads: set[str]) -> int:
    """Coordinates of the update a node answering train message ``msg`` would send: the
    factors of ``send`` and the heads (secure HetLoRA pads the factors to ``hetlora-rank`` and
    adds its normaliser, one number per module)."""
    padded = msg.content["config"].get("hetlora-rank")
    total = 0
    for key, shape in expected_arrays(msg, heads).items():
        if padded is not None and ".lora_A." in key:
            shape = (int(padded), shape[1])
            total += 1
        elif padded is not None and ".lora_B." in key:
            shape = (shape[0], int(padded))
        total += int(np.prod(shape))
    return total


def check_reply(msg, reply, *, mode: str, rank: int, heads: set[str], size: int) -> None:
    """``reply`` to ``msg`` from a node of LoRA rank ``rank`` whose update has ``size``
    coordinates holds only what the schema of ``mode`` allows."""
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content, kind = reply.content, msg.metadata.message_type
    signed = mode == "signed"
    if kind == "evaluate":  # held-out metrics of the declared evaluate list only
        assert set(content) == {"metrics"} and isinstance(content["metrics"], MetricRecord)
        assert set(content["metrics"]) <= set(EVAL_METRICS)
        assert all(isinstance(v, int | float) and not isinstance(v, bool)
                   for v in content["metrics"].values())
        return
    if kind == "query.capabilities":
        assert set(content) == {"caps"}
        assert set(content["caps"]) == CAPS | (SIGNING_CAPS if signed else set())
        assert content["caps"]["lora-rank"] == rank
        return
    if mode == "secure":
        allowed = SECURE_FIELDS[kind]
        assert set(content["secagg"]) <= allowed and "server-round" in content["secagg"]
        assert all(isinstance(v, int | bytes) or (isinstance(v, list) and all(
            isinstance(x, int | bytes) for x in v)) for v in content["secagg"].values())
        if kind == "train":  # stage 0: public keys and metrics; the factors stay on the node
            assert set(content) == {"secagg", "metrics"}
            assert set(content["secagg"]) == allowed
            assert all(len(content["secagg"][k]) == 32 for k in ("mask-key", "encryption-key"))
            check_metrics(content["metrics"])
        elif kind == "query.secagg_masked_input":  # the update, masked: d words + the weight
            assert set(content) == {"secagg", "masked"}
            assert isinstance(content["masked"], ArrayRecord)
            assert set(content["masked"]) == {"masked-input"}
            check_npy(content["masked"]["masked-input"], (size + 1,), "uint32")
        else:
            assert set(content) == {"secagg"}
        return
    assert kind == "train", kind
    assert set(content) == {"arrays", "metrics"} | check_signature(content, signed)
    arrays = content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    want = expected_arrays(msg, heads)
    assert set(arrays) == set(want), sorted(set(arrays) ^ set(want))
    for key, array in arrays.items():
        check_npy(array, want[key], "float32")
        if ".lora_A." in key:
            assert want[key][0] == rank, key
        elif ".lora_B." in key:
            assert want[key][1] == rank, key
    check_metrics(content["metrics"])


CASES = [(rule, mode, task, saved) for rule in available_strategies() for mode in MODES
         for task in TASKS for saved in (False, True)]


@pytest.mark.parametrize(("rule", "mode", "task", "saved"), CASES,
                         ids=[f"{r}-{m}-{t}-{'saved' if s else 'nosave'}" for r, m, t, s in CASES])
def test_every_reply_holds_only_the_declared_schema(rule, mode, task, saved, tiny_llama):
    flat = flat_config(rule, mode, task, saved, tiny_llama)
    refused = (mode == "dp" and rule not in DP_RULES) or (
        mode == "secure" and rule not in SECURE_RULES)
    if refused:
        with pytest.raises(ConfigError) as info:
            start_up(flat)
        text = str(info.value)
        assert rule in text
        assert ("secure-aggregation = true" if mode == "secure" else "dp-mode 'central'") in text
        return
    cfg = start_up(flat)

    records, exchanges, base = run_rounds(flat, cfg)

    heads = declared_heads(task, saved, base)
    ranks = RANKS if cfg.fl.rank_by_partition else (cfg.lora.r,) * 3
    partition = {m.metadata.dst_node_id: int(r.content["caps"]["partition-id"])
                 for m, r in exchanges if m.metadata.message_type == "query.capabilities"}
    size = {m.metadata.dst_node_id: update_size(m, heads)
            for m, _ in exchanges if m.metadata.message_type == "train"}
    kinds = {msg.metadata.message_type for msg, _ in exchanges}
    assert kinds == ({"query.capabilities", "evaluate", *SECURE_FIELDS} if mode == "secure"
                     else {"query.capabilities", "train", "evaluate"})
    for msg, reply in exchanges:
        node = msg.metadata.dst_node_id
        check_reply(msg, reply, mode=mode, rank=ranks[partition[node]], heads=heads,
                    size=size.get(node, -1))
    for record in records:
        assert record["num_sampled"] == 2 and not record.get("abandoned")
        assert not record.get("rejected"), record["rejected"]
    if rule == "rolora":  # both phases ran: B only, then A only
        sends = [m.content["config"]["send"] for m, _ in exchanges
                 if m.metadata.message_type == "train"]
        assert sends == ["b", "b", "a", "a"]
