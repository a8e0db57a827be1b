"""P2: FlexLoRA redistribution through a factored SVD vs the dense SVD peers use.

Both sides start from the same 8 client updates of one 4096 × 4096 module
(rank 16, float32) and produce the rank-16 factors a client receives:

* ours: ``aggregate("flexlora", updates).for_client(16)`` — QR of the
  stacked factors, SVD of the 128 × 128 core, no dense matrix;
* peer: form ``ΔW* = Σ p_k s_k B_k A_k`` densely (float64),
  ``np.linalg.svd(full_matrices=False)``, truncate to rank 16.

Run ``python -m benchmarks --only P2 [--quick]`` (or ``python -m benchmarks.flexlora_svd``).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from benchmarks.common import at_most, result
from fedlora.aggregation import ClientUpdate, LoraFactors, aggregate, scale_for_rank

ID = "P2"
TITLE = "flexlora factored vs dense SVD"
TARGET_RATIO, TOLERANCE = 100.0, 1e-5
MODULE = "model.layers.0.self_attn.q_proj"
CLIENTS, RANK, ALPHA = 8, 16, 32.0


def _updates(rng: np.random.Generator, size: int) -> list[ClientUpdate]:
    scale = scale_for_rank(RANK, ALPHA)
    return [
        ClientUpdate(
            factors={
                MODULE: LoraFactors(
                    a=rng.normal(0.0, size**-0.5, (RANK, size)).astype(np.float32),  # (r, n)
                    b=rng.normal(0.0, 1e-2, (size, RANK)).astype(np.float32),  # (m, r)
                    scale=scale,
                )
            },
            num_examples=int(rng.integers(50, 500)),
        )
        for _ in range(CLIENTS)
    ]


def _dense_truncated(updates: list[ClientUpdate]) -> np.ndarray:
    total = sum(u.num_examples for u in updates)
    target = sum(u.num_examples / total * u.factors[MODULE].delta() for u in updates)  # (m, n)
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    return (u[:, :RANK] * s[:RANK]) @ vt[:RANK]  # (m, n)


def run(quick: bool = False) -> dict[str, Any]:
    """Time both paths once on fresh data and compare their rank-16 results.

    Parameters
    ----------
    quick
        Use a 512 × 512 module instead of 4096 × 4096.

    Returns
    -------
    dict[str, Any]
        :func:`benchmarks.common.result`'s object: ``ours_s`` is the best of 3,
        ``peer_s`` one run, ``max_abs_diff`` here the relative Frobenius error
        between the two rank-16 updates.
    """
    size = 512 if quick else 4096
    updates = _updates(np.random.default_rng(0), size)

    ours_times = []
    for _ in range(3):
        start = time.perf_counter()
        sent = aggregate("flexlora", updates).for_client(RANK)
        ours_times.append(time.perf_counter() - start)
    ours_s = min(ours_times)

    start = time.perf_counter()
    reference = _dense_truncated(updates)
    peer_s = time.perf_counter() - start

    ours = sent[MODULE].delta()  # (m, n), float64
    relative = float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))
    ratio = peer_s / ours_s
    out = result(
        bench_id=ID,
        name=f"{ID} {TITLE}",
        ours_s=ours_s,
        peer="dense numpy SVD",
        peer_s=peer_s,
        max_abs_diff=relative,
        params={
            "out_features": size,
            "in_features": size,
            "clients": CLIENTS,
            "rank": RANK,
            "quick": quick,
            "input_dtype": "float32",
            "peer_dtype": "float64",
            "ours_repeats": len(ours_times),
            "peer_repeats": 1,
            "cpu_count": os.cpu_count(),
            "max_abs_diff_meaning": "relative Frobenius error ||ours - dense|| / ||dense|| "
            "of the rank-16 update s_r * B @ A",
        },
        target=f"ratio >= {TARGET_RATIO:g} at 4096 x 4096",
        target_met=None if quick else ratio >= TARGET_RATIO,
        checks=[at_most("relative error vs dense SVD", relative, TOLERANCE)],
        summary=f"{size}x{size}, {CLIENTS} clients, r={RANK}",
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 x 512 instead of 4096 x 4096")
    out = run(quick=parser.parse_args().quick)
    print(
        f"{out['name']}: ours {out['ours_s']:.3f} s, dense {out['peer_s']:.2f} s, "
        f"ratio {out['ratio']:.0f}x, relative error {out['max_abs_diff']:.1e} "
        f"({out['summary']})"
    )
