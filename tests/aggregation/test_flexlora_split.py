"""FlexLoRA's split of Σ between the factors (issue 20, defect 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.aggregation import aggregate, scale_for_rank
from fedlora.aggregation.views import INIT_ROW_NORM

from .helpers import random_update

SHAPES = {"q": (24, 20)}


def small_updates(rng):
    """Late-training-like updates: small products, so σ is small."""
    ups = [random_update(rng, r, 10, shapes=SHAPES) for r in (4, 8, 16)]
    for u in ups:
        f = u.factors["q"]
        object.__setattr__(f, "b", f.b * 1e-3)
    return ups


def test_init_a_gives_every_received_a_row_the_peft_init_norm(rng):
    ups = small_updates(rng)
    result = aggregate("flexlora", ups, split="init-a")
    dense = sum(u.num_examples / 30 * u.factors["q"].delta() for u in ups)
    u, s, vt = np.linalg.svd(dense)
    for r in (4, 8, 16):
        got = result.for_client(r)["q"]
        np.testing.assert_allclose(np.linalg.norm(got.a, axis=1), INIT_ROW_NORM, rtol=1e-10)
        np.testing.assert_allclose(got.delta(), (u[:, :r] * s[:r]) @ vt[:r], atol=1e-12)
    peft_row = rng.uniform(-1 / math.sqrt(4096), 1 / math.sqrt(4096), size=4096)
    assert np.linalg.norm(peft_row) == pytest.approx(INIT_ROW_NORM, rel=0.05)


def test_balanced_rows_shrink_with_the_singular_values(rng):
    ups = small_updates(rng)
    got = aggregate("flexlora", ups, split="balanced").for_client(8)["q"]
    assert np.linalg.norm(got.a, axis=1).max() < 0.3 * INIT_ROW_NORM


def test_both_splits_have_the_same_effective_delta_and_client_products(rng):
    ups = [random_update(rng, r, 10, shapes=SHAPES) for r in (2, 4)]
    a = aggregate("flexlora", ups, split="init-a")
    b = aggregate("flexlora", ups, split="balanced")
    np.testing.assert_allclose(a.effective_delta("q"), b.effective_delta("q"), atol=1e-10)
    for r in (2, 6, 16):  # 16 > R = 6: re-initialised components carry B = 0
        np.testing.assert_allclose(a.for_client(r)["q"].delta(), b.for_client(r)["q"].delta(),
                                   atol=1e-10)


@pytest.mark.parametrize("rslora", [False, True])
def test_paper_split_matches_the_authors_redistribution(rng, rslora):
    """The FlexLoRA authors' code (FederatedScope, FlexLoRA branch, ``distribute_weight_fast``):
    SVD of the dense weighted ``Σ p_k s_k B_k A_k``, then ``A = V_rᵀ`` and ``B = U_r Σ_r / s_r``."""
    ups = [random_update(rng, r, n, shapes=SHAPES, rslora=rslora)
           for r, n in ((4, 10), (8, 5), (16, 15))]
    result = aggregate("flexlora", ups, split="paper", rslora=rslora)
    dense = sum(u.num_examples / 30 * u.factors["q"].delta() for u in ups)
    u, s, vt = np.linalg.svd(dense, full_matrices=False)
    for r in (2, 4, 8, 16):
        got = result.for_client(r)["q"]
        scale = scale_for_rank(r, 16.0, rslora)
        assert got.scale == scale
        # singular vectors are unique up to sign: compare each component sign-aligned
        signs = np.sign(np.sum(got.a * vt[:r], axis=1))
        np.testing.assert_allclose(got.a * signs[:, None], vt[:r], atol=1e-9)
        np.testing.assert_allclose(got.b * signs[None, :], u[:, :r] * s[:r] / scale, atol=1e-9)


def test_unknown_split_is_refused(rng):
    with pytest.raises(ValueError, match="balanced, init-a, paper"):
        aggregate("flexlora", [random_update(rng, 2, shapes=SHAPES)], split="even")


def test_config_offers_every_split_the_rule_accepts():
    from fedlora import config
    from fedlora.aggregation.flexlora import SPLITS

    for split in SPLITS:
        assert config.from_flat({**config.defaults(), "flexlora-split": split}).fl.flexlora_split \
            == split
    with pytest.raises(config.ConfigError, match="balanced, init-a, paper"):
        config.from_flat({**config.defaults(), "flexlora-split": "even"})
