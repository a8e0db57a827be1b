"""Stage "validate / decode": one reply's metrics, size, keys, arrays and shapes checked, in
that order, before anything touches the global state."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedlora.aggregation import (
    ClientUpdate,
    LoraFactors,
    UpdateRejected,
    validate_update,
)
from fedlora.config import RunConfig
from fedlora.errors import PayloadError
from fedlora.federation import wire_schema
from fedlora.federation.global_adapter import GlobalAdapter, split_arrays
from fedlora.federation.transport import nbytes, unpack
from fedlora.federation.wire_schema import select_outgoing
from fedlora.learning import hetlora_prune
from fedlora.privacy import dp as privacy
from server.nodes import NodeInfo


@dataclass(frozen=True)
class Decoded:
    """A reply that passed every check, and what its node received (the clip stage's
    reference point), both at the rank of the reply."""

    node: NodeInfo
    update: ClientUpdate
    heads: dict[str, np.ndarray]
    metrics: dict[str, Any]
    record: ArrayRecord
    sent_factors: dict[str, LoraFactors]
    sent_heads: dict[str, np.ndarray]


class ReplyValidator:
    """Checks and decodes train replies against the run config (and DP's sensitivity)."""

    def __init__(self, cfg: RunConfig, dp: privacy.DPSpec) -> None:
        self.cfg = cfg
        self.dp = dp

    def check_metrics(self, metrics: Mapping[str, Any], server_round: int | None) -> int:
        """The reply's example count, after checking its round, count and loss, then every
        other metric against the declared schema
        (:data:`fedlora.federation.wire_schema.TRAIN_METRICS`:
        known keys only, each a finite number of its kind)."""
        max_examples = self.cfg.fl.max_examples
        if server_round is not None and metrics.get("server-round") != server_round:
            raise PayloadError("WRONG_ROUND", f"reply is for round "
                               f"{str(metrics.get('server-round'))[:40]}, this is round "
                               f"{server_round}")
        n = metrics.get("num-examples")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= max_examples:
            raise PayloadError("BAD_EXAMPLE_COUNT", f"num-examples must be an int in 1.."
                               f"{max_examples} (max-examples), got {str(n)[:40]}")
        loss = metrics.get("train-loss")
        if not isinstance(loss, int | float) or isinstance(loss, bool) or not np.isfinite(loss):
            raise PayloadError("BAD_METRICS", f"train-loss must be a finite number, got "
                               f"{str(loss)[:40]}")
        wire_schema.check_metrics(metrics, wire_schema.TRAIN_METRICS, wire_schema.TRAIN_REQUIRED)
        return n

    def decode(self, glob: GlobalAdapter, reply: Message, node: NodeInfo,
               sent: Mapping[str, np.ndarray], send: str, server_round: int | None
               ) -> Decoded:
        """Validate one reply to ``sent`` (what ``node`` received) and decode it.

        Raises UpdateRejected/PayloadError with a reason code. Order matters: cheap checks of
        the metadata and the payload size come before decoding any array. Arrays are read as
        views into the reply's bytes where they allow it; nothing here writes into them.
        """
        content = reply.content
        record, raw_metrics = content.get("arrays"), content.get("metrics")
        if not isinstance(record, ArrayRecord) or not isinstance(raw_metrics,
                                                                  MetricRecord | ConfigRecord):
            raise PayloadError("MALFORMED", f"a reply carries an ArrayRecord 'arrays' and a "
                               f"MetricRecord 'metrics'; got {type(record).__name__} and "
                               f"{type(raw_metrics).__name__}")
        metrics = dict(raw_metrics)
        n = self.check_metrics(metrics, server_round)
        arrays = self._arrays(record, select_outgoing(sent, send), send, sent)
        if self.cfg.fl.hetlora_prune:
            node, sent = self._pruned_reply(node, arrays, sent)
        # frozen or personal factors were not sent back: they are what this node received
        # per module: its alpha over the rank it arrived at (a rank-0 array gets a placeholder
        # scale here and is refused below as SHAPE_MISMATCH)
        def scale(module: str, rank: int) -> float:
            return glob.scale_of(module, max(rank, 1))

        factors, heads = split_arrays({**sent, **arrays}, scale)
        sent_factors, sent_heads = split_arrays(sent, scale)
        for key, value in heads.items():
            if value.shape != sent_heads[key].shape or not np.all(np.isfinite(value)):
                raise PayloadError("BAD_HEAD", f"head {key}: shape {value.shape} or non-finite")
        # under DP every update weighs the same: an example count would scale its sensitivity
        update = ClientUpdate(factors=factors, num_examples=1 if self.dp.enabled else n)
        validate_update(update, {m: (f.b.shape[0], f.a.shape[1]) for m, f in sent_factors.items()},
                        max_rank=self.cfg.fl.max_rank, declared_rank=node.rank,
                        pattern=glob.pattern)
        return Decoded(node, update, heads, metrics, record, sent_factors, sent_heads)

    def _arrays(self, record: ArrayRecord, expected: Mapping[str, np.ndarray], send: str,
                sent: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The reply's arrays, after its size and key set (and, with central DP, its norm)."""
        limit = 2 * sum(v.size * 4 for v in expected.values()) + 65_536  # float64 at most
        size = nbytes(record)
        if size > limit:
            raise PayloadError("PAYLOAD_TOO_LARGE", f"{size} bytes of arrays; this node's "
                               f"adapter is at most {limit} bytes")
        if set(record) != set(expected):
            extra = sorted(set(record) - set(expected))
            missing = sorted(set(expected) - set(record))
            raise PayloadError("KEY_MISMATCH", f"expected the {send!r} factors and heads; "
                               f"missing {missing[:3]}, unexpected {extra[:3]}")
        # every .npy header is parsed and bound-checked (dtype, shape, exact length) first
        arrays = unpack(record, copy=False)
        if self.dp.mode == "central":  # the sensitivity the noise is calibrated to
            norm = privacy.update_norm(arrays, sent)
            if norm > self.dp.clip_norm * (1 + 1e-4):
                raise PayloadError("DP_NORM_EXCEEDED", f"update norm {norm:.4g} exceeds "
                                   f"dp-clip-norm {self.dp.clip_norm}; the client must clip")
        return arrays

    def _pruned_reply(self, node: NodeInfo, arrays: Mapping[str, np.ndarray],
                      sent: Mapping[str, np.ndarray]) -> tuple[NodeInfo, dict[str, np.ndarray]]:
        """hetlora-prune: a reply at the rank sent, or at exactly ``max(1, floor(γ r))`` (one
        prune); anything else is ``RANK_MISMATCH``. Returns the node at the reply's rank and
        what it received truncated to that rank (for the shape checks and update norms)."""
        gamma = self.cfg.fl.hetlora_prune_gamma
        try:
            got = hetlora_prune.adapter_rank(arrays)
        except (ValueError, KeyError) as exc:
            raise UpdateRejected("RANK_MISMATCH", f"hetlora-prune: {exc}") from None
        if got == node.rank:
            return node, dict(sent)
        allowed = hetlora_prune.pruned_rank(node.rank, gamma)
        if got != allowed:
            raise UpdateRejected("RANK_MISMATCH", f"hetlora-prune: the node was sent rank "
                                 f"{node.rank} and replied at rank {got}; a reply keeps that "
                                 f"rank or prunes once to {allowed} (gamma {gamma})")
        return dataclasses.replace(node, rank=got), hetlora_prune.truncate(sent, got)
