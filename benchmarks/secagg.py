"""P3: secure-aggregation mask throughput and upload size.

Measures, for one LoRA update of 4,194,304 parameters (Llama-2-7B, q/v, r=8):

* ours: AES-256-CTR mask generation added in place to a ``uint32`` vector
  (``fedlora.secagg.prg.apply_mask``), in GB/s of mask bytes;
* peer: numpy's MT19937 (``RandomState(seed).randint``) drawing the same
  number of ``uint32`` words, the kind of non-cryptographic PRNG Flower's
  SecAgg+ masks come from, added the same way;
* the fixed-point encoding throughput, and the bytes uploaded per parameter.

Run ``python -m benchmarks.secagg [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedlora.secagg.encoding import FixedPointCodec
from fedlora.secagg.prg import apply_mask

PARAMS = 4_194_304
REPEATS = 5


def _best_seconds(step: Callable[[], object], repeats: int) -> float:
    step()  # warm-up: page faults, cipher initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def run(quick: bool = False) -> dict[str, Any]:
    """Time mask generation (ours and peer) and encoding once on fresh data.

    Parameters
    ----------
    quick
        Use 262,144 parameters and one repeat instead of 4,194,304 and five.

    Returns
    -------
    dict[str, Any]
        ``name``, ``ours_s``, ``peer``, ``peer_s``, ``ratio`` (``peer_s / ours_s``),
        ``ours_gb_s``, ``peer_gb_s``, ``encode_gb_s``, ``bytes_per_param`` and ``params``.
    """
    size = 262_144 if quick else PARAMS
    repeats = 1 if quick else REPEATS
    rng = np.random.default_rng(0)
    seed = os.urandom(32)
    target = np.zeros(size, dtype=np.uint32)
    ours_s = _best_seconds(lambda: apply_mask(target, seed, 1), repeats)

    def peer() -> None:
        target.__iadd__(np.random.RandomState(1234).randint(0, 2**32, size, dtype=np.uint32))

    peer_s = _best_seconds(peer, repeats)
    codec = FixedPointCodec(clip_range=8.0, max_weight=10_000.0, num_clients=20)
    update = rng.normal(0.0, 0.02, size).astype(np.float32)
    encode_s = _best_seconds(lambda: codec.encode(update, 160.0), repeats)
    encoded = codec.encode(update, 160.0)
    mask_bytes = 4 * size
    result = {
        "name": "P3 secagg mask generation (AES-256-CTR vs MT19937)",
        "ours_s": ours_s,
        "peer": "numpy MT19937 randint",
        "peer_s": peer_s,
        "ratio": peer_s / ours_s,
        "ours_gb_s": mask_bytes / ours_s / 1e9,
        "peer_gb_s": mask_bytes / peer_s / 1e9,
        "encode_gb_s": mask_bytes / encode_s / 1e9,
        "bytes_per_param": encoded.nbytes / size,
        "params": {
            "parameters": size,
            "quick": quick,
            "repeats": repeats,
            "cpu_count": os.cpu_count(),
            "gb": "10^9 bytes of uint32 mask added in place to the vector",
            "bytes_per_param_meaning": "upload bytes / parameters, incl. 1 normaliser word",
        },
    }
    print(
        f"{result['name']}: ours {result['ours_gb_s']:.2f} GB/s ({ours_s * 1e3:.1f} ms), "
        f"MT19937 {result['peer_gb_s']:.2f} GB/s, ratio {result['ratio']:.1f}x; "
        f"encode {result['encode_gb_s']:.2f} GB/s; upload {result['bytes_per_param']:.6f} B/param "
        f"({size:,} parameters)"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="262,144 parameters, one repeat")
    run(quick=parser.parse_args().quick)
