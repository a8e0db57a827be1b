"""Heads, biases and modules to save are inside the norm bound; no reply outweighs
``max-weight-fraction`` of a round (one poisoning client, plain rounds, fake Grid)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from fedlora import config
from fedlora.aggregation.weighting import cap_weights
from fedlora.errors import ConfigError
from tests.fl_harness import tiny_config
from tests.test_fuzz_replies import (  # noqa: F401 — _task_identity: the autouse fixture
    FUZZED,
    HEAD,
    _task_identity,
    honest_arrays,
    make_glob,
    run_plain_round,
)


def _poison_head(value: float, examples: int):
    def change(reply):
        arrays = reply.content["arrays"]
        head = arrays[HEAD].numpy().copy()
        head[:] = value
        arrays[HEAD] = Array(head)
        metrics = dict(reply.content["metrics"])
        metrics["num-examples"] = examples
        reply.content["metrics"] = type(reply.content["metrics"])(metrics)
    return change


def _honest_mean(key: str, partitions, weights=None) -> np.ndarray:
    sent = make_glob(4).arrays_for(4)
    from flwr.app import ArrayRecord

    record = ArrayRecord({k: Array(v) for k, v in sent.items()})
    parts = [honest_arrays(record, p, 1)[key].astype(np.float64) for p in partitions]
    weights = weights or [10 + 3 * p for p in partitions]
    return (sum(w * x for w, x in zip(weights, parts, strict=True)) / sum(weights)).astype(
        np.float32)


def test_a_head_of_1e30_with_ten_million_examples_is_rejected_not_adopted():
    strategy, record, _, _ = run_plain_round([_poison_head(1e30, 10**7)],
                                             flat=tiny_config(**{"min-accepted": 1}))

    assert record["rejected"] == {"NORM_TOO_LARGE": 1} and FUZZED not in record["clients"]
    got = strategy.glob.arrays_for(4)[HEAD]
    np.testing.assert_allclose(got, _honest_mean(HEAD, [1, 2, 3]), rtol=2e-6, atol=1e-6)
    assert np.abs(got).max() < 10


def test_clip_update_norm_moves_a_head_only_update_back_to_the_bound():
    flat = tiny_config(**{"min-accepted": 1, "clip-update-norm": 0.5})
    sent = make_glob(4).arrays_for(4)

    def head_only(reply):  # the factors exactly as received, the head moved by 3 per entry
        arrays = reply.content["arrays"]
        for key, value in sent.items():
            arrays[key] = Array(value + (3.0 if key == HEAD else 0.0))

    strategy, record, _, _ = run_plain_round([head_only], nodes=1, flat=flat)

    assert record["clients"] == [FUZZED]
    moved = np.linalg.norm(strategy.glob.arrays_for(4)[HEAD].astype(np.float64) - sent[HEAD])
    assert moved == pytest.approx(0.5, rel=1e-5)  # was 3·sqrt(36) = 18, before any clipping


def test_max_weight_fraction_caps_a_client_declaring_ten_million_examples():
    flat = tiny_config(**{"min-accepted": 1, "max-weight-fraction": 0.5})

    def inflate(reply):
        metrics = dict(reply.content["metrics"])
        metrics["num-examples"] = 10**7
        reply.content["metrics"] = type(reply.content["metrics"])(metrics)

    strategy, record, _, _ = run_plain_round([inflate], flat=flat)

    assert record["clients"] == [0, 1, 2, 3] and record["weight_capped"] == 1
    honest = [10 + 3 * p for p in (1, 2, 3)]
    weights = [sum(honest), *honest]  # share 0.5 exactly: the cap equals the others' total
    for key in ("base.layer0.q.lora_A.weight", HEAD):
        np.testing.assert_allclose(strategy.glob.arrays_for(4)[key],
                                   _honest_mean(key, [0, 1, 2, 3], weights), rtol=2e-6,
                                   atol=1e-6)


@pytest.mark.parametrize("counts", [[10**7, 10, 20, 30], [100, 90, 1, 1], [3, 3, 3, 3, 50],
                                    [7, 1000, 7, 2000, 5, 5, 5]])
@pytest.mark.parametrize("fraction", [0.2, 0.34, 0.5, 0.9])
def test_capped_weights_never_exceed_the_fraction_and_keep_the_others_ratios(counts, fraction):
    capped = cap_weights(counts, fraction)
    total = sum(capped)
    if fraction * len(counts) < 1:
        assert len(set(capped)) == 1
        return
    assert max(capped) / total <= fraction + 1e-8
    kept = [(c, w) for c, w in zip(counts, capped, strict=True) if w / total < fraction - 1e-8]
    ratios = [w / c for c, w in kept]
    # uncapped clients are scaled alike (to integer rounding: 1 in the smallest weight)
    assert not ratios or max(ratios) / min(ratios) - 1 <= 1.0 / min(capped)


def test_counts_within_the_cap_are_returned_unchanged():
    assert cap_weights([5, 6, 7], 0.5) == [5, 6, 7]
    assert cap_weights([5, 6, 7], 1.0) == [5, 6, 7]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"max-weight-fraction": 0.0}, "max-weight-fraction must be in"),
    ({"max-weight-fraction": 1.5}, "max-weight-fraction must be in"),
    ({"max-weight-fraction": 0.5, "secure-aggregation": True}, "inside the masked sum"),
])
def test_bad_max_weight_fraction_is_refused_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.from_flat(tiny_config(**overrides))
