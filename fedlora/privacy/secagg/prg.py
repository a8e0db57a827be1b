"""Mask expansion: a 32-byte seed → a pseudo-random ``uint32`` vector.

The pseudo-random generator is AES-256 in counter mode (``cryptography``,
AES-NI), keyed with the seed, encrypting zeros. Each seed is a fresh key
(a pairwise seed is derived per round and pair, a self-mask seed is drawn per
round), so the all-zero initial counter block is never reused with one key.

For speed the keystream is produced in 256 KiB chunks into one reusable buffer
(``update_into``, no allocation per chunk, cache-resident) and added to the
target in place with ``uint32`` wraparound: ~6 GB/s on one core here, against
~1.5 GB/s for expanding the whole mask first.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

SEED_BYTES = 32
_CHUNK_WORDS = 1 << 16  # 256 KiB of keystream per update_into call
_BLOCK_BYTES = 16


def apply_mask(target: np.ndarray, seed: bytes, sign: int) -> None:
    """Add (``sign=+1``) or subtract (``sign=-1``) the mask of ``seed`` to ``target`` in place.

    In-place on purpose: masks are as large as the model update and are applied
    O(k) times per client, so no temporary of the full size is created.

    Parameters
    ----------
    target
        1-D C-contiguous ``uint32`` array, modified in place (mod 2^32).
    seed
        32-byte mask seed.
    sign
        ``+1`` or ``-1``.
    """
    if target.dtype != np.uint32 or target.ndim != 1 or not target.flags.c_contiguous:
        raise ValueError(
            f"masks apply to 1-D contiguous uint32 arrays, got dtype {target.dtype}, "
            f"shape {target.shape}"
        )
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    encryptor = _keystream(seed)
    if target.size == 0:
        return
    chunk = min(_CHUNK_WORDS, target.size)
    zeros = bytes(4 * chunk)
    buffer = bytearray(4 * chunk + _BLOCK_BYTES - 1)  # update_into needs block_size - 1 spare
    words = np.frombuffer(buffer, dtype=np.uint8)[: 4 * chunk].view(np.uint32)  # (chunk,)
    for start in range(0, target.size, chunk):
        count = min(chunk, target.size - start)
        encryptor.update_into(zeros[: 4 * count], buffer)
        if sign == 1:
            target[start : start + count] += words[:count]
        else:
            target[start : start + count] -= words[:count]


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """The mask of ``seed`` as a new ``uint32`` array of shape ``(length,)``."""
    mask = np.zeros(length, dtype=np.uint32)
    apply_mask(mask, seed, 1)
    return mask


def _keystream(seed: bytes) -> CipherContext:
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ValueError(
            f"a mask seed is {SEED_BYTES} bytes, got "
            f"{len(seed) if isinstance(seed, bytes) else type(seed).__name__}"
        )
    return Cipher(algorithms.AES(seed), modes.CTR(bytes(_BLOCK_BYTES))).encryptor()
