"""The declared outgoing schema (fedlora.federation.wire_schema), enforced by the client before
sending."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.errors import PayloadError
from fedlora.federation import wire_schema
from fedlora.learning import training
from tests.fl_harness import run_rounds, tiny_config

A, B, HEAD = "m.lora_A.weight", "m.lora_B.weight", "classifier.weight"
RECEIVED = {A: np.zeros((2, 5), np.float32), B: np.zeros((4, 2), np.float32),
            HEAD: np.zeros((3, 4), np.float32)}
METRICS = {"server-round": 1, "num-examples": 12, "train-loss": 0.4, "train-steps": 2,
           "rss-mb": 120.5, "partition-id": 0}


@pytest.mark.parametrize(("send", "keys"), [("ab", {A, B, HEAD}), ("a", {A, HEAD}),
                                            ("b", {B, HEAD})])
def test_the_trainable_state_of_each_send_mode_passes(send, keys):
    outgoing = {k: v + 1 for k, v in RECEIVED.items() if k in keys}
    wire_schema.check_outgoing(outgoing, RECEIVED, send, METRICS)


@pytest.mark.parametrize(("arrays", "metrics", "reason"), [
    ({**RECEIVED, "input_ids": np.zeros(4, np.float32)}, METRICS, "KEY_MISMATCH"),
    ({A: RECEIVED[A], B: RECEIVED[B]}, METRICS, "KEY_MISMATCH"),  # the head is missing
    ({**RECEIVED, A: np.zeros((3, 5), np.float32)}, METRICS, "SHAPE_MISMATCH"),
    ({**RECEIVED, HEAD: np.zeros((3, 4), np.int64)}, METRICS, "BAD_DTYPE"),
    (RECEIVED, {**METRICS, "token-id": 101}, "BAD_METRICS"),
    (RECEIVED, {**METRICS, "label": "positive"}, "BAD_METRICS"),
    (RECEIVED, {**METRICS, "rss-mb": [1.0, 2.0]}, "BAD_METRICS"),
    (RECEIVED, {**METRICS, "num-examples": 12.0}, "BAD_METRICS"),
    (RECEIVED, {k: v for k, v in METRICS.items() if k != "train-loss"}, "BAD_METRICS"),
])
def test_anything_outside_the_schema_is_refused_with_its_reason(arrays, metrics, reason):
    with pytest.raises(PayloadError) as info:
        wire_schema.check_outgoing(arrays, RECEIVED, "ab", metrics)
    assert info.value.reason == reason


def test_a_client_that_adds_a_token_id_to_its_metrics_sends_no_update(monkeypatch):
    real = training.train

    def leaky(*args, **kwargs):
        metrics = real(*args, **kwargs)
        metrics["token-id"] = 2023  # what a buggy client might leak about its data
        return metrics

    monkeypatch.setattr(training, "train", leaky)
    replies = []
    with pytest.raises(RuntimeError, match="without enough accepted updates"):
        run_rounds(tiny_config(num_server_rounds=1), on_reply=replies.append)

    train = [r for r in replies if r.metadata.message_type == "train"]
    assert len(train) == 3 and all(r.has_error() for r in train)
    assert all("token-id" in r.error.reason and "BAD_METRICS" in r.error.reason for r in train)
