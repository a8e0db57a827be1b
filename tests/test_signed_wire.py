"""Signed updates (``sign-updates``): reply hashes, key announcements, key files, and the real
ServerApp strategy against the real ClientApp in process, where each attack on one node's
reply is rejected with its reason and the global adapter equals the aggregate of the others."""

from __future__ import annotations

import copy
import functools
import stat
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import serde

from clients.app import app as client_app
from fedlora import config
from fedlora.errors import ConfigError
from fedlora.learning.evaluator import ServerModel
from fedlora.privacy import signed_wire
from fedlora.privacy.secagg.keys import generate_private_key, public_bytes
from fedlora.privacy.secagg.signing import SignatureRejected, UpdateVerifier
from fedlora.privacy.secure_wire import MASKED, MASKED_INPUT, SECAGG, SHARE_KEYS, UNMASK
from fedlora.runtime import certs
from server.inprocess import InProcessGrid
from server.strategy import FederatedLora
from tests.fl_harness import tiny_config

RUN = 1  # InProcessGrid's run id
BAD = 2  # the partition whose reply is attacked
NODES = 3


def node_id(partition: int) -> int:
    return 1000 + 7 * partition  # InProcessGrid's node ids


# --------------------------------------------------------------------------- reply hash


def _reply() -> RecordDict:
    return RecordDict({
        "arrays": ArrayRecord({"m.lora_A.weight": Array(np.arange(6, dtype=np.float32)
                                                        .reshape(2, 3)),
                               "m.lora_B.weight": Array(np.ones((3, 2), np.float16))}),
        "metrics": MetricRecord({"num-examples": 16, "train-loss": 1.25, "server-round": 3}),
    })


def test_the_reply_hash_survives_flowers_serialisation_and_ignores_the_signature():
    content = _reply()
    reference = signed_wire.reply_hash(content)

    again = serde.recorddict_from_proto(serde.recorddict_to_proto(content))
    again[signed_wire.SIGNATURE] = ConfigRecord({"anything": b"x"})

    assert signed_wire.reply_hash(again) == reference


def _edit_array(content: RecordDict) -> None:
    array = content["arrays"]["m.lora_A.weight"]
    data = bytearray(array.data)
    data[-1] ^= 1
    content["arrays"]["m.lora_A.weight"] = Array(array.dtype, array.shape, array.stype,
                                                 bytes(data))


def _relabel(content: RecordDict) -> None:  # same bytes, another declared dtype
    array = content["arrays"]["m.lora_B.weight"]
    content["arrays"]["m.lora_B.weight"] = Array("bfloat16", array.shape, array.stype,
                                                 array.data)


@pytest.mark.parametrize("change", [
    _edit_array,
    _relabel,
    lambda c: c["metrics"].__setitem__("num-examples", 17),
    lambda c: c["metrics"].__setitem__("num-examples", 16.0),  # int → float, same value
    lambda c: c.__setitem__("extra", ConfigRecord({"k": 1})),
    lambda c: c["arrays"].__setitem__("m.lora_C.weight", Array(np.zeros(1, np.float32))),
    lambda c: c.__setitem__("metrics", ConfigRecord(dict(c["metrics"]))),  # record kind
    # a malformed shape is hashed too (and refused later), never an error of the server
    lambda c: c["arrays"].__setitem__("x", Array("float32", (-1,), "numpy.ndarray", b"")),
], ids=["array-byte", "array-dtype", "example-count", "int-to-float", "extra-record",
        "extra-array", "record-kind", "negative-shape"])
def test_every_change_of_a_reply_changes_its_hash(change: Callable[[RecordDict], None]):
    content = _reply()
    reference = signed_wire.reply_hash(content)

    change(content)

    assert signed_wire.reply_hash(content) != reference


# --------------------------------------------------------------------------- announcements


def _announce(key, node: int, run: int = RUN) -> dict:
    return signed_wire.announcement(key, run, node)


def test_announced_keys_are_learned_with_their_proof():
    first, second = (signed_wire.Ed25519PrivateKey.generate() for _ in range(2))
    forged = {**_announce(first, 5), "signing-key": second.public_key().public_bytes_raw()}

    keys, problems = signed_wire.node_keys(RUN, {
        4: _announce(first, 4),
        5: forged,  # another key, proved with the first one's signature
        6: _announce(first, 4),  # node 4's announcement replayed by node 6
        7: _announce(second, 7, run=RUN + 1),  # made for another run
        8: {"signing-key": b"short"},
    }, registered=None)

    assert keys == {4: first.public_key().public_bytes_raw()}
    assert set(problems) == {5, 6, 7, 8}
    assert all("invalid" in problems[n] for n in (5, 6, 7, 8))
    assert "BAD_SIGNATURE" in problems[5] and "MALFORMED" in problems[8]


def test_with_registered_keys_only_those_are_learned_and_each_once():
    registered, stranger = (signed_wire.Ed25519PrivateKey.generate() for _ in range(2))
    public = registered.public_key().public_bytes_raw()

    keys, problems = signed_wire.node_keys(RUN, {
        4: _announce(registered, 4), 5: _announce(registered, 5), 6: _announce(stranger, 6)},
        registered={public})

    assert keys == {4: public}
    assert "node 4 already holds" in problems[5]
    assert "not among the registered" in problems[6]


# --------------------------------------------------------------------------- key files


def test_certs_write_signing_keys_the_server_and_the_nodes_load(tmp_path):
    creds = certs.generate_signing_keys(tmp_path / "keys", nodes=2)

    registered = signed_wire.registered_keys(creds.directory)

    assert sorted(registered.values()) == ["signing-0.pub", "signing-1.pub"]
    for key_path in creds.signing_keys:
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        key = signed_wire.load_private_key(key_path)
        assert key.public_key().public_bytes_raw() in registered
    with pytest.raises(certs.CertsError, match="--force"):
        certs.generate_signing_keys(tmp_path / "keys", nodes=2)


def test_bad_key_files_say_what_to_do(tmp_path):
    creds = certs.generate(tmp_path / "creds", nodes=1)  # also writes signing-0.key/.pub
    with pytest.raises(ConfigError, match="holds no signing-\\*.pub"):
        signed_wire.registered_keys(tmp_path / "empty")
    with pytest.raises(ConfigError, match="needs an Ed25519 key"):
        signed_wire.load_private_key(creds.node_keys[0])  # the EC SuperNode key
    with pytest.raises(ConfigError, match="cannot read the signing key"):
        signed_wire.load_private_key(tmp_path / "missing.key")
    creds.node_public_keys[0].rename(tmp_path / "creds" / "signing-9.pub")
    with pytest.raises(ConfigError, match="signing-9.pub holds a .*signing keys are Ed25519"):
        signed_wire.registered_keys(creds.directory)


def test_a_node_without_a_key_file_draws_one_and_keeps_it(tmp_path):
    context = Context(run_id=RUN, node_id=3, node_config={}, state=RecordDict(), run_config={})
    drawn = signed_wire.node_key(context).public_key().public_bytes_raw()
    assert signed_wire.node_key(context).public_key().public_bytes_raw() == drawn

    creds = certs.generate_signing_keys(tmp_path, nodes=1)
    context.node_config[signed_wire.NODE_KEY] = str(creds.signing_keys[0])
    assert signed_wire.node_key(context).public_key().public_bytes_raw() == \
        signed_wire.load_private_key(creds.signing_keys[0]).public_key().public_bytes_raw()


def test_a_signed_reply_verifies_once():
    key = signed_wire.Ed25519PrivateKey.generate()
    content = _reply()
    signed_wire.sign_reply(content, key, RUN, 9, 3)
    verifier = UpdateVerifier(str(RUN), {9: key.public_key().public_bytes_raw()})

    signed_wire.verify_reply(verifier, content, 9, 3)

    with pytest.raises(SignatureRejected, match="REPLAYED"):
        signed_wire.verify_reply(verifier, content, 9, 3)


# --------------------------------------------------------------------------- in process


class AttackGrid(InProcessGrid):
    """Applies ``attack(grid, message_type, server_round, replies)`` to each reply batch."""

    def __init__(self, *args, attack=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.attack = attack
        self.kept: dict[tuple[int, int], Message] = {}  # (round, partition) -> train reply

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if not messages:
            return replies
        kind = messages[0].metadata.message_type
        instructions = messages[0].content.config_records.get("config")
        server_round = int(instructions["server-round"]) if instructions else 0
        if kind == "train":
            for reply in replies:
                if not reply.has_error():
                    self.kept[server_round, pid(reply)] = copy.deepcopy(reply)
        return self.attack(self, kind, server_round, replies) if self.attack else replies


def pid(reply: Message) -> int:
    return (reply.metadata.src_node_id - 1000) // 7


def run(flat: dict, attack=None, fail=None, node_extra: Callable[[int], dict] | None = None):
    """(metrics lines, global adapter at rank 8, grid)."""
    cfg = config.from_flat(flat)
    nodes = [{"partition-id": i, "num-partitions": NODES, **(node_extra(i) if node_extra
                                                           else {})} for i in range(NODES)]
    grid = AttackGrid(client_app, nodes, flat, run_id=RUN, attack=attack, fail=fail)
    server_model = ServerModel(cfg, cfg.fl.max_rank)
    records: list[dict] = []
    strategy = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                             records.append, run_id=RUN)
    strategy.run(grid)
    return records, strategy.glob.arrays_for(8), grid


def signed(rounds: int = 1, **extra) -> dict:
    return tiny_config(num_server_rounds=rounds, sign_updates=True, **extra)


def trained_in(server_round: int) -> Callable[[int, Message], bool]:
    def fail(partition: int, msg: Message) -> bool:
        return (partition == BAD and msg.metadata.message_type == "train"
                and int(msg.content["config"]["server-round"]) == server_round)
    return fail


@functools.cache
def reference(kind: str) -> dict[str, np.ndarray]:
    """The global adapter of a signed run with every node ("all"), or with BAD failing in
    round 1 ("without") or in round 2 of two ("without-round-2")."""
    if kind == "all":
        return run(signed())[1]
    if kind == "without":
        return run(signed(), fail=trained_in(1))[1]
    return run(signed(2), fail=trained_in(2))[1]


def assert_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert np.array_equal(got[key], value), key


def test_a_signed_run_signs_every_update_and_equals_the_unsigned_run():
    records, glob, grid = run(signed(2))
    unsigned, plain, _ = run(tiny_config(num_server_rounds=2))

    assert [r["rejected"] for r in records[1:]] == [{}, {}]
    assert [r["num_accepted"] for r in records[1:]] == [3, 3]
    assert len(grid.kept) == 2 * NODES
    for (server_round, partition), reply in grid.kept.items():
        envelope = reply.content[signed_wire.SIGNATURE]
        assert (envelope["server-round"], envelope["node-id"]) == (server_round,
                                                                   node_id(partition))
        assert envelope["payload-hash"] == signed_wire.reply_hash(reply.content)
    assert_equal(glob, plain)
    assert records[-1]["eval_loss"] == unsigned[-1]["eval_loss"]


def on_bad(change: Callable[[AttackGrid, Message], None], server_round: int = 1):
    """An attack that applies ``change`` to BAD's train reply of ``server_round``."""
    def attack(grid, kind, this_round, replies):
        if kind == "train" and this_round == server_round:
            for reply in replies:
                if pid(reply) == BAD:
                    change(grid, reply)
        return replies
    return attack


def tamper_array(grid, reply):
    arrays = reply.content["arrays"]
    key = next(k for k in arrays if k.endswith("lora_B.weight"))
    arrays[key] = Array(arrays[key].numpy() * 2)


def tamper_weight(grid, reply):
    reply.content["metrics"]["num-examples"] = 10_000  # a plain run would accept this


def flip_signature(grid, reply):
    envelope = reply.content[signed_wire.SIGNATURE]
    envelope["signature"] = bytes([envelope["signature"][0] ^ 1]) + envelope["signature"][1:]


def drop_signature(grid, reply):
    del reply.content[signed_wire.SIGNATURE]


def relay_other_node(grid, reply):
    """Partition 0's genuine signed reply, delivered as BAD's."""
    reply.content = copy.deepcopy(grid.kept[1, 0].content)


def replay_round_1(grid, reply):
    reply.content = copy.deepcopy(grid.kept[1, BAD].content)


def exact_copy(grid, kind, server_round, replies):
    if kind == "train":
        replies = [*replies, next(r for r in replies if pid(r) == BAD)]
    return replies


def second_signed_reply(grid, kind, server_round, replies):
    """BAD signs a second, different update in the same round with its own key."""
    if kind == "train":
        first = next(r for r in replies if pid(r) == BAD)
        second = copy.deepcopy(first)
        second.content["metrics"]["train-loss"] = 0.0
        del second.content[signed_wire.SIGNATURE]
        key = signed_wire.node_key(grid.contexts[node_id(BAD)])
        signed_wire.sign_reply(second.content, key, RUN, node_id(BAD), server_round)
        replies = [*replies, second]
    return replies


# (case, attack, rounds, reason, what the global must equal)
ATTACKS = [
    ("tampered-array", on_bad(tamper_array), 1, "TAMPERED", "without"),
    ("tampered-example-count", on_bad(tamper_weight), 1, "TAMPERED", "without"),
    ("bad-signature", on_bad(flip_signature), 1, "BAD_SIGNATURE", "without"),
    ("no-signature", on_bad(drop_signature), 1, "MALFORMED", "without"),
    ("relayed-from-another-node", on_bad(relay_other_node), 1, "WRONG_NODE", "without"),
    ("replayed-old-round", on_bad(replay_round_1, server_round=2), 2, "WRONG_ROUND",
     "without-round-2"),
    ("exact-duplicate", exact_copy, 1, "REPLAYED", "all"),
    ("second-signed-update", second_signed_reply, 1, "DUPLICATE", "all"),
]


@pytest.mark.parametrize(("name", "attack", "rounds", "reason", "expect"), ATTACKS,
                         ids=[a[0] for a in ATTACKS])
def test_an_attacked_reply_is_rejected_with_its_reason_before_decoding(
        name, attack, rounds, reason, expect, monkeypatch):

    decoded: list[tuple[int, int]] = []  # (round, partition) of every reply the server decoded
    real_decode = FederatedLora.decode

    def decode(self, reply, node, *args, **kwargs):
        decoded.append((int(reply.content["metrics"]["server-round"]), node.partition_id))
        return real_decode(self, reply, node, *args, **kwargs)

    monkeypatch.setattr(FederatedLora, "decode", decode)
    records, glob, _ = run(signed(rounds), attack=attack)

    assert records[rounds]["rejected"] == {reason: 1}, records[rounds]["rejected"]
    accepted = 3 if expect == "all" else 2
    assert records[rounds]["num_accepted"] == accepted
    # the signature check came first: the rejected reply was never decoded
    in_round = [p for r, p in decoded if r == rounds]
    assert len(in_round) == accepted, in_round
    if expect != "all":
        assert BAD not in in_round
    assert_equal(glob, reference(expect))


def test_a_node_whose_key_is_not_registered_is_rejected_as_unknown(tmp_path):
    """Deployment-style keys: each node signs with its key file (node config signing-key);
    the server's signing-keys directory lacks BAD's public key."""
    creds = certs.generate_signing_keys(tmp_path / "keys", nodes=NODES)
    creds.signing_public_keys[BAD].unlink()

    records, glob, _ = run(signed(signing_keys=str(creds.directory)),
                        node_extra=lambda i: {"signing-key": str(creds.signing_keys[i])})

    assert records[1]["rejected"] == {"UNKNOWN_NODE": 1}
    assert records[1]["clients"] == [0, 1]
    assert_equal(glob, reference("without"))


def test_signing_keys_need_sign_updates_and_an_existing_directory(tmp_path):
    with pytest.raises(ConfigError, match="sign-updates is false"):
        config.from_flat(tiny_config(signing_keys=str(tmp_path)))
    cfg = config.from_flat(signed(signing_keys=str(tmp_path / "none")))
    with pytest.raises(ConfigError, match="holds no signing"):
        FederatedLora(cfg, None, lambda glob: None, lambda rec: None)


# --------------------------------------------------------------------------- secure aggregation


def secure_run(attack=None, fail=None) -> tuple[dict, dict[str, np.ndarray]]:
    records, glob, _ = run(signed(secure_aggregation=True), attack=attack, fail=fail)
    return records[1], glob


def test_under_secure_aggregation_the_masked_input_is_signed_and_checked():
    def tamper_masked(grid, kind, server_round, replies):
        if kind == MASKED_INPUT:
            for reply in replies:
                if pid(reply) == BAD:
                    words = reply.content[MASKED]["masked-input"].numpy().copy()
                    words[0] += 1
                    reply.content[MASKED]["masked-input"] = Array(words)
        return replies

    def masked_dropout(partition, msg):
        return partition == BAD and msg.metadata.message_type == MASKED_INPUT

    good, _ = secure_run()
    record, glob = secure_run(attack=tamper_masked)
    _, dropped = secure_run(fail=masked_dropout)

    assert good["rejected"] == {} and good["num_accepted"] == 3
    assert record["rejected"] == {"TAMPERED": 1}
    assert record["secagg_dropped"]["masked-input"] == 1 and record["clients"] == [0, 1]
    assert_equal(glob, dropped)  # the same sum as when BAD's input never arrived


def test_under_secure_aggregation_the_unmask_response_is_signed_and_checked():
    # Prepare: BAD's stage-3 shares are altered in transit (after signing)
    def tamper_shares(grid, kind, server_round, replies):
        if kind == UNMASK:
            for reply in replies:
                if pid(reply) == BAD:
                    record = reply.content[SECAGG]
                    shares = list(record["self-mask-shares"])
                    shares[0] = shares[0][:-1] + bytes([shares[0][-1] ^ 1])
                    record["self-mask-shares"] = shares
        return replies

    # Execute
    good, good_glob = secure_run()
    record, glob = secure_run(attack=tamper_shares)

    # Assert: refused before use; BAD's input (stage 2) stays, its secrets come from the others
    assert record["rejected"] == {"TAMPERED": 1}
    assert record["secagg_dropped"]["unmask"] == 1 and record["num_accepted"] == 3
    assert good["num_accepted"] == 3
    assert_equal(glob, good_glob)


class KeySwapGrid(AttackGrid):
    """An active server: the key directory it sends to node ``victim`` lists keys the server
    made for one of the victim's peers (the key-substitution attack)."""

    victim = 1000 + 7 * 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            if (msg.metadata.message_type == SHARE_KEYS
                    and msg.metadata.dst_node_id == self.victim):
                record = msg.content[SECAGG]
                peer = next(i for i, n in enumerate(record["node-ids"]) if n != self.victim)
                masks = list(record["mask-keys"])
                masks[peer] = public_bytes(generate_private_key())
                record["mask-keys"] = masks
        return super().send_and_receive(messages, timeout=timeout)


def test_under_secure_aggregation_a_swapped_neighbour_key_is_refused_by_the_node():
    # Prepare: an active server swaps a peer's X25519 key, which it cannot sign
    flat = signed(secure_aggregation=True)
    cfg = config.from_flat(flat)
    grid = KeySwapGrid(client_app, [{"partition-id": i, "num-partitions": NODES}
                                    for i in range(NODES)], flat, run_id=RUN)
    server_model = ServerModel(cfg, cfg.fl.max_rank)
    records: list[dict] = []
    strategy = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                             records.append, run_id=RUN)

    # Execute
    strategy.run(grid)

    # Assert: the victim left before sharing a secret; the others aggregated without it
    record = records[1]
    assert record["rejected"] == {"CLIENT_ERROR": 1}
    assert "TAMPERED" in record["errors"][0] or "BAD_SIGNATURE" in record["errors"][0]
    assert record["clients"] == [1, 2] and record["secagg_dropped"]["share-keys"] == 1


def test_under_secure_aggregation_unsigned_round_keys_are_rejected_at_stage_zero():
    def strip(grid, kind, server_round, replies):
        if kind == "train":
            for reply in replies:
                if pid(reply) == BAD:
                    del reply.content[SECAGG]["keys-signature"]
        return replies

    record, _ = secure_run(attack=strip)
    assert record["rejected"] == {"MALFORMED": 1}
    assert record["secagg_dropped"]["advertise-keys"] == 1 and record["clients"] == [0, 1]
