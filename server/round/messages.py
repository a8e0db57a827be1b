"""Stage "build messages": one message per node, with the adapter of its rank and its own
config copy (and the base corrections it lacks)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedlora.config import RunConfig
from fedlora.federation.global_adapter import GlobalAdapter
from fedlora.federation.transport import nbytes, pack, pack_correction, unpack
from server.nodes import NodeInfo
from server.round.plan import RoundPlan

# the adapter of each rank, encoded once per exchange: (record, what the node decodes from it)
Encoded = dict[int, tuple[ArrayRecord, dict[str, np.ndarray]]]


@dataclass
class Outgoing:
    """A round's train messages, the arrays each node received (by node id), and their size."""

    start_version: int
    messages: list[Message] = field(default_factory=list)
    sent: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    bytes_down: int = 0


def message_for(cfg: RunConfig, glob: GlobalAdapter, node: NodeInfo, server_round: int,
                plan: RoundPlan, message_type: str, encoded: Encoded,
                base_version: Mapping[int, int]) -> tuple[Message, dict[str, np.ndarray]]:
    """The message for ``node`` and the arrays it receives (after ``wire-dtype`` rounding:
    what it trains from, and what frozen factors of its reply are filled in with).

    ``encoded`` holds the adapter of each rank once encoded; nodes of one rank share it.
    ``base_version`` is the base correction each partition is known to hold.
    """
    if node.rank not in encoded:
        arrays = glob.arrays_for(node.rank)
        record = pack(arrays, cfg.fl.wire_dtype)
        encoded[node.rank] = (record, arrays if cfg.fl.wire_dtype == "float32"
                              else unpack(record))
    record, arrays = encoded[node.rank]
    content = RecordDict({"arrays": record})
    config = ConfigRecord({"server-round": server_round, "trainable": plan.trainable,
                           "send": plan.send, "personal": plan.personal})
    if cfg.fl.hetlora_prune:  # the rank this node trains at (it may have pruned)
        config["lora-rank"] = node.rank
    have = base_version.get(node.partition_id, 0)
    if have < glob.version:
        content["correction"] = pack_correction(glob.correction_since(have, node.rank))
        config["base-from"], config["base-to"] = have, glob.version
    content["config"] = config  # one copy per node: nodes get different arrays and configs
    return (Message(content, dst_node_id=node.node_id, message_type=message_type,
                    group_id=str(server_round)), arrays)


def messages_for(cfg: RunConfig, glob: GlobalAdapter, nodes: Iterable[NodeInfo],
                 server_round: int, plan: RoundPlan, message_type: str,
                 base_version: Mapping[int, int]) -> list[Message]:
    """One ``message_type`` message per node (evaluate, personal export)."""
    encoded: Encoded = {}
    return [message_for(cfg, glob, n, server_round, plan, message_type, encoded,
                        base_version)[0] for n in nodes]


def build_messages(cfg: RunConfig, glob: GlobalAdapter, sampled: list[NodeInfo],
                   server_round: int, plan: RoundPlan, base_version: Mapping[int, int]
                   ) -> Outgoing:
    """One train message per sampled node, what each got, and the bytes sent down."""
    out = Outgoing(start_version=glob.version)
    encoded: Encoded = {}
    for node in sampled:
        msg, arrays = message_for(cfg, glob, node, server_round, plan, MessageType.TRAIN,
                                  encoded, base_version)
        out.messages.append(msg)
        out.sent[node.node_id] = arrays
    out.bytes_down = sum(nbytes(m.content["arrays"]) + (
        nbytes(m.content["correction"]) if "correction" in m.content else 0)
        for m in out.messages)
    return out
