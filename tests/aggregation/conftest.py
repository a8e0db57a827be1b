"""Fixtures shared by the aggregation tests.

Tolerances in these tests (audited): the rules and their references compute in float64 on
O(1) Gaussian inputs with at most 64 terms per dot product (ranks ≤ 16, ≤ 8 clients), so two
evaluations in different orders differ by at most γ_64 ≈ 7e-15 relative to Σ|terms| (Higham
§3.1); SVD-based paths (flexlora, linalg) add κ·n·u ≈ 1e-13 for these well-conditioned
random matrices. Every ``rtol``/``atol`` here is ≥ 1e-12, i.e. ≥ 100× those bounds, and
float32 inputs (``dtype=np.float32``) use ≥ 1e-6 ≈ 16·u32. A comparison that mixes paths in
float32 uses ``tests/tolerances.py`` instead.
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
