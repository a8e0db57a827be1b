"""The server's global adapter between rounds (pure numpy, no Flower).

:class:`GlobalAdapter` holds what the next round sends: a view mapping a client's rank to its
factors (the initial adapter, then the latest :class:`~fedlora.aggregation.AggregationResult`),
the declared heads, and the log of base corrections of the rules that modify the frozen base
(``flora``, ``fedex``). Corrections are global — every client applies the same sequence — so a
client that skipped rounds catches up with :meth:`GlobalAdapter.correction_since` the version
it last applied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fedlora.aggregation import (
    AggregationResult,
    LoraFactors,
    ServerOptimizer,
    strategy_info,
    weighted_mean,
)
from fedlora.aggregation.linalg import factored_svd
from fedlora.aggregation.patterns import ModulePattern, module_rank, module_scale
from fedlora.aggregation.views import FreshInitView, PrefixView
from fedlora.learning.lora import LORA_A, LORA_B

View = Callable[[int | Mapping[str, int]], Mapping[str, LoraFactors]]


# ----------------------------------------------------------------------------- naming


def split_arrays(arrays: Mapping[str, np.ndarray], scale: float | Callable[[str, int], float]
                 ) -> tuple[dict[str, LoraFactors], dict[str, np.ndarray]]:
    """peft-named arrays → (LoRA factors per module, heads).

    ``scale`` is every module's scale, or ``scale(module, rank)`` for each module's own (per
    module ranks and alphas: :meth:`GlobalAdapter.scale_of`), ``rank`` being the rows of A."""
    factors: dict[str, LoraFactors] = {}
    heads: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if key.endswith(LORA_A):
            module = key[: -len(LORA_A)]
            s = scale(module, int(np.shape(value)[0])) if callable(scale) else scale
            factors[module] = LoraFactors(a=value, b=arrays[module + LORA_B], scale=s)
        elif not key.endswith(LORA_B):
            heads[key] = value
    return factors, heads


def join_arrays(factors: Mapping[str, LoraFactors], heads: Mapping[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
    """(factors, heads) → peft-named float32 arrays."""
    out: dict[str, np.ndarray] = {}
    for module, f in factors.items():
        out[module + LORA_A] = np.ascontiguousarray(f.a, dtype=np.float32)
        out[module + LORA_B] = np.ascontiguousarray(f.b, dtype=np.float32)
    for key, value in heads.items():
        out[key] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def stack(parts: Sequence[LoraFactors]) -> LoraFactors:
    """One scale-1 factor pair whose product is the sum of the parts' products."""
    b = np.concatenate([p.scale * p.b.astype(np.float64) for p in parts], axis=1)  # (m, R)
    a = np.concatenate([p.a.astype(np.float64) for p in parts], axis=0)  # (R, n)
    return compress(LoraFactors(a=a, b=b, scale=1.0))


def compress(f: LoraFactors, rtol: float = 1e-7) -> LoraFactors:
    """Exact re-factorisation through a factored SVD, dropping numerically zero directions.

    Keeps a growing correction at rank <= min(m, n): it never costs more than the dense matrix.
    """
    m, n = f.b.shape[0], f.a.shape[1]
    if f.rank <= min(m, n) // 2:
        return f
    u, s, vt = factored_svd(f.scale * f.b.astype(np.float64), f.a.astype(np.float64))
    keep = max(1, int((s > rtol * (s[0] if s.size else 0)).sum()))
    root = np.sqrt(s[:keep])
    return LoraFactors(a=root[:, None] * vt[:keep], b=u[:, :keep] * root[None, :], scale=1.0)


# ----------------------------------------------------------------------------- state


def initial_view(factors: Mapping[str, LoraFactors], lora_alpha: float, rslora: bool,
                 pattern: ModulePattern | None = None, base_init: bool = False) -> View:
    """Slices of the seeded initial adapter (built at the largest rank); under a rank pattern
    each module is sliced to its own rank for the client.

    With the default init (B = 0) a rank-``r`` client gets ``A[:r]``, ``B[:, :r]`` as they are.
    A base-dependent init (``base_init``: PiSSA, OLoRA) refolds the scale evenly,
    ``√c·A[:r]``, ``√c·B[:, :r]`` with ``c = s_R / s_r``, so that ``s_r·B A = s_R·B0[:, :r]
    A0[:r]``: the top ``r`` components of the init (for PiSSA exactly peft's own rank-``r``
    PiSSA init, up to the signs of singular vectors). The two are not combined (the config
    refuses a rank pattern with a base-dependent init)."""

    def view(client_rank: int | Mapping[str, int]) -> dict[str, LoraFactors]:
        out = {}
        for module, f in factors.items():
            rank = module_rank(pattern, module, client_rank)
            if rank > f.rank:
                raise ValueError(f"initial adapter has rank {f.rank} at {module}; a client "
                                 f"asked for {rank}")
            scale = module_scale(pattern, module, rank, lora_alpha, rslora)
            root = float(np.sqrt(f.scale / scale)) if base_init else 1.0
            out[module] = LoraFactors(a=f.a[:rank] * root, b=f.b[:, :rank] * root, scale=scale)
        return out

    return view


class GlobalAdapter:
    """What the server sends next round, and the base corrections it has applied so far.

    Parameters
    ----------
    factors
        Initial LoRA factors per module at the largest client rank (peft's seeded init).
    heads
        Initial declared heads (e.g. the classifier), shared by all ranks.
    lora_alpha, rslora
        Scaling of every client adapter.
    base_init
        ``factors`` are a base-dependent init (PiSSA, OLoRA: ``B0 A0 != 0``). Every node then
        holds the residual of its rank ``r``, ``W - s_R·B0[:, :r]·A0[:r]`` (:meth:`residual`),
        sent as base correction 1, so that its effective weight at round 0 is ``W`` whatever
        its rank. The server's global model is the rank-``R`` one; the upload of a lower-rank
        node is completed with the components it holds frozen (:meth:`fill_tail`).
    pattern
        Per-module ranks and alphas (``lora.rank-pattern`` / ``lora.alpha-pattern``), or
        ``None``.
    """

    def __init__(self, factors: Mapping[str, LoraFactors], heads: Mapping[str, np.ndarray],
                 lora_alpha: float, rslora: bool, pattern: ModulePattern | None = None,
                 base_init: bool = False) -> None:
        self.lora_alpha = lora_alpha
        self.rslora = rslora
        self.base_init = base_init
        self.pattern = pattern
        self.init_factors = dict(factors) if base_init else {}
        self.view: View = initial_view(factors, lora_alpha, rslora, pattern, base_init)
        self._view_kind = "initial"
        self.heads = dict(heads)
        self.result: AggregationResult | None = None
        self.adapter: dict[str, LoraFactors] = dict(factors)
        self.updates = 0  # aggregations adopted so far
        self.corrections: list[dict[str, LoraFactors]] = []

    @property
    def version(self) -> int:
        """Number of base corrections applied so far (the residual of a base init counts)."""
        return len(self.corrections) + int(self.base_init)

    @property
    def init_rank(self) -> int:
        """Rank ``R`` of the base-dependent init (0 without one)."""
        return max((f.rank for f in self.init_factors.values()), default=0)

    def residual(self, rank: int) -> dict[str, LoraFactors]:
        """The base correction that turns ``W`` into a rank-``rank`` node's residual,
        ``-s_R·B0[:, :r] @ A0[:r]`` as scale-1 factors (empty without a base init)."""
        if self.base_init and rank > self.init_rank:
            raise ValueError(f"the base-dependent init has rank {self.init_rank}; a client "
                             f"asked for {rank}")
        return {m: LoraFactors(a=f.a[:rank], b=-f.scale * f.b[:, :rank], scale=1.0)
                for m, f in self.init_factors.items()}

    def fill_tail(self, factors: Mapping[str, LoraFactors]) -> dict[str, LoraFactors]:
        """A rank-``r < R`` upload on a base init, completed to rank ``R`` with the components
        ``r..R`` that node holds frozen in its residual: ``A = [A_k; A0[r:]]``, ``B = [(s_r /
        s_R)·B_k, B0[:, r:]]`` at scale ``s_R``, so ``s_R·B A = s_r·B_k A_k + s_R·B0[:, r:]
        A0[r:]``: the node's model relative to the rank-``R`` residual, exactly."""
        if not self.base_init:
            return dict(factors)
        out = {}
        for module, f in factors.items():
            init = self.init_factors[module]
            if f.rank >= init.rank:
                out[module] = f
                continue
            a = np.concatenate([f.a, init.a[f.rank:]], axis=0)
            b = np.concatenate([f.b * (f.scale / init.scale), init.b[:, f.rank:]], axis=1)
            out[module] = LoraFactors(a=a.astype(f.a.dtype), b=b.astype(f.b.dtype),
                                      scale=init.scale)
        return out

    def arrays_for(self, rank: int) -> dict[str, np.ndarray]:
        """The adapter a client of ``rank`` loads (its own shapes and scale)."""
        return join_arrays(self.view(rank), self.heads)

    def scale_of(self, module: str, rank: int) -> float:
        """A client's scale of ``module`` trained at (module) rank ``rank``: its alpha (the
        alpha pattern's, else ``lora_alpha``) over ``rank`` (``sqrt(rank)`` under rsLoRA)."""
        return module_scale(self.pattern, module, rank, self.lora_alpha, self.rslora)

    def correction_since(self, version: int, rank: int | None = None
                         ) -> dict[str, LoraFactors]:
        """Sum of the corrections from ``version`` on, as compact scale-1 factors per module.
        With a base init, correction 1 is the residual of ``rank`` (default: the init's)."""
        if not 0 <= version <= self.version:
            raise ValueError(f"base version {version} is outside 0..{self.version}")
        log = self.correction_log()
        if self.base_init and rank is not None:
            log[0] = self.residual(rank)
        pending = log[version:]
        modules = sorted({m for c in pending for m in c})
        return {m: stack([c[m] for c in pending if m in c]) for m in modules}

    def apply(self, result: AggregationResult, heads: Mapping[str, np.ndarray],
              optimizer: ServerOptimizer | None = None, rank: int | None = None,
              frozen: str = "") -> None:
        """Adopt a round's aggregate (optionally through a server optimizer).

        The server optimizer never changes a frozen factor: those the rule froze
        (``result.frozen``) and those named in ``frozen`` (``"a"``/``"b"``: factors the
        clients did not send back this round, e.g. FedSA's B)."""
        info = strategy_info(result.strategy)
        if optimizer is not None and (rank is None or not info.linear or info.refactors):
            raise ValueError(f"server optimizers need a linear, equal-rank rule; "
                             f"{result.strategy!r} is not")
        if result.base_correction:
            self.corrections.append(dict(result.base_correction))
        adapter = dict(result.global_factors)
        view: View = result.client_view
        if optimizer is not None:
            previous = self.arrays_for(rank)
            aggregated = join_arrays(result.for_client(rank), heads)
            suffixes = tuple({"a": LORA_A, "b": LORA_B}[f]
                             for f in sorted(result.frozen | set(frozen)))
            frozen_keys = [k for k in aggregated if suffixes and k.endswith(suffixes)]
            new = optimizer.step(previous, aggregated, frozen=frozen_keys)
            adapter, heads = split_arrays(new, self.scale_of)
            view = _fixed_view(adapter, self.pattern)
        self.result = result
        self.adapter = adapter
        self.view = view
        self._view_kind = "fixed" if optimizer is not None else "result"
        self.heads = dict(heads)
        self.updates += 1

    def export_factors(self) -> dict[str, LoraFactors]:
        """Total ΔW relative to the original base, per module: every correction (with a base
        init, first the rank-``R`` residual) + the adapter."""
        if self.updates == 0 and not self.base_init:
            return {}
        out = {}  # a base init before any round: residual + init, ΔW = 0 up to rounding
        for module, g in self.adapter.items():
            parts = [c[module] for c in self.correction_log() if module in c]
            out[module] = stack([*parts, g])
        return out

    def correction_log(self) -> list[dict[str, LoraFactors]]:
        """The server's corrections in order (the rank-``R`` residual first with a base init)."""
        return ([self.residual(self.init_rank)] if self.base_init else []) + self.corrections


    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able state, named arrays) from which :meth:`from_state` rebuilds this adapter
        exactly: the same arrays (same dtypes) and the same view for every rank."""
        arrays: dict[str, np.ndarray] = {}
        state: dict[str, Any] = {"lora_alpha": self.lora_alpha, "rslora": self.rslora,
                                 "pattern": _pattern_state(self.pattern),
                                 "updates": self.updates, "view_kind": self._view_kind,
                                 "adapter": _put_factors(arrays, "adapter", self.adapter),
                                 "heads": sorted(self.heads),
                                 "corrections": [_put_factors(arrays, f"corr{i}", c)
                                                 for i, c in enumerate(self.corrections)],
                                 "base_init": self.base_init,
                                 "init": _put_factors(arrays, "init", self.init_factors)}
        for key, value in self.heads.items():
            arrays[f"head/{key}"] = value
        if self._view_kind == "result":
            view = self.view
            if isinstance(view, PrefixView):
                state["view"] = {"type": "prefix", "lora_alpha": view.lora_alpha,
                                 "rslora": view.rslora, "split": view.split,
                                 "fixed_rank": view.fixed_rank, "strategy": view.strategy,
                                 "seed": view.seed,
                                 "factors": _put_factors(arrays, "view", view.factors)}
            elif isinstance(view, FreshInitView):
                state["view"] = {"type": "fresh", "shapes": {m: list(s) for m, s in
                                                             view.shapes.items()},
                                 "lora_alpha": view.lora_alpha, "rslora": view.rslora,
                                 "seed": view.seed, "dtype": np.dtype(view.dtype).str}
            else:
                raise TypeError(f"cannot checkpoint a client view of type {type(view)}")
        return state, arrays

    @classmethod
    def from_state(cls, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
                   ) -> GlobalAdapter:
        """Rebuild a global adapter from :meth:`state_dict`'s ``(state, arrays)`` (a checkpoint)."""
        adapter = _get_factors(arrays, "adapter", state["adapter"])
        heads = {key: arrays[f"head/{key}"] for key in state["heads"]}
        pattern = _pattern_from(state.get("pattern"))
        glob = cls(adapter, heads, float(state["lora_alpha"]), bool(state["rslora"]),
                   base_init=bool(state.get("base_init", False)), pattern=pattern)
        glob.init_factors = _get_factors(arrays, "init", state.get("init", {}))
        glob.updates = int(state["updates"])
        glob.corrections = [_get_factors(arrays, f"corr{i}", c)
                            for i, c in enumerate(state["corrections"])]
        glob._view_kind = state["view_kind"]
        if glob._view_kind == "fixed":
            glob.view = _fixed_view(adapter, pattern)
        elif glob._view_kind == "result":
            v = state["view"]
            if v["type"] == "prefix":
                glob.view = PrefixView(_get_factors(arrays, "view", v["factors"]),
                                       v["lora_alpha"], v["rslora"], v["split"],
                                       v["fixed_rank"], v["strategy"], int(v.get("seed", 0)),
                                       pattern)
            else:
                glob.view = FreshInitView({m: tuple(s) for m, s in v["shapes"].items()},
                                          v["lora_alpha"], v["rslora"], v["seed"],
                                          np.dtype(v["dtype"]), pattern)
        return glob


def _put_factors(arrays: dict[str, np.ndarray], prefix: str,
                 factors: Mapping[str, LoraFactors]) -> dict[str, float]:
    """Store factors as ``prefix/module/a|b``; returns the scales (JSON)."""
    for module, f in factors.items():
        arrays[f"{prefix}/{module}/a"] = f.a
        arrays[f"{prefix}/{module}/b"] = f.b
    return {module: float(f.scale) for module, f in factors.items()}


def _get_factors(arrays: Mapping[str, np.ndarray], prefix: str, scales: Mapping[str, float]
                 ) -> dict[str, LoraFactors]:
    return {m: LoraFactors(a=arrays[f"{prefix}/{m}/a"], b=arrays[f"{prefix}/{m}/b"],
                           scale=float(scale)) for m, scale in scales.items()}


def _fixed_view(factors: Mapping[str, LoraFactors], pattern: ModulePattern | None = None
                ) -> View:
    def view(rank: int | Mapping[str, int]) -> dict[str, LoraFactors]:
        for module, f in factors.items():
            if f.rank != module_rank(pattern, module, rank):
                raise ValueError(f"global adapter has rank {f.rank} at {module}; a client of "
                                 f"rank {rank} cannot load it")
        return dict(factors)

    return view


def _pattern_state(pattern: ModulePattern | None) -> dict[str, Any] | None:
    """A rank/alpha pattern as JSON (``None`` stays ``None``)."""
    if pattern is None:
        return None
    return {"reference_rank": pattern.reference_rank, "ranks": [list(p) for p in pattern.ranks],
            "alphas": [list(p) for p in pattern.alphas]}


def _pattern_from(state: Mapping[str, Any] | None) -> ModulePattern | None:
    if state is None:
        return None
    return ModulePattern(int(state["reference_rank"]),
                         tuple((str(k), int(v)) for k, v in state["ranks"]),
                         tuple((str(k), float(v)) for k, v in state["alphas"]))


def aggregate_heads(heads: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
                    ) -> dict[str, np.ndarray]:
    """Example-weighted FedAvg of the declared heads."""
    if not heads or not heads[0]:
        return {}
    return {key: weighted_mean([h[key] for h in heads], weights).astype(np.float32)
            for key in sorted(heads[0])}
