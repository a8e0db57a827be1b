"""Domain exceptions."""

from __future__ import annotations

from fedlora.aggregation import UnknownStrategyError, UpdateRejected


def test_update_rejected_carries_reason_client_and_module() -> None:
    error = UpdateRejected("NON_FINITE", "bad", client_id="c1", module="q")

    assert isinstance(error, ValueError)
    assert (error.reason, error.client_id, error.module) == ("NON_FINITE", "c1", "q")
    assert str(error) == "[NON_FINITE] client 'c1': bad"


def test_unknown_strategy_error_lists_sorted_names() -> None:
    error = UnknownStrategyError("x", ["b", "a"])

    assert error.available == ("a", "b")
    assert "choose one of: a, b" in str(error)
