"""Domain exceptions of the secure-aggregation package.

Three kinds, so a caller can react to each the right way:

* :class:`SecAggAborted` — too few clients are left at some stage to finish
  the round safely. No sum exists; the server keeps the previous global model.
* :class:`ProtocolError` — a message breaks the protocol (wrong round, wrong
  stage, a request to reveal both secrets of one peer, …). Honest clients
  raise it and stop taking part in the round (fail closed).
* :class:`ShareAuthenticationError` / :class:`ShamirError` — a ciphertext or a
  set of secret shares is corrupt.

Every exception carries a machine-readable ``reason`` code and a message that
says what was expected, what arrived and what to do.
"""

from __future__ import annotations

from fedlora.errors import FedLoraError


class SecAggError(FedLoraError):
    """Base class of the secure-aggregation errors.

    Parameters
    ----------
    reason
        Machine-readable code such as ``"DOUBLE_REVEAL"``.
    message
        Human-readable text: what was expected, what arrived, what to change.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"[{reason}] {message}")
        self.reason = reason


class ProtocolError(SecAggError, ValueError):
    """A message or call that the protocol forbids at this point."""


class ShareAuthenticationError(SecAggError, ValueError):
    """An encrypted share failed authentication (tampered, or bound to other ids/round)."""

    def __init__(self, message: str) -> None:
        super().__init__("BAD_CIPHERTEXT", message)


class ShamirError(SecAggError, ValueError):
    """Secret shares that cannot (or must not) be combined."""


class SecAggAborted(SecAggError, RuntimeError):
    """The round cannot finish; no sum exists and none will be produced.

    Parameters
    ----------
    stage
        Label of the stage at which the round stopped, e.g. ``"masked-input"``.
    server_round
        The federated round.
    message
        What was missing or wrong.
    reason
        ``"BELOW_THRESHOLD"`` (too few clients left, the usual case) or
        ``"CORRUPT_SHARES"`` (shares that do not reconstruct a valid secret), or the
        caller's own code.
    hint
        What to change; by default the one that fits ``reason``.
    """

    def __init__(
        self, stage: str, server_round: int, message: str, reason: str = "BELOW_THRESHOLD",
        hint: str | None = None,
    ) -> None:
        hint = hint or (
            "sample more clients, raise `neighbours` or lower `threshold` to tolerate more dropouts"
            if reason == "BELOW_THRESHOLD"
            else "find the client(s) that sent bad shares before the next round"
        )
        super().__init__(
            reason,
            f"secure aggregation of round {server_round} aborted at stage {stage!r}: {message}; "
            f"no sum was produced, keep the previous global model ({hint})",
        )
        self.stage = stage
        self.server_round = server_round
