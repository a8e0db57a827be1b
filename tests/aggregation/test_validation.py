"""validate_update: one case per reason code, no broadcasting."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import (
    ClientUpdate,
    LoraFactors,
    UpdateRejected,
    aggregate,
    validate_update,
)
from fedlora.aggregation.validation import check_shared_factor

EXPECTED = {"q": (6, 5), "v": (4, 7)}  # module -> (out, in)


def good(rank: int = 4) -> dict[str, LoraFactors]:
    rng = np.random.default_rng(0)
    return {
        m: LoraFactors(a=rng.normal(size=(rank, n)), b=rng.normal(size=(o, rank)), scale=4.0)
        for m, (o, n) in EXPECTED.items()
    }


def with_q(**changes: object) -> dict[str, LoraFactors]:
    factors = good()
    q = factors["q"]
    factors["q"] = LoraFactors(
        a=changes.get("a", q.a), b=changes.get("b", q.b), scale=changes.get("scale", q.scale)
    )
    return factors


def set_first(x: np.ndarray, value: float) -> np.ndarray:
    x = x.copy()
    x[0, 0] = value
    return x


def case(
    factors: dict[str, LoraFactors], reason: str, label: str, n: object = 5, **options: object
) -> object:
    return pytest.param(ClientUpdate(factors, n), options, reason, id=label)  # type: ignore[arg-type]


NAN_A = with_q(a=set_first(good()["q"].a, np.nan))
INF_B = with_q(b=set_first(good()["q"].b, np.inf))
CASES = [
    case(with_q(a=np.zeros((4, 6))), "SHAPE_MISMATCH", "wrong in_features"),
    case(with_q(b=np.zeros((7, 4))), "SHAPE_MISMATCH", "wrong out_features"),
    case(with_q(a=np.zeros((1, 5))), "SHAPE_MISMATCH", "broadcastable A (1, n)"),
    case(with_q(a=np.zeros((5, 4))), "SHAPE_MISMATCH", "transposed A"),
    case(with_q(b=np.zeros(6)), "SHAPE_MISMATCH", "1-D B"),
    case(with_q(a=np.zeros((0, 5)), b=np.zeros((6, 0))), "SHAPE_MISMATCH", "rank zero"),
    case(good(8), "RANK_TOO_LARGE", "rank above max", max_rank=4),
    case(good(4), "RANK_MISMATCH", "declared rank differs", declared_rank=8),
    case({"q": good()["q"]}, "MISSING_MODULES", "missing module"),
    case({**good(), "k": good()["q"]}, "EXTRA_MODULES", "extra module"),
    case(NAN_A, "NON_FINITE", "NaN in A"),
    case(INF_B, "NON_FINITE", "Inf in B"),
    case(with_q(a=np.zeros((4, 5), dtype=np.int64)), "BAD_DTYPE", "int dtype"),
    case(with_q(b=np.zeros((6, 4), dtype=complex)), "BAD_DTYPE", "complex dtype"),
    case(with_q(a=[[0.0] * 5] * 4), "BAD_DTYPE", "list instead of array"),
    case(good(), "BAD_EXAMPLE_COUNT", "zero examples", n=0),
    case(good(), "BAD_EXAMPLE_COUNT", "negative examples", n=-3),
    case(good(), "BAD_EXAMPLE_COUNT", "float examples", n=5.0),
    case(good(), "BAD_EXAMPLE_COUNT", "bool examples", n=True),
    case(with_q(scale=0.0), "BAD_SCALE", "zero scale"),
    case(with_q(scale=float("nan")), "BAD_SCALE", "NaN scale"),
]


@pytest.mark.parametrize(("update", "options", "reason"), CASES)
def test_validate_update_rejects_with_reason(
    update: ClientUpdate, options: dict[str, object], reason: str
) -> None:
    with pytest.raises(UpdateRejected) as info:
        validate_update(update, EXPECTED, **{"max_rank": 16, **options})  # type: ignore[arg-type]

    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("rank", [1, 4, 5])
def test_validate_update_accepts_ranks_up_to_the_boundary(rank: int) -> None:
    update = ClientUpdate(good(rank), np.int64(3))

    assert validate_update(update, EXPECTED, max_rank=5, declared_rank=rank) is None
    # ... and the boundary is where it says: one rank more is refused
    with pytest.raises(UpdateRejected) as info:
        validate_update(ClientUpdate(good(6), 3), EXPECTED, max_rank=5, declared_rank=6)
    assert info.value.reason == "RANK_TOO_LARGE"


def test_shape_message_says_expected_got_and_what_to_change() -> None:
    update = ClientUpdate(with_q(a=np.zeros((1, 5))), 5, client_id="node-7")

    with pytest.raises(UpdateRejected) as info:
        validate_update(update, EXPECTED, max_rank=None)

    message = str(info.value)
    assert "node-7" in message and "'q'" in message
    assert "(r, 5)" in message and "(1, 5)" in message and "never broadcast" in message
    assert info.value.client_id == "node-7" and info.value.module == "q"


def test_float16_and_float32_factors_are_accepted() -> None:
    factors = {m: f.astype(np.float16) for m, f in good().items()}
    factors["v"] = factors["v"].astype(np.float32)
    update = ClientUpdate(factors, 5)

    assert validate_update(update, EXPECTED, max_rank=None) is None
    # accepted as they are: aggregating them gives their values (float16 → float64 is exact)
    result = aggregate("fedit", [update])
    for module, f in factors.items():
        g = result.global_factors[module]
        assert np.array_equal(g.b * (g.scale / f.scale), f.b.astype(np.float64))
        assert np.array_equal(g.a, f.a.astype(np.float64))


def test_shared_factor_check_allows_the_tolerance_and_names_the_client() -> None:
    base = good()["q"]
    same = LoraFactors(a=base.a * (1 + 1e-9), b=base.b, scale=4.0)
    moved = LoraFactors(a=base.a + 0.1, b=base.b, scale=4.0)

    check_shared_factor(
        [base, same], "a", module="q", client_ids=[None, "x"], rule="ffa", rtol=1e-6
    )
    with pytest.raises(UpdateRejected, match="'y'"):
        check_shared_factor(
            [base, moved], "a", module="q", client_ids=[None, "y"], rule="ffa", rtol=1e-6
        )
