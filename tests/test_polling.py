"""PromptGrid: Flower's send_and_receive contract, with a poll interval that grows with the wait."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server import polling
from server.polling import PromptGrid, next_wait


def reply_to(message_id: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id))


class ScriptedGrid:
    """Replies to message ``i`` become available at pull number ``ready_at[i]`` (never: None)."""

    def __init__(self, ready_at: list[int | None]) -> None:
        self.ready_at = ready_at
        self.pulls = 0
        self.pulled_ids: list[set[str]] = []

    def get_node_ids(self) -> list[int]:
        return [7, 8]

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        self.pulled_ids.append(set(message_ids))
        return [reply_to(f"m{i}") for i, at in enumerate(self.ready_at)
                if at == self.pulls and f"m{i}" in message_ids]


@pytest.mark.parametrize(("waited", "remaining", "expected"), [
    (0.0, 10.0, 0.005),      # at least 5 ms
    (0.049, 10.0, 0.005),
    (0.2, 10.0, 0.02),       # 10 % of the wait so far
    (4.9, 10.0, 0.49),
    (5.1, 10.0, 0.5),        # at most 0.5 s
    (600.0, 10.0, 0.5),
    (600.0, 0.01, 0.01),     # never past the timeout
    (1.0, 0.0, 0.0),
])
def test_next_wait(waited, remaining, expected):
    assert next_wait(waited, remaining) == pytest.approx(expected)


def test_returns_every_reply_as_it_arrives_and_pulls_only_the_pending(monkeypatch):
    # Prepare
    sleeps: list[float] = []
    monkeypatch.setattr(polling.time, "sleep", sleeps.append)
    grid = ScriptedGrid(ready_at=[3, 1, 2])

    # Execute
    replies = PromptGrid(grid).send_and_receive(["a", "b", "c"], timeout=60)

    # Assert
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1", "m2", "m0"]
    assert grid.pulled_ids == [{"m0", "m1", "m2"}, {"m0", "m2"}, {"m0"}]
    assert len(sleeps) == 2 and all(0.005 <= s <= 0.5 for s in sleeps)


def test_stops_at_the_timeout_with_the_replies_so_far():
    grid = ScriptedGrid(ready_at=[1, None])

    replies = PromptGrid(grid).send_and_receive(["a", "b"], timeout=0.05)

    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert grid.pulls >= 2


def test_everything_else_is_the_wrapped_grids():
    assert PromptGrid(ScriptedGrid([])).get_node_ids() == [7, 8]
