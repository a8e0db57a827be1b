"""What a client sends, in every mode: exactly the declared outgoing schema, nothing else.

For every registered rule × {plain, DP central / local / distributed, secure, signed, secure
and signed} × {classifier, causal LM} × {with, without ``lora.modules-to-save``}: when the
server's start-up checks accept the combination, one round of the real ServerApp strategy
(RoLoRA: two, one per phase), a federated evaluation and (FedSA) the end-of-run
personal-adapter export run against the real ClientApp handlers in process (3 nodes, 2 sampled:
partial participation; mixed ranks for the rules that allow them), and every reply a node sends
is checked against an allow list written out here:

* capability replies: the node's partition, partition count and rank (and its signing key
  with ``sign-updates``);
* a train reply's ``arrays``: exactly the factors the round's ``send`` names, at the node's own
  tier rank (the shapes it received), and the declared heads (the classifier for seq-cls, each
  module to save); each a float32 ``.npy`` whose bytes end where the array does; nothing else —
  no base weights, no token ids or labels, no optimizer state; under central DP the update
  ``sent − received`` within ``dp-clip-norm``;
* metrics: keys from the declared train (evaluate) list only, each a number (no strings, no
  lists); an evaluate reply carries nothing else; central DP adds the norm and clip factor,
  local and distributed DP (untrusted server) report neither, nor the train loss (0.0) nor the
  timings;
* secure rounds: public keys (signed: with the node's signature over them), the commitment,
  encrypted shares and seeds in their declared fields, and one uint32 masked vector exactly as
  long as the update the node would send;
* signed replies: the envelope's six fields (secure: on the masked input and the unmask shares);
* FedSA's export reply: the partition and a saved flag; the node's B is written on the node.

Combinations the start-up refuses (DP or secure aggregation with a rule that is not a mean of
updates) are not run; the refusal's message is asserted instead. The three later modes run half
their combinations in the fast suite and the other half as ``slow``. A sibling test makes a
FedSA client leak its B and checks that these checks catch it in every mode.
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
from fedlora.federation import wire_schema
from fedlora.federation.wire_schema import EVAL_METRICS, TRAIN_METRICS
from fedlora.learning import client_round
from fedlora.learning.evaluator import ServerModel
from fedlora.privacy import dp as privacy
from fedlora.privacy.secagg.client import SecAggClient
from fedlora.privacy.secure_wire import check_secure_aggregation
from server.inprocess import InProcessGrid
from server.strategy import FederatedLora, round_plan

# what the start-up accepts, written out (a new rule must be added to one list or refused)
DP_RULES = {"fedit", "ffa", "fedsa", "rolora", "fedsvd"}
SECURE_RULES = {"fedit", "ffa", "fedsa", "rolora", "hetlora", "fedsvd"}
DP = {"dp-clip-norm": 0.02, "dp-noise-multiplier": 0.1}  # below every update here: clips
MODES = {
    "plain": {},
    "dp-central": {"dp-mode": "central", **DP},
    "dp-local": {"dp-mode": "local", **DP},
    "dp-distributed": {"dp-mode": "distributed", "secure-aggregation": True, **DP},
    "secure": {"secure-aggregation": True},
    "signed": {"sign-updates": True},
    "secure-signed": {"secure-aggregation": True, "sign-updates": True},
}
SAMPLED_MODES = ("dp-local", "dp-distributed", "secure-signed")  # half the cases fast, half slow
TASKS = ("seq-cls", "causal-lm")
SAVED = {"seq-cls": "pooler", "causal-lm": "lm_head"}  # a module to save for each task
RANKS = (2, 3, 4)  # per partition, for the rules that allow mixed ranks (max-rank 4)

CAPS = {"partition-id", "num-partitions", "lora-rank"}
SIGNING_CAPS = {"signing-key", "signing-nonce", "signing-proof"}
KEYS_SIGNATURE = {"keys-nonce", "keys-signature"}  # signed secure: stage 0 vouches for the keys
PERSONAL_EXPORT = {"partition-id", "personal-saved"}  # FedSA's end-of-run reply
CLIP_METRICS = {"dp-norm", "dp-clip-factor"}  # central DP only
UNTRUSTED_WITHHELD = {"train-seconds", "train-cpu-s", "load-seconds", "secagg-clipped"}
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
SIGNED_SECURE = {"query.secagg_masked_input", "query.secagg_unmask"}  # carry the envelope


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
    """Discovery, round 1 (RoLoRA: rounds 1 and 2, one per phase), a federated evaluation
    and (FedSA) the end-of-run personal-adapter export, of the real strategy on the real
    ClientApp; every message each way."""
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
    if round_plan(cfg, len(records)).personal:  # FedSA: each node keeps global A + own B
        assert strategy.export_personal(grid, nodes, len(records)) == 3
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
    assert value.dtype == np.dtype(dtype), f"dtype {value.dtype}, declared {dtype}"
    assert value.shape == shape, f"shape {value.shape}, declared {shape}"
    assert buffer.tell() == len(array.data), "bytes after the array's end"
    return value


def check_metrics(metrics, dp_mode: str) -> None:
    """Declared train metrics only, each a number; what else DP lets out depends on its mode:
    a trusted server (central) gets the norm before clipping, an untrusted one (local,
    distributed) neither that nor the train loss nor the timings (only the noise covers
    what it sees)."""
    assert isinstance(metrics, MetricRecord)
    assert set(metrics) <= set(TRAIN_METRICS), sorted(set(metrics) - set(TRAIN_METRICS))
    assert all(isinstance(v, int | float) and not isinstance(v, bool)
               for v in metrics.values())
    if dp_mode == "central":
        assert set(metrics) >= CLIP_METRICS and 0 < metrics["dp-clip-factor"] <= 1
    else:
        assert not CLIP_METRICS & set(metrics), sorted(metrics)
    if dp_mode in ("local", "distributed"):
        assert metrics["train-loss"] == 0.0
        assert not UNTRUSTED_WITHHELD & set(metrics), sorted(UNTRUSTED_WITHHELD & set(metrics))


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


def check_secure_reply(kind: str, content, *, signed: bool, dp_mode: str, size: int) -> None:
    """A secure round's replies: public keys (and, signed, the node's signature over them),
    encrypted shares and seeds in their declared fields; the update only masked."""
    allowed = SECURE_FIELDS[kind] | (KEYS_SIGNATURE if signed and kind == "train" else set())
    assert set(content["secagg"]) <= allowed and "server-round" in content["secagg"]
    assert all(isinstance(v, int | bytes) or (isinstance(v, list) and all(
        isinstance(x, int | bytes) for x in v)) for v in content["secagg"].values())
    envelope = check_signature(content, signed and kind in SIGNED_SECURE)
    if kind == "train":  # stage 0: public keys and metrics; the factors stay on the node
        assert set(content) == {"secagg", "metrics"}
        assert set(content["secagg"]) == allowed
        assert all(len(content["secagg"][k]) == 32 for k in ("mask-key", "encryption-key"))
        check_metrics(content["metrics"], dp_mode)
    elif kind == "query.secagg_masked_input":  # the update, masked: d words + the weight
        assert set(content) == {"secagg", "masked"} | envelope
        assert isinstance(content["masked"], ArrayRecord)
        assert set(content["masked"]) == {"masked-input"}
        check_npy(content["masked"]["masked-input"], (size + 1,), "uint32")
    else:
        assert set(content) == {"secagg"} | envelope


def check_reply(msg, reply, *, cfg: config.RunConfig, rank: int, heads: set[str],
                size: int) -> None:
    """``reply`` to ``msg`` from a node of LoRA rank ``rank`` whose update has ``size``
    coordinates holds only what the schema of ``cfg``'s mode allows."""
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content, kind = reply.content, msg.metadata.message_type
    signed, dp_mode = cfg.fl.sign_updates, cfg.fl.dp_mode
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
    if kind == "query.personal_export":  # FedSA's end of run: a count; B stays on the node
        assert set(content) == {"metrics"} and set(content["metrics"]) == PERSONAL_EXPORT
        assert content["metrics"]["personal-saved"] == 1
        assert all(type(v) is int for v in content["metrics"].values())
        return
    if cfg.fl.secure_aggregation:
        check_secure_reply(kind, content, signed=signed, dp_mode=dp_mode, size=size)
        return
    assert kind == "train", kind
    assert set(content) == {"arrays", "metrics"} | check_signature(content, signed)
    arrays = content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    want = expected_arrays(msg, heads)
    assert set(arrays) == set(want), f"keys outside the schema: {sorted(set(arrays) ^ set(want))}"
    update = 0.0
    for key, array in arrays.items():
        value = check_npy(array, want[key], "float32")
        if ".lora_A." in key:
            assert want[key][0] == rank, key
        elif ".lora_B." in key:
            assert want[key][1] == rank, key
        update += float(np.sum((value.astype(np.float64) - msg.content["arrays"][key].numpy())
                               ** 2))
    if dp_mode == "central":  # the client clipped what it sent: ‖sent − received‖ ≤ C
        assert update ** 0.5 <= cfg.fl.dp_clip_norm * (1 + 1e-5), update ** 0.5
    check_metrics(content["metrics"], dp_mode)


def check_exchanges(cfg: config.RunConfig, exchanges: list, heads: set[str]) -> None:
    """Every reply of the run against the schema of its mode, at its node's rank; and the
    run exchanged exactly the message kinds of that mode."""
    ranks = RANKS if cfg.fl.rank_by_partition else (cfg.lora.r,) * 3
    partition = {m.metadata.dst_node_id: int(r.content["caps"]["partition-id"])
                 for m, r in exchanges if m.metadata.message_type == "query.capabilities"}
    size = {m.metadata.dst_node_id: update_size(m, heads)
            for m, _ in exchanges if m.metadata.message_type == "train"}
    for msg, reply in exchanges:
        node = msg.metadata.dst_node_id
        check_reply(msg, reply, cfg=cfg, rank=ranks[partition[node]], heads=heads,
                    size=size.get(node, -1))
    kinds = {msg.metadata.message_type for msg, _ in exchanges}
    assert kinds == ({"query.capabilities", "evaluate"}
                     | (set(SECURE_FIELDS) if cfg.fl.secure_aggregation else {"train"})
                     | ({"query.personal_export"} if cfg.fl.strategy == "fedsa" else set()))


def refusal(rule: str, mode: str) -> str | None:
    """The start-up's refusal of ``rule`` in ``mode``, written out (None: accepted)."""
    if MODES[mode].get("secure-aggregation") and rule not in SECURE_RULES:
        return "secure-aggregation = true"
    dp_mode = MODES[mode].get("dp-mode")
    if dp_mode and rule not in DP_RULES:
        return f"dp-mode {dp_mode!r}"
    return None


def case(rule: str, mode: str, task: str, saved: bool):
    """One combination; in the later modes half of them (alternating modules-to-save by rule
    and task) run in the fast suite and the other half with the slow ones."""
    slow = mode in SAMPLED_MODES and (RULES.index(rule) + TASKS.index(task) + saved) % 2
    return pytest.param(rule, mode, task, saved, id=f"{rule}-{mode}-{task}-"
                        f"{'saved' if saved else 'nosave'}",
                        marks=[pytest.mark.slow] if slow else [])


RULES = available_strategies()
CASES = [case(rule, mode, task, saved) for rule in RULES for mode in MODES for task in TASKS
         for saved in (False, True)]


@pytest.mark.parametrize(("rule", "mode", "task", "saved"), CASES)
def test_every_reply_holds_only_the_declared_schema(rule, mode, task, saved, tiny_llama,
                                                    tmp_path):
    flat = flat_config(rule, mode, task, saved, tiny_llama)
    flat["personal-adapter-dir"] = str(tmp_path / "personal")
    refused = refusal(rule, mode)
    if refused:
        with pytest.raises(ConfigError) as info:
            start_up(flat)
        assert rule in str(info.value) and refused in str(info.value)
        return
    cfg = start_up(flat)

    records, exchanges, base = run_rounds(flat, cfg)

    check_exchanges(cfg, exchanges, declared_heads(task, saved, base))
    for record in records:
        assert record["num_sampled"] == 2 and not record.get("abandoned")
        assert not record.get("rejected"), record["rejected"]
    if rule == "rolora":  # both phases ran: B only, then A only
        sends = [m.content["config"]["send"] for m, _ in exchanges
                 if m.metadata.message_type == "train"]
        assert sends == ["b", "b", "a", "a"]
    if rule == "fedsa":  # each node's B was written on the node, never sent
        assert sorted(p.name for p in (tmp_path / "personal").iterdir()) == ["0", "1", "2"]


@pytest.mark.parametrize("mode", list(MODES))
def test_a_fedsa_client_that_sends_its_personal_b_fails_the_check_in_every_mode(
        mode, tiny_llama, tmp_path, monkeypatch):
    """The check is not vacuous: a client that ignores ``send`` and uploads FedSA's B, every
    guard of its own switched off (the outgoing-schema check; in secure mode also the secagg
    client's refusal of a vector longer than the server's, which alone stops this leak on a
    real node), is caught in every mode — as arrays outside the schema in the clear, as a
    masked vector longer than the declared update when secure."""
    real = client_round.select_outgoing
    monkeypatch.setattr(client_round, "select_outgoing", lambda trained, send: real(trained,
                                                                                   "ab"))
    monkeypatch.setattr(wire_schema, "check_outgoing", lambda *args, **kwargs: None)
    masked = SecAggClient._mask_input

    def lax(self, relayed, vector, weight):  # accept whatever length the node flattened
        self._vector_size = len(vector)
        return masked(self, relayed, vector, weight)

    monkeypatch.setattr(SecAggClient, "_mask_input", lax)
    flat = flat_config("fedsa", mode, "seq-cls", False, tiny_llama)
    flat["personal-adapter-dir"] = str(tmp_path / "personal")
    cfg = start_up(flat)

    _, exchanges, base = run_rounds(flat, cfg)

    with pytest.raises(AssertionError) as info:
        check_exchanges(cfg, exchanges, declared_heads("seq-cls", False, base))
    text = str(info.value)
    if cfg.fl.secure_aggregation:
        assert "declared (" in text and "shape (" in text, text
    else:
        assert "keys outside the schema" in text and ".lora_B." in text, text
