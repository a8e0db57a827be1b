"""Domain exceptions of the aggregation package.

Both subclass :class:`ValueError`, so callers that only care about "bad input"
can catch one type, while servers can tell a single bad client
(:class:`UpdateRejected`, carry on without it) from a configuration mistake
(:class:`UnknownStrategyError`, stop at start-up).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

RejectReason = Literal[
    "SHAPE_MISMATCH",
    "RANK_TOO_LARGE",
    "RANK_MISMATCH",
    "MISSING_MODULES",
    "EXTRA_MODULES",
    "NON_FINITE",
    "BAD_EXAMPLE_COUNT",
    "BAD_DTYPE",
    "BAD_SCALE",
    "FROZEN_FACTOR_MISMATCH",
]


class UpdateRejected(ValueError):
    """One client's update cannot be aggregated.

    Parameters
    ----------
    reason
        Machine-readable code, e.g. ``"SHAPE_MISMATCH"``; servers log it and
        drop the client for this round instead of aborting the run.
    message
        Human-readable text: what was expected, what arrived, what to change.
    client_id
        The offending client, when the update carried one.
    module
        The offending LoRA module, when the problem is local to one module.
    """

    def __init__(
        self,
        reason: RejectReason,
        message: str,
        *,
        client_id: str | None = None,
        module: str | None = None,
    ) -> None:
        prefix = f"client {client_id!r}: " if client_id is not None else ""
        super().__init__(f"[{reason}] {prefix}{message}")
        self.reason: RejectReason = reason
        self.client_id = client_id
        self.module = module


class UnknownStrategyError(ValueError):
    """An aggregation rule name that is not registered.

    Parameters
    ----------
    name
        The name that was asked for.
    available
        The registered names, listed in the message.
    """

    def __init__(self, name: str, available: Iterable[str]) -> None:
        self.name = name
        self.available = tuple(sorted(available))
        super().__init__(
            f"unknown aggregation strategy {name!r}; choose one of: {', '.join(self.available)}"
        )
