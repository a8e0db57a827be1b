"""What the server sees: masked uploads look uniform, and one mask needs t shares to remove."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.privacy.secagg import FixedPointCodec, SecAggConfig, ShamirError, UnmaskResponse
from fedlora.privacy.secagg.prg import SEED_BYTES, apply_mask
from fedlora.privacy.secagg.shamir import combine_shares, reconstruct_value

from .helpers import Federation, make_federation, run_round

CONFIG = SecAggConfig(clip_range=2.0, max_weight=100.0)
SIZE = 20_000


def _encoded(fed: Federation, node: int) -> np.ndarray:
    group = fed.server.group
    assert group is not None
    codec = FixedPointCodec(CONFIG.clip_range, CONFIG.max_weight, group.num_clients)
    return codec.encode(fed.vectors[node], fed.weights[node])


def _captured_round(fed: Federation) -> list[UnmaskResponse]:
    """Run a round and keep the unmask responses the server received."""
    responses: list[UnmaskResponse] = []
    run_round(fed, responses_hook=responses.extend)
    return responses


def _self_mask_seed(fed: Federation, responses: list[UnmaskResponse], node: int) -> bytes:
    threshold = fed.server.group.threshold  # type: ignore[union-attr]
    shares = {r.sender: r.self_mask_shares[node] for r in responses if node in r.self_mask_shares}
    return combine_shares(shares, threshold, SEED_BYTES)


def test_masked_upload_looks_uniform_and_uncorrelated() -> None:
    # Prepare
    fed = make_federation(5, CONFIG, vector_size=SIZE)

    # Execute
    run_round(fed)

    # Assert: for each client, y_u is not its encoding and carries no trace of it
    for node in fed.ids:
        masked = fed.masked[node].astype(np.float64)
        encoded = _encoded(fed, node)
        assert not np.array_equal(fed.masked[node], encoded)
        sigma_mean = 2.0**32 / np.sqrt(12 * masked.size)
        assert abs(masked.mean() - 2.0**31) < 5 * sigma_mean
        high_bits = (fed.masked[node] >> 31).mean()
        assert abs(high_bits - 0.5) < 5 * 0.5 / np.sqrt(masked.size)
        signed_plain = encoded.view(np.int32).astype(np.float64)
        assert abs(np.corrcoef(masked, signed_plain)[0, 1]) < 0.05


def test_removing_the_self_mask_of_a_survivor_still_leaves_it_masked() -> None:
    # Prepare: the server legitimately rebuilds b_u for every survivor
    fed = make_federation(5, CONFIG, vector_size=SIZE)
    responses = _captured_round(fed)
    node = fed.ids[0]
    seed = _self_mask_seed(fed, responses, node)

    # Execute
    partially = fed.masked[node].copy()
    apply_mask(partially, seed, -1)

    # Assert: the pairwise masks (whose keys stay secret) still hide the input
    encoded = _encoded(fed, node)
    assert not np.array_equal(partially, encoded)
    assert np.mean(partially == encoded) < 0.01


def test_self_mask_cannot_be_rebuilt_from_fewer_than_t_shares() -> None:
    # Prepare
    fed = make_federation(7, CONFIG, vector_size=256)
    responses = _captured_round(fed)
    node = fed.ids[0]
    threshold = fed.server.group.threshold  # type: ignore[union-attr]
    shares = {r.sender: r.self_mask_shares[node] for r in responses}
    seed = combine_shares(shares, threshold, SEED_BYTES)
    too_few = dict(list(shares.items())[: threshold - 1])

    # Execute / Assert
    with pytest.raises(ShamirError, match="TOO_FEW_SHARES"):
        combine_shares(too_few, threshold, SEED_BYTES)
    assert reconstruct_value(too_few) != int.from_bytes(seed, "big")
    with pytest.raises(ShamirError, match="INCONSISTENT_SHARES"):
        combine_shares(too_few, threshold - 1, SEED_BYTES)


def test_pairwise_masks_cancel_in_the_sum_of_uploads() -> None:
    # Prepare
    fed = make_federation(6, SecAggConfig(neighbours=2, clip_range=2.0, max_weight=100.0))
    responses = _captured_round(fed)
    total = np.zeros(fed.server.vector_size + 1, dtype=np.uint32)
    for node in fed.ids:
        total += fed.masked[node]
    plain = np.zeros_like(total)
    for node in fed.ids:
        plain += _encoded(fed, node)

    # Execute: remove only the self-masks
    for node in fed.ids:
        apply_mask(total, _self_mask_seed(fed, responses, node), -1)

    # Assert: Σ y_u − Σ PRG(b_u) is exactly the sum of the plain encodings
    np.testing.assert_array_equal(total, plain)
