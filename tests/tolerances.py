"""Derived float bounds for tests that compare results computed in different orders.

Two computations of the same sum by different code paths (a BLAS ``sgemv`` against a float64
loop, numpy against torch, one CPU's kernels against another's) agree only up to rounding, and
by how much depends on the order of the additions — which differs between machines. A fixed
``atol`` tuned on one CPU is therefore a flaky test. These helpers give the worst-case bound
of standard floating-point error analysis (Higham, *Accuracy and Stability of Numerical
Algorithms*, §3.1 and §4.2): for any summation order,

    |fl(Σ_{k=1}^{K} p_k x_k) − Σ_k p_k x_k| ≤ γ_K · Σ_k |p_k x_k|,   γ_K = K·u / (1 − K·u),

with ``u`` the unit roundoff of the accumulation dtype, plus one ``u`` for every rounding of an
input or of the result. A test that uses them fails only when a path is wrong, not when a CPU
adds in another order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

U32 = 2.0 ** -24  # float32 unit roundoff
U64 = 2.0 ** -53  # float64 unit roundoff
U16 = 2.0 ** -11  # float16
UBF16 = 2.0 ** -8  # bfloat16


def gamma(k: int, unit: float = U32) -> float:
    """γ_k = k·u / (1 − k·u): the relative error bound of a k-term dot product."""
    assert k * unit < 0.5
    return k * unit / (1.0 - k * unit)


def weighted_sum_bound(arrays: Sequence[np.ndarray], weights: Sequence[float], *,
                       unit: float = U32, roundings: int = 2) -> np.ndarray:
    """Per-coordinate bound on the difference between two evaluations of
    ``Σ p_k x_k`` (``p = w / Σw``): one accumulating in ``unit`` precision in any order, the
    other exact (float64) and rounded once to ``unit``.

    ``γ_K`` for the K products and K−1 additions, plus ``roundings`` more ``u`` (rounding
    ``p_k`` to the accumulation dtype, rounding the exact result) — all relative to
    ``S = Σ p_k |x_k|``, and a 1 % allowance for second-order terms.
    """
    w = np.asarray(weights, dtype=np.float64)
    p = w / w.sum()
    s = sum(pk * np.abs(np.asarray(x, dtype=np.float64)) for pk, x in zip(p, arrays, strict=True))
    return (gamma(len(arrays), unit) + roundings * unit) * 1.01 * s


def assert_within(got: np.ndarray, want: np.ndarray, bound: np.ndarray | float,
                  what: str = "") -> None:
    """``|got − want| ≤ bound`` everywhere, reporting the worst coordinate against its bound."""
    diff = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64))
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), diff.shape)
    if diff.size and not np.all(diff <= bound):
        worst = np.unravel_index(np.argmax(diff - bound), diff.shape)
        raise AssertionError(f"{what}{list(worst)}: |got - want| = {diff[worst]:.3g} exceeds "
                             f"the derived bound {bound[worst]:.3g}")
