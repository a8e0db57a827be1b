"""The per-reply boundary of a round (``server/round/replies.py``) with plain stage callables:
what each stage raises becomes a rejection with a reason code, and the other replies go on."""

from __future__ import annotations

import uuid

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.errors import PayloadError
from fedlora.privacy.secagg.signing import SignatureRejected
from server.nodes import NodeInfo
from server.round.messages import Outgoing
from server.round.replies import Accepted, ReplyStages, receive

NODES = [NodeInfo(node_id=100 + 7 * p, partition_id=p, rank=4) for p in range(6)]


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _outgoing() -> Outgoing:
    out = Outgoing(start_version=0)
    for node in NODES:
        msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=node.node_id, message_type="train")
        msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        out.messages.append(msg)
        out.sent[node.node_id] = {}
    return out


def _reply(out: Outgoing, partition: int, sender: int | None = None,
           error: bool = False) -> Message:
    msg = out.messages[partition]
    reply = (Message(Error(code=0, reason="Traceback ...\nValueError: out of memory"),
                     reply_to=msg) if error
             else Message(RecordDict({"config": ConfigRecord({"p": partition})}), reply_to=msg))
    reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id if sender is None \
        else sender
    return reply


def test_receive_rejects_what_a_stage_raises_with_its_reason_and_keeps_the_rest():
    # Prepare: partition 0 honest, 1 raises in decode (a bug-like TypeError), 2 fails its
    # signature, 3 a payload check, 4 is a client error, 5 never answers; plus a duplicate
    # of 0 and a reply from a node nobody asked
    out = _outgoing()
    answered: list[int] = []

    def verify(content, node_id):
        if node_id == NODES[2].node_id:
            raise SignatureRejected("REPLAYED", "seen before")

    def decode(reply, node, sent):
        if node.partition_id == 1:
            raise TypeError("'NoneType' object is not subscriptable")
        if node.partition_id == 3:
            raise PayloadError("KEY_MISMATCH", "missing the A factors")
        return Accepted(node, None, {}, {"p": reply.content["config"]["p"]}, None)

    stages = ReplyStages(answered=lambda node: answered.append(node.partition_id),
                         verify=verify, decode=decode)
    replies = [_reply(out, 3), _reply(out, 0), _reply(out, 1), _reply(out, 2),
               _reply(out, 4, error=True), _reply(out, 0), _reply(out, 0, sender=999)]

    # Execute
    received = receive(replies, out, NODES, stages, server_round=1)

    # Assert
    assert [item.node.partition_id for item in received.accepted] == [0]
    assert dict(received.rejected) == {"KEY_MISMATCH": 1, "MALFORMED": 1, "REPLAYED": 1,
                                       "CLIENT_ERROR": 1, "DUPLICATE_OR_UNKNOWN": 2,
                                       "NO_REPLY": 1}
    assert received.errors == ["ValueError: out of memory"]
    # every known sender that is no client error finished its round (holds its corrections)
    assert answered == [3, 0, 1, 2, 0]


def test_receive_sorts_the_accepted_updates_by_partition():
    out = _outgoing()
    stages = ReplyStages(answered=lambda node: None, verify=lambda content, node_id: None,
                         decode=lambda reply, node, sent: Accepted(node, None, {}, {}, None))

    received = receive([_reply(out, p) for p in (4, 1, 5, 0, 3, 2)], out, NODES, stages, 1)

    assert [item.node.partition_id for item in received.accepted] == list(range(6))
    assert sum(received.rejected.values()) == 0
