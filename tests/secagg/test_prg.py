"""Mask expansion: AES-256-CTR keystream as uint32, applied in place with wraparound."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedlora.privacy.secagg.prg import apply_mask, expand_mask

SEED = bytes(range(32))


def test_mask_is_the_aes_ctr_keystream_across_chunks() -> None:
    # 200,000 words span several 65,536-word chunks and end mid-chunk
    length = 200_000
    encryptor = Cipher(algorithms.AES(SEED), modes.CTR(bytes(16))).encryptor()
    reference = np.frombuffer(encryptor.update(bytes(4 * length)), dtype=np.uint32)
    np.testing.assert_array_equal(expand_mask(SEED, length), reference)


def test_prefix_property_and_determinism() -> None:
    long = expand_mask(SEED, 70_000)
    np.testing.assert_array_equal(expand_mask(SEED, 1_000), long[:1_000])
    np.testing.assert_array_equal(expand_mask(SEED, 70_000), long)


def test_different_seeds_give_different_masks() -> None:
    assert np.mean(expand_mask(SEED, 4096) == expand_mask(os.urandom(32), 4096)) < 0.01


def test_add_then_subtract_restores_the_target_with_wraparound() -> None:
    target = np.array([0, 1, 2**32 - 1, 2**31] * 1000, dtype=np.uint32)
    original = target.copy()
    apply_mask(target, SEED, 1)
    assert not np.array_equal(target, original)
    apply_mask(target, SEED, -1)
    np.testing.assert_array_equal(target, original)


def test_opposite_signs_from_two_parties_cancel() -> None:
    a, b = np.zeros(1000, np.uint32), np.zeros(1000, np.uint32)
    apply_mask(a, SEED, 1)
    apply_mask(b, SEED, -1)
    assert not (a + b).any()


def test_mask_looks_uniform() -> None:
    mask = expand_mask(SEED, 100_000).astype(np.float64)
    assert abs(mask.mean() / 2**32 - 0.5) < 5 / np.sqrt(12 * mask.size)


def test_empty_target_is_fine() -> None:
    assert expand_mask(SEED, 0).shape == (0,)


@pytest.mark.parametrize(
    ("target", "seed", "sign", "match"),
    [
        (np.zeros(4, np.int32), SEED, 1, "uint32"),
        (np.zeros((2, 2), np.uint32), SEED, 1, "1-D"),
        (np.zeros(8, np.uint32)[::2], SEED, 1, "contiguous"),
        (np.zeros(4, np.uint32), SEED, 2, "sign"),
        (np.zeros(4, np.uint32), SEED[:16], 1, "32 bytes"),
        (np.zeros(4, np.uint32), "seed", 1, "32 bytes"),
    ],
)
def test_invalid_arguments(target: np.ndarray, seed: bytes, sign: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_mask(target, seed, sign)
