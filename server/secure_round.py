"""Server side of a secure training round: one strategy round as four message rounds.

Stage 0 is the round's usual ``train`` message (its config says ``secagg-stage = "train"``);
the nodes train, keep their factors and answer with public keys and their metrics. Stages 1–3
(``query.secagg_share_keys`` / ``secagg_masked_input`` / ``secagg_unmask``, see
:mod:`fedlora.privacy.secure_wire`) relay keys and encrypted shares, collect the masked inputs and
the
shares that unmask their sum. The server learns ``Σ_k n_k·clip(x_k)`` and ``Σ_k n_k`` over the
contributors — the example-weighted mean of the uploaded arrays, which is exactly what the
linear rules (fedit, ffa, fedsa, rolora) compute from individual replies.

Per reply: a node that fails, does not answer or sends something malformed, stale or
duplicated is dropped at that stage and counted in ``rejected`` by reason; the round goes on
while every needed secret can be rebuilt from ``t`` shares. Otherwise
:class:`~fedlora.privacy.secagg.SecAggAborted` ends it with no sum (the caller abandons the round).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedlora.config import RunConfig
from fedlora.errors import PayloadError
from fedlora.privacy import signed_wire
from fedlora.privacy.secagg import SecAggAborted, SecAggServer, flatten_arrays
from fedlora.privacy.secagg.signing import SignatureRejected, UpdateVerifier
from fedlora.privacy.secure_wire import (
    MASKED_INPUT,
    SECAGG,
    SHARE_KEYS,
    STAGE_KEY,
    UNMASK,
    check_secure_aggregation,
    directory_record,
    payload_bytes,
    read_advert,
    read_bundle,
    read_masked,
    read_unmask,
    relayed_record,
    secagg_config,
    unmask_request_record,
)
from server.nodes import NodeInfo

# SecAggServer's rejection codes, named like the plain round's where they mean the same
_REASONS = {"UNEXPECTED_SENDER": "DUPLICATE_OR_UNKNOWN", "DUPLICATE": "DUPLICATE_OR_UNKNOWN"}


@dataclass
class SecureOutcome:
    """What a secure round produced, for the strategy's metrics line.

    Parameters
    ----------
    trained
        Nodes that answered the stage-0 train message (they hold every base correction sent).
    contributors
        ``(node, stage-0 metrics)`` of the nodes whose input is in the sum, by partition.
    mean
        Example-weighted mean of the uploaded arrays by name (float32); ``None`` if aborted.
    error_bound
        Largest fixed-point error of a coordinate of ``mean`` (codec bound / total weight).
    dropped
        Nodes lost at each stage, by stage label (``advertise-keys`` includes failed training).
    aborted
        The :class:`~fedlora.privacy.secagg.SecAggAborted` message, or ``""``.
    abort_reason
        Its reason code (``BELOW_THRESHOLD``, ``CORRUPT_SHARES``, ``OUT_OF_RANGE``,
        ``WEIGHT_MISMATCH``, ``DP_TOO_FEW``), or ``""``.
    """

    trained: list[NodeInfo] = field(default_factory=list)
    contributors: list[tuple[NodeInfo, dict[str, Any]]] = field(default_factory=list)
    mean: dict[str, np.ndarray] | None = None
    error_bound: float = 0.0
    rejected: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    aborted: str = ""
    abort_reason: str = ""


@dataclass(frozen=True)
class ReplyChecks:
    """How :meth:`SecureRound.run` checks the replies of one round.

    Parameters
    ----------
    check_metrics
        Validates a stage-0 reply's metrics (round, example count, loss) and returns its
        example count, or raises :class:`~fedlora.errors.PayloadError`.
    check_signature
        ``(content, sender)``: verifies a masked input's signature before it is decoded
        (``sign-updates``), or raises
        :class:`~fedlora.privacy.secagg.signing.SignatureRejected`.
    signing_keys
        ``node → Ed25519 public key`` with ``sign-updates``: each node's stage-0 X25519
        keys must carry its signature (:func:`fedlora.privacy.signed_wire.sign_keys`), which
        the key directory forwards so that every node can check its neighbours'; a node
        without one is rejected at stage 0. The stage-3 unmask responses are verified
        with these keys too. ``None``: nothing of the sort is signed.
    run_id
        The run the key signatures are bound to.
    """

    check_metrics: Callable[[dict[str, Any]], int]
    check_signature: Callable[[RecordDict, int], None] | None = None
    signing_keys: Mapping[int, bytes] | None = None
    run_id: int = 0


@dataclass
class _Session:
    """One secure round in progress: where it sends, its SecAggServer, its outcome so far
    and how many of the server's rejections are counted in it."""

    grid: Grid
    server: SecAggServer
    server_round: int
    out: SecureOutcome
    counted: int = 0

    def count(self) -> None:
        """Count (and log) the server's rejections since the last call."""
        for rejection in self.server.rejections[self.counted:]:
            self.out.rejected[_REASONS.get(rejection.reason, rejection.reason)] += 1
            log(WARNING, "Secure round, %s: rejected node %s: %s (%s)", rejection.stage.label,
                rejection.node, rejection.reason, rejection.detail)
        self.counted = len(self.server.rejections)


class SecureRound:
    """Runs the message rounds of secure aggregation for :class:`server.strategy.FederatedLora`.

    Raises
    ------
    ConfigError
        At construction, for a strategy that cannot aggregate securely (before any round).
    """

    def __init__(self, cfg: RunConfig) -> None:
        check_secure_aggregation(cfg)
        self.settings = secagg_config(cfg)
        self.timeout = cfg.fl.round_timeout
        # with DP every update is encoded with weight 1; num-examples is then only reported
        self.max_weight = cfg.fl.secagg_max_weight if cfg.fl.dp_mode == "off" else float("inf")
        self._assessed: set[int] = set()  # group sizes whose k, t and bounds were logged
        self._unmask_verifier: UpdateVerifier | None = None  # sign-updates: stage-3 replies

    def run(self, grid: Grid, server_round: int, sampled: list[NodeInfo],
            messages: list[Message], template: Mapping[str, np.ndarray], checks: ReplyChecks,
            min_contributors: int = 0) -> SecureOutcome:
        """Stage 0 (``messages``, the round's train messages) and stages 1–3.

        Parameters
        ----------
        template
            The arrays one node would send back in a plain round (names and shapes); every
            sampled node has the same rank, so the same layout.
        checks
            How each stage-0 reply, masked input and unmask response is checked.
        min_contributors
            Abort before unmasking when fewer masked inputs arrived (``dp-mode =
            'distributed'``: a smaller sum would carry less noise than promised, and one
            below ``min-accepted`` would be seen and then discarded).
        """
        out = SecureOutcome()
        by_id = {n.node_id: n for n in sampled}
        _, layout = flatten_arrays(template)
        session = _Session(grid, SecAggServer(self.settings, server_round, list(by_id),
                                              layout.size), server_round, out)
        if checks.signing_keys is not None and self._unmask_verifier is None:
            # its own verifier: one accepted stage-3 reply per node and round, apart from
            # the stage-2 one the strategy's verifier accepts
            self._unmask_verifier = UpdateVerifier(str(checks.run_id), checks.signing_keys)
        for msg in messages:
            msg.content["config"][STAGE_KEY] = "train"
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        started = time.perf_counter()
        adverts, metrics, vouched = self._train_replies(session, messages, replies, by_id,
                                                        checks)
        try:
            total = self._sum(session, adverts, metrics, vouched, layout.size, checks,
                              min_contributors)
        except SecAggAborted as exc:
            session.count()
            out.aborted, out.abort_reason = str(exc), exc.reason
            log(WARNING, "Round %d: %s", server_round, exc)
        else:
            mean = total.mean()  # finite, |mean_i| ≤ clip range: SecAggServer checked both
            out.mean = layout.unflatten(mean)
            out.error_bound = total.error_bound / total.total_weight
            out.contributors = sorted(((by_id[n], metrics[n]) for n in total.contributors),
                                      key=lambda item: item[0].partition_id)
        return self._finish(out, session.server, server_round, started)

    def _train_replies(self, session: _Session, messages: list[Message],
                       replies: list[Message], by_id: Mapping[int, NodeInfo],
                       checks: ReplyChecks) -> tuple[list[Any], dict[int, Any], dict[int, Any]]:
        """Stage 0's answers: the key adverts, each node's metrics and, with signing keys,
        what vouches for its round keys; a bad answer drops its node (counted by reason)."""
        out, server_round = session.out, session.server_round
        adverts, metrics, vouched = [], {}, {}
        for reply in self._answers(messages, replies, by_id, out):
            src = reply.metadata.src_node_id
            out.trained.append(by_id[src])
            try:
                metrics[src] = self._check_stage0(reply.content, checks.check_metrics)
                advert = read_advert(reply.content, src)
                if checks.signing_keys is not None:
                    vouched[src] = self._check_key_signature(
                        reply.content, advert, checks.signing_keys, checks.run_id,
                        server_round)
                adverts.append(advert)
            except (PayloadError, SignatureRejected) as exc:
                self._reject(out, server_round, src, exc)
        return adverts, metrics, vouched

    def _sum(self, session: _Session, adverts: list[Any], metrics: Mapping[int, Any],
             vouched: Mapping[int, Any], size: int, checks: ReplyChecks,
             min_contributors: int) -> Any:
        """Stages 1–3 after the key adverts: share keys, masked inputs, unmasking; the
        unmasked sum. Raises :class:`~fedlora.privacy.secagg.SecAggAborted`."""
        server, server_round, out = session.server, session.server_round, session.out
        directory = server.collect_keys(adverts)
        session.count()
        if (n := len(directory.public_keys)) not in self._assessed:
            self._assessed.add(n)
            log(INFO, "Round %d: %s", server_round, self.settings.assess(n).describe())
        bundles = self._exchange(session.grid, server_round, SHARE_KEYS, {
            node: directory_record(directory, vouched if checks.signing_keys is not None
                                   else None)
            for node in directory.public_keys
        }, read_bundle, out)
        relays = server.collect_shares(bundles)
        session.count()

        def masked_input(content: RecordDict, src: int) -> Any:
            if checks.check_signature is not None:  # before a byte of the input is decoded
                checks.check_signature(content, src)
            return read_masked(content, src, size)

        inputs = self._exchange(session.grid, server_round, MASKED_INPUT, {
            node: relayed_record(relayed) for node, relayed in relays.items()
        }, masked_input, out)
        requests = server.collect_masked_inputs(inputs)
        session.count()
        if len(requests) < min_contributors:  # no share asked for: the sum stays masked
            raise SecAggAborted(
                "masked-input", server_round,
                f"{len(requests)} masked input(s) arrived, {min_contributors} needed "
                f"(dp-min-contributors, min-accepted): with fewer the sum would carry "
                f"less noise than dp-mode = 'distributed' promises, or be discarded after "
                f"it was seen, so it is not unmasked", reason="DP_TOO_FEW",
                hint="lower dp-min-contributors (each client then adds more noise) or "
                     "min-accepted to tolerate more dropouts")
        return self._unmask(session, requests, metrics)

    def _unmask(self, session: _Session, requests: Mapping[int, Any],
                metrics: Mapping[int, Any]) -> Any:
        """Stage 3: the shares that unmask the sum of the masked inputs of ``requests``."""
        server_round = session.server_round

        def unmask_response(content: RecordDict, src: int) -> Any:
            if self._unmask_verifier is not None:  # shares altered in transit are refused
                signed_wire.verify_reply(self._unmask_verifier, content, src, server_round)
            return read_unmask(content, src)

        responses = self._exchange(session.grid, server_round, UNMASK, {
            node: unmask_request_record(request) for node, request in requests.items()
        }, unmask_response, session.out)
        weights = {node: float(1 if self.max_weight == float("inf") else
                               int(metrics[node]["num-examples"]))
                   for node in requests}
        total = session.server.collect_unmask_responses(responses, declared_weights=weights)
        session.count()
        return total

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _finish(out: SecureOutcome, server: SecAggServer, server_round: int,
                started: float) -> SecureOutcome:
        out.dropped = {stage.label: len(nodes) for stage, nodes in server.dropped.items()}
        out.seconds = time.perf_counter() - started
        log(INFO, "Round %d: secure aggregation, %d contributor(s), dropped per stage %s, "
            "%.2f s", server_round, len(out.contributors), out.dropped, out.seconds)
        return out

    @staticmethod
    def _check_key_signature(content: RecordDict, advert: Any, signing_keys: Mapping[int, bytes],
                             run_id: int, server_round: int) -> tuple[bytes, bytes, bytes]:
        """``(Ed25519 key, nonce, signature)`` vouching for a node's round keys, or raise."""
        src = advert.sender
        if src not in signing_keys:
            raise SignatureRejected("UNKNOWN_NODE", f"node {src} has no signing key to vouch "
                                    "for its secure-aggregation keys")
        record = content[SECAGG]
        nonce, signature = (record.get(field) for field in signed_wire.KEYS_FIELDS)
        signed_wire.check_keys(run_id, server_round, src, signing_keys[src], advert.keys.mask,
                               advert.keys.encryption, nonce, signature)
        return signing_keys[src], nonce, signature

    def _check_stage0(self, content: RecordDict, check_metrics: Callable[[dict[str, Any]], int]
                      ) -> dict[str, Any]:
        if "metrics" not in content:
            raise PayloadError("MALFORMED", "a stage-0 reply lacks 'metrics'")
        if "arrays" in content:
            raise PayloadError("MALFORMED", "a stage-0 reply of a secure round must not carry "
                               "the factors; they are uploaded masked in stage 2")
        metrics = dict(content["metrics"])
        n = check_metrics(metrics)
        if n > self.max_weight:
            raise PayloadError("BAD_EXAMPLE_COUNT", f"num-examples {n} exceeds "
                               f"secagg-max-weight {self.max_weight}, the largest weight the "
                               f"fixed-point encoding holds; raise secagg-max-weight")
        return metrics

    def _answers(self, messages: Iterable[Message], replies: Iterable[Message],
                 expected: Mapping[int, Any], out: SecureOutcome) -> list[Message]:
        """First error-free reply of each expected node; the rest counted as rejected.

        A reply counts for the node it comes from; whether a node answered at all is read
        from the message it answers (the SuperLink's own error replies carry its id).
        """
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages
                 if m.metadata.message_id}
        kept, seen, answered = [], set(), set()
        for reply in replies:
            src = reply.metadata.src_node_id
            answered.add(asked.get(reply.metadata.reply_to_message_id, src))
            if reply.has_error():
                out.rejected["CLIENT_ERROR"] += 1
                out.errors.append(reply.error.reason or "")
                log(WARNING, "Secure round: node %s failed: %s",
                    asked.get(reply.metadata.reply_to_message_id, src), reply.error.reason)
                continue
            out.bytes_up += payload_bytes(reply.content)
            if src not in expected or src in seen:
                out.rejected["DUPLICATE_OR_UNKNOWN"] += 1
                continue
            seen.add(src)
            kept.append(reply)
        out.rejected["NO_REPLY"] += len(set(expected) - answered)
        return kept

    def _exchange(self, grid: Grid, server_round: int, message_type: str,
                  records: Mapping[int, ConfigRecord], parse: Callable[[RecordDict, int], Any],
                  out: SecureOutcome) -> list[Any]:
        """One stage: a message per node, the parsed replies (the server checks the rest)."""
        messages = [Message(RecordDict({SECAGG: record}), dst_node_id=node,
                            message_type=message_type, group_id=str(server_round))
                    for node, record in records.items()]
        out.bytes_down += sum(payload_bytes(m.content) for m in messages)
        parsed = []
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        for reply in self._answers(messages, replies, records, out):
            try:
                parsed.append(parse(reply.content, reply.metadata.src_node_id))
            except (PayloadError, SignatureRejected) as exc:
                self._reject(out, server_round, reply.metadata.src_node_id, exc)
        return parsed

    @staticmethod
    def _reject(out: SecureOutcome, server_round: int, node: int,
                exc: PayloadError | SignatureRejected) -> None:
        out.rejected[exc.reason] += 1
        log(WARNING, "Round %d: rejected secure-aggregation reply of node %s: %s",
            server_round, node, exc)
