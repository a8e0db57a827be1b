"""A Flower ``Grid`` that delivers messages to a ClientApp in this process.

For tests and debugging: the real :class:`~server.strategy.FederatedLora` and the real ClientApp
handlers exchange real ``Message`` objects (records, metadata, error replies, persistent
per-node ``Context.state``) without a SuperLink, Ray or subprocesses. Simulation and deployment
still go through Flower's engines (``fedlora run``, ``flwr run``).
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

SUPERLINK_NODE_ID = 1


class InProcessGrid:
    """Delivers each message to ``client_app`` with the destination node's own ``Context``.

    Parameters
    ----------
    client_app
        The ClientApp to call.
    node_configs
        One node config per node (``partition-id``, ``num-partitions``, optional ``lora-rank``).
    run_config
        The flat run config every node sees.
    on_reply
        Called with every reply (e.g. to inspect what clients send).
    fail
        ``(node_partition, message) -> bool``: make that node answer with an error instead.
    """

    def __init__(self, client_app: ClientApp, node_configs: Iterable[Mapping[str, Any]],
                 run_config: Mapping[str, Any], run_id: int = 1,
                 on_reply: Callable[[Message], None] | None = None,
                 fail: Callable[[int, Message], bool] | None = None) -> None:
        self.client_app = client_app
        self.run_id = run_id
        self.on_reply = on_reply
        self.fail = fail
        # what Flower's ServerApp runtime sets before `main`, so that `Message(...)` works here
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.contexts: dict[int, Context] = {}
        for i, node_config in enumerate(node_configs):
            node_id = 1000 + 7 * i  # Flower node ids are arbitrary; never equal to partitions
            self.contexts[node_id] = Context(run_id=run_id, node_id=node_id,
                                             node_config=dict(node_config), state=RecordDict(),
                                             run_config=dict(run_config))
        self.delivered: list[Message] = []
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        """The ids of the in-process nodes (as a SuperLink's connected nodes)."""
        return list(self.contexts)

    def _deliver(self, msg: Message) -> Message:
        context = self.contexts[msg.metadata.dst_node_id]
        partition = int(context.node_config["partition-id"])
        if self.fail is not None and self.fail(partition, msg):
            return Message(Error(code=0, reason="injected failure"), reply_to=msg)
        try:
            reply = self.client_app(msg, context)
        except Exception as exc:  # Flower turns a raising handler into an error reply too
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            return Message(Error(code=0, reason=reason), reply_to=msg)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message now; its reply waits for :meth:`pull_messages`."""
        ids = []
        for msg in messages:
            meta = msg.metadata.__dict__
            meta["_message_id"] = str(uuid.uuid4())
            meta["_src_node_id"] = SUPERLINK_NODE_ID
            meta["_run_id"] = self.run_id
            self.delivered.append(msg)
            reply = self._deliver(msg)
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            if self.on_reply is not None:
                self.on_reply(reply)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to ``message_ids`` not pulled yet, in the order they were sent."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        """Deliver ``messages`` and return their replies (``timeout`` is not needed here)."""
        return self.pull_messages(self.push_messages(messages))
