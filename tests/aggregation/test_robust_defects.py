"""robust: the trimmed mean trims at every K >= 3, and clipping bounds the round's change
(issue 20, defect 5)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora import config
from fedlora.aggregation import ClientUpdate, LoraFactors, aggregate
from fedlora.config import ConfigError, from_flat

M, N, R = 16, 12, 4


def updates_from(bs, as_):
    return [ClientUpdate({"w": LoraFactors(a, b, 1.0)}, 10) for a, b in zip(as_, bs, strict=True)]


@pytest.mark.parametrize("k", [3, 5, 9])
def test_default_trim_drops_a_x100_outlier_below_ten_clients(k):
    rng = np.random.default_rng(k)
    as_ = [rng.normal(size=(R, N)) for _ in range(k)]
    bs = [rng.normal(size=(M, R)) for _ in range(k)]
    bs[0] = bs[0] * 100.0
    ups = updates_from(bs, as_)
    got = aggregate("robust", ups, lora_alpha=R, reducer="trimmed-mean").effective_delta("w")
    dense = np.sort(np.stack([b @ a for a, b in zip(as_, bs, strict=True)]), axis=0)
    np.testing.assert_allclose(got, dense[1:k - 1].mean(axis=0), atol=1e-9)  # one per side
    mean = aggregate("robust", ups, lora_alpha=R, reducer="mean").effective_delta("w")
    assert np.linalg.norm(got) < 0.2 * np.linalg.norm(mean)  # the outlier is out


def test_trimmed_mean_refuses_two_clients_with_a_clear_message():
    rng = np.random.default_rng(0)
    ups = updates_from([rng.normal(size=(M, R)) for _ in range(2)],
                       [rng.normal(size=(R, N)) for _ in range(2)])
    with pytest.raises(ValueError, match="needs at least 3 clients.*min-accepted = 3"):
        aggregate("robust", ups, lora_alpha=R, reducer="trimmed-mean")
    assert aggregate("robust", ups, lora_alpha=R, reducer="trimmed-mean", trim=0.0)


def test_config_refuses_trimmed_mean_with_fewer_than_three_accepted():
    flat = {**config.defaults(), "strategy": "robust", "robust-reducer": "trimmed-mean"}
    with pytest.raises(ConfigError, match="min-accepted = 3"):
        from_flat(flat)
    from_flat({**flat, "min-accepted": 3})
    from_flat({**flat, "robust-trim": 0.0})


def test_clipping_catches_a_38x_change_hidden_in_a_small_adapter():
    """After some rounds every adapter is mostly the shared global G. The attacker's change
    is 38× an honest one while its whole adapter stays within 1.5× the median adapter norm:
    clipping whole adapters lets it through, clipping the round's change does not."""
    rng = np.random.default_rng(0)
    g_b, g_a = rng.normal(size=(M, R)), rng.normal(size=(R, N))
    honest = [0.01 * rng.normal(size=(M, R)) for _ in range(4)]
    attack = 0.38 * rng.normal(size=(M, R))
    bs = [g_b + d for d in [attack, *honest]]
    ups = updates_from(bs, [g_a] * 5)
    received = [{"w": LoraFactors(g_a, g_b, 1.0)}] * 5
    changes = [b @ g_a - g_b @ g_a for b in bs]
    norms = np.array([np.linalg.norm(c) for c in changes])
    assert norms[0] > 30 * np.median(norms[1:])
    adapter_norms = [np.linalg.norm(b @ g_a) for b in bs]
    assert adapter_norms[0] < 1.5 * np.median(adapter_norms)  # would pass a whole-adapter clip

    got = aggregate("robust", ups, lora_alpha=R, reducer="mean", clip_multiplier=1.5,
                    received=received).effective_delta("w") - g_b @ g_a
    bound = 1.5 * np.median(norms)
    expected = np.mean([c * min(1.0, bound / np.linalg.norm(c)) for c in changes], axis=0)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    unclipped = np.mean(changes, axis=0)
    assert np.linalg.norm(got) < 0.25 * np.linalg.norm(unclipped)


def test_clipping_without_received_is_refused():
    rng = np.random.default_rng(1)
    ups = updates_from([rng.normal(size=(M, R))], [rng.normal(size=(R, N))])
    with pytest.raises(ValueError, match="needs received="):
        aggregate("robust", ups, lora_alpha=R, clip_multiplier=1.5)
