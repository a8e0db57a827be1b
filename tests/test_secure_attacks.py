"""Secure rounds of the real strategy under one malicious client, without training.

Each node runs the real client side of the protocol (:mod:`fedlora.privacy.secure_client`, its state
in a real ``Context``) but, instead of training, uploads ``received + δ_p`` with a δ of its
own, so the honest aggregate is known exactly here. 6 of 8 nodes are sampled
(``fraction-train = 0.75``), one honest node drops at stage 3, and node ``EVIL`` attacks.
The round must end with the example-weighted mean of the contributors' uploads (attacker left
out where it is named) within the codec bound, or be abandoned with a reason code in the
metrics line — never with any other global adapter.
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from flwr.app import Array, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora import config
from fedlora.aggregation import LoraFactors
from fedlora.federation.global_adapter import GlobalAdapter
from fedlora.federation.transport import unpack
from fedlora.privacy import secure_client
from fedlora.privacy.secagg import FixedPointCodec
from fedlora.privacy.secagg.keys import generate_private_key, public_bytes
from fedlora.privacy.secagg.shamir import PRIME, SHARE_BYTES
from fedlora.privacy.secure_wire import (
    MASKED,
    MASKED_INPUT,
    SECAGG,
    SHARE_KEYS,
    UNMASK,
    secagg_config,
)
from server.strategy import FederatedLora, NodeInfo
from tests.fl_harness import tiny_config

MODULE = "base.layer0.q"
NODES = [NodeInfo(node_id=100 + 7 * p, partition_id=p, rank=8) for p in range(8)]
FLAT = tiny_config(**{"secure-aggregation": True, "min-accepted": 1, "fraction-train": 0.75,
                      "secagg-clip-range": 1.0, "secagg-max-weight": 100})
CFG = config.from_flat(FLAT)
SETTINGS = secagg_config(CFG)


def delta(node: int) -> float:
    return 0.001 * (node % 13 + 1)


def examples(node: int) -> int:
    return 10 + node % 17


class AttackGrid:
    """Delivers each message to the node's real protocol code; ``attack`` edits replies."""

    def __init__(self, attack, evil: int, dropout: int) -> None:
        self.attack, self.evil, self.dropout = attack, evil, dropout
        self.contexts: dict[int, Context] = {}
        self.uploads: dict[int, dict[str, np.ndarray]] = {}
        TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for i, msg in enumerate(messages):
            meta = msg.metadata.__dict__
            meta["_message_id"], meta["_src_node_id"] = f"{msg.metadata.message_type}{i}", 1
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            if kind == UNMASK and node == self.dropout:
                continue  # no reply at all
            context = self.contexts.setdefault(node, Context(
                run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config=FLAT))
            if node == self.evil and hasattr(self.attack, "before"):
                self.attack.before(kind, msg.content, self)
            try:
                content = self._handle(kind, msg, node, context)
            except Exception as exc:  # Flower turns a raising handler into an error reply
                replies.append(Message(Error(code=0, reason=str(exc)), reply_to=msg))
                replies[-1].metadata.__dict__["_src_node_id"] = node
                continue
            if node == self.evil and self.attack is not None:
                content = self.attack(kind, content, self)
            reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies

    def _handle(self, kind: str, msg: Message, node: int, context: Context) -> RecordDict:
        if kind == "train":
            server_round = int(msg.content["config"]["server-round"])
            upload = {k: v + delta(node) for k, v in unpack(msg.content["arrays"]).items()}
            self.uploads[node] = upload
            keys = secure_client.begin(context, SETTINGS, server_round, upload, examples(node))
            return RecordDict({SECAGG: keys, "metrics": MetricRecord({
                "server-round": server_round, "num-examples": examples(node),
                "train-loss": 0.5})})
        if kind == SHARE_KEYS:
            return secure_client.share_keys(context, SETTINGS, msg.content)
        if kind == MASKED_INPUT:
            return secure_client.mask_input(context, SETTINGS, msg.content)
        return secure_client.unmask(context, SETTINGS, msg.content)


def strategy() -> tuple[FederatedLora, GlobalAdapter]:
    rng = np.random.default_rng(0)
    glob = GlobalAdapter({MODULE: LoraFactors(a=rng.normal(0, 0.1, (8, 16)).astype(np.float32),
                                              b=np.zeros((16, 8), np.float32), scale=2.0)},
                         {}, lora_alpha=16.0, rslora=False)
    return FederatedLora(CFG, glob, lambda _: None, lambda _: None), glob


def run_round(attack):
    """(metrics line, global arrays, grid, the sampled nodes)."""
    s, glob = strategy()
    sampled = sorted(n.node_id for n in s.sample(NODES, 1))
    evil, dropout = sampled[1], sampled[4]
    grid = AttackGrid(attack, evil, dropout)
    before = {k: v.copy() for k, v in glob.arrays_for(8).items()}
    record = s.train_round(grid, NODES, 1)
    return record, before, glob.arrays_for(8), grid, sampled


def expected_mean(grid: AttackGrid, contributors: list[int]) -> dict[str, np.ndarray]:
    total = sum(examples(n) for n in contributors)
    return {k: sum(examples(n) * grid.uploads[n][k].astype(np.float64) for n in contributors)
            / total for k in grid.uploads[contributors[0]]}


def assert_is_the_mean_of(got, grid: AttackGrid, contributors: list[int]) -> None:
    want = expected_mean(grid, contributors)
    codec = FixedPointCodec(CFG.fl.secagg_clip_range, CFG.fl.secagg_max_weight, 6)
    m, total = len(contributors), sum(examples(n) for n in contributors)
    atol = (codec.error_bound(m) + codec.weight_error_bound(m)) / total + 1e-6
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=atol, err_msg=key)


def forged_shares(kind, content, grid):
    if kind == SHARE_KEYS:
        record = content[SECAGG]
        record["ciphertexts"] = [secrets.token_bytes(len(c)) for c in record["ciphertexts"]]
    return content


def low_order_key(kind, content, grid):
    if kind == "train":
        content[SECAGG]["encryption-key"] = bytes(32)
    return content


def shifted_share(kind, content, grid):
    """Shift the attacker's share of the lowest-id victim it holds by 1/λ (seed → seed + 1
    when the server interpolates the t lowest holders)."""
    if kind == UNMASK:
        record = content[SECAGG]
        owners, shares = list(record["self-mask-owners"]), list(record["self-mask-shares"])
        j = next(i for i, o in enumerate(owners) if o != grid.evil)
        shift = secrets.randbelow(PRIME - 1) + 1  # unknown λ here: any shift corrupts
        shares[j] = ((int.from_bytes(shares[j], "big") + shift) % PRIME).to_bytes(
            SHARE_BYTES, "big")
        record["self-mask-shares"] = shares
    return content


def bad_weight_word(kind, content, grid):
    if kind == MASKED_INPUT:
        words = content[MASKED]["masked-input"].numpy().copy()
        words[-1] += np.uint32(1 << 24)
        content[MASKED]["masked-input"] = Array(words)
    return content


def swapped_mask_key(kind, content, grid):
    """The attacker advertises a key it does not hold (its masks will not cancel) and hides
    the swap from its own protocol code."""
    if kind == "train":
        grid.real_key = content[SECAGG]["mask-key"]
        content[SECAGG]["mask-key"] = grid.fake_key = public_bytes(generate_private_key())
    return content


def _restore_own_key(kind, content, grid):
    if kind == SHARE_KEYS:
        record = content[SECAGG]
        record["mask-keys"] = [grid.real_key if key == grid.fake_key else key
                               for key in record["mask-keys"]]


swapped_mask_key.before = _restore_own_key


def test_the_honest_round_is_the_weighted_mean_of_the_uploads():
    record, _, got, grid, sampled = run_round(None)
    dropout = sampled[4]
    assert record["num_sampled"] == 6 and record["num_accepted"] == 6
    assert record["secagg_dropped"]["unmask"] == 1 and dropout in grid.uploads
    assert_is_the_mean_of(got, grid, sampled)


@pytest.mark.parametrize(("attack", "rejected"), [
    (low_order_key, "BAD_PUBLIC_KEY"),
    (forged_shares, "UNRECOVERABLE_SHARES"),
])
def test_an_attacker_named_early_is_left_out_and_the_others_aggregated(attack, rejected):
    record, _, got, grid, sampled = run_round(attack)
    evil = sampled[1]
    assert record.get("abandoned") is None
    assert record["rejected"].get(rejected) == 1
    assert record["num_accepted"] == 5
    assert_is_the_mean_of(got, grid, [n for n in sampled if n != evil])


def test_a_shifted_share_is_caught_its_holder_named_and_the_sum_right():
    # n = 6 gives k = 4, t = 3: even with the dropout, every seed has a surplus share
    record, _, got, grid, sampled = run_round(shifted_share)
    assert record.get("abandoned") is None
    # the attacker's own input is legitimately in the sum; its altered share is not used
    assert record["rejected"].get("BAD_SHARE") == 1
    assert_is_the_mean_of(got, grid, sampled)


@pytest.mark.parametrize(("attack", "reason"), [
    (bad_weight_word, "SECAGG_WEIGHT_MISMATCH"),
    # its stage-1 commitment binds the keys it really holds, not the advertised one
    (swapped_mask_key, "SECAGG_CORRUPT_SHARES"),
])
def test_a_bad_sum_is_never_adopted_and_the_reason_is_logged(attack, reason):
    record, before, got, _, _ = run_round(attack)
    assert record["abandoned"] and record["abandon_reason"] == reason
    for key, value in before.items():
        assert np.array_equal(got[key], value), key
