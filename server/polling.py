"""A Flower ``Grid`` that notices replies promptly.

Flower's grids wait a fixed interval between two pulls of the replies of ``send_and_receive``:
0.1 s in simulation (``InMemoryGrid.pull_interval``), 3 s in deployment (``HttpGrid``). A
reply that arrives just after a pull waits that long, every exchange: up to 0.1 s per round of
the default job in simulation, up to 3 s per exchange in deployment (a secure round has four).
:class:`PromptGrid` sends and pulls through the same grid with Flower's public
``push_messages`` / ``pull_messages``, waiting 10 % of the time waited so far between two pulls
(at least 5 ms, at most 0.5 s): a reply is noticed at most ~10 % (or 5 ms) after it is ready,
and a long round costs at most two pulls a second.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

MIN_WAIT_S = 0.005
MAX_WAIT_S = 0.5
WAIT_FRACTION = 0.1


def next_wait(waited: float, remaining: float) -> float:
    """Seconds to sleep before the next pull, after ``waited`` seconds, ``remaining`` left."""
    return max(0.0, min(max(MIN_WAIT_S, WAIT_FRACTION * waited), MAX_WAIT_S, remaining))


class PromptGrid:
    """Wraps a Flower ``Grid``; only ``send_and_receive`` differs (every other attribute is the
    wrapped grid's)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        """Push ``messages``; return the replies that arrive within ``timeout`` seconds (no
        limit for ``None``), as Flower's ``send_and_receive`` does."""
        pending = set(self.grid.push_messages(messages))
        replies: list[Message] = []
        started = time.monotonic()
        while True:
            fresh = list(self.grid.pull_messages(pending))
            replies.extend(fresh)
            pending.difference_update(m.metadata.reply_to_message_id for m in fresh)
            waited = time.monotonic() - started
            remaining = float("inf") if timeout is None else timeout - waited
            if not pending or remaining <= 0:
                return replies
            time.sleep(next_wait(waited, remaining))
