"""Every message a client sends holds only LoRA factors (+ declared heads) and numbers."""

from __future__ import annotations

import numpy as np
import pytest
from fl_harness import run_rounds, tiny_config
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

HIDDEN = 384  # MiniLM
HEADS = {"base_model.model.classifier.weight": (5, HIDDEN),
         "base_model.model.classifier.bias": (5,)}


def _expected_shape(key: str, rank: int) -> tuple[int, ...]:
    if key.endswith(".lora_A.weight"):
        return (rank, HIDDEN)
    if key.endswith(".lora_B.weight"):
        return (HIDDEN, rank)
    return HEADS[key]


@pytest.mark.parametrize(
    ("strategy", "ranks", "sent_factors"),
    [("fedit", "", ("lora_A", "lora_B")), ("flexlora", "2,4,8", ("lora_A", "lora_B")),
     ("ffa", "", ("lora_B",)), ("fedsa", "", ("lora_A",))],
)
def test_client_replies_carry_only_factors_heads_and_numbers(strategy, ranks, sent_factors):
    replies = []
    flat = tiny_config(strategy=strategy, rank_by_partition=ranks)
    records, grid, *_ = run_rounds(flat, on_reply=replies.append)
    rank_of = {i: int(r) for i, r in enumerate(ranks.split(","))} if ranks else {}

    train = [r for r in replies if r.metadata.message_type == "train"]
    assert len(train) == 3 * flat["num-server-rounds"] and not any(r.has_error() for r in train)
    for reply in replies:
        content = reply.content
        if reply.metadata.message_type == "query.personal_export":  # FedSA, at the end
            assert set(content) == {"metrics"}
            assert set(content["metrics"]) == {"partition-id", "personal-saved"}
            continue
        if reply.metadata.message_type.startswith("query"):
            assert set(content) == {"caps"}
            assert all(isinstance(v, int) for v in content["caps"].values())
            continue
        for name, record in content.items():
            assert isinstance(record, ArrayRecord | MetricRecord), f"{name}: {type(record)}"
            assert not isinstance(record, ConfigRecord)
        metrics = content["metrics"]
        assert all(isinstance(v, int | float) and not isinstance(v, bool)
                   for v in metrics.values())
        if reply.metadata.message_type != "train":
            assert set(content) == {"metrics"}
            continue
        assert set(content) == {"arrays", "metrics"}
        rank = rank_of.get(int(metrics["partition-id"]), flat["lora.r"])
        arrays = content["arrays"]
        lora_keys = [k for k in arrays if ".lora_" in k]
        assert lora_keys and all(any(f".{f}." in k for f in sent_factors) for k in lora_keys)
        assert {k for k in arrays if ".lora_" not in k} == set(HEADS)
        for key, array in arrays.items():
            value = array.numpy()
            assert value.dtype == np.float32
            assert value.shape == _expected_shape(key, rank), key
            # nothing that looks like text or token ids: real-valued, not integral
            assert not np.allclose(value, np.round(value)) or not value.any()
