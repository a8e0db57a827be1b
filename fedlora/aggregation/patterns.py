"""Per-module LoRA ranks and alphas (peft's ``rank_pattern`` / ``alpha_pattern``).

A pattern maps keys to values, e.g. ``{"query": 16, "value": 4}``. A key matches a module
name when the name *ends* in it after a dot (or is it), the key read as a regular expression:
``re.match(rf"(.*\\.)?({key})$", name)``, the rule peft applies; the first matching key (in
the order given) wins, and a module no key matches keeps the adapter's ``r`` / ``lora_alpha``.

How a client's own rank combines with the pattern (:meth:`ModulePattern.rank`): the pattern's
ranks are those of a client at the *reference rank* ``R`` (``lora.r``), so at ``r_k = R`` a
client's adapter is exactly peft's ``LoraConfig(r=R, rank_pattern=…)``. A client of rank
``r_k`` scales every patterned rank in proportion, rounded up:
``r_{k,m} = ceil(p_m · r_k / R)`` (``>= 1`` always), and unmatched modules get ``r_k``. So
the ratio between modules is kept for every client, a smaller client is smaller in every
module, and the ranks are monotone in ``r_k`` (a rank-2 client's module is a prefix of a
rank-8 client's, which the prefix views need). Alphas are absolute (``lora_alpha`` does not
depend on the rank): module ``m`` of any client scales by ``alpha_m / r_{k,m}``
(``alpha_m / sqrt(r_{k,m})`` under rsLoRA).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fedlora.aggregation.scaling import scale_for_rank


def parse_pattern(text: str, kind: type = int) -> tuple[tuple[str, int | float], ...]:
    """``"query=16,value=4"`` → ``(("query", 16), ("value", 4))``, in the order written.

    Each value must be a positive ``kind`` (``int`` ranks, ``float`` alphas), each key a valid
    regular expression named once; keys cannot hold ``,`` or ``=``. Raises ``ValueError``."""
    out: dict[str, int | float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = (x.strip() for x in part.partition("="))
        try:
            number = kind(value)
        except ValueError:
            number = None
        if not sep or not name or number is None or not math.isfinite(number) or number <= 0:
            what = "a positive integer" if kind is int else "a positive number"
            raise ValueError(f"each entry must be module=value with {what}, like "
                             f"'query=16,value=4'; got {part!r}")
        try:
            re.compile(name)
        except re.error as exc:
            raise ValueError(f"{name!r} is not a valid regular expression ({exc}); name a "
                             f"module suffix like 'query' or 'layer\\.0\\.query'") from None
        if name in out:
            raise ValueError(f"module {name!r} is given twice; give it once")
        out[name] = number
    return tuple(out.items())


def match_key(keys: Iterable[str], module: str) -> str | None:
    """The first key of ``keys`` matching ``module`` (peft's suffix-regex rule), or ``None``."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class ModulePattern:
    """Per-module ranks (at the reference rank) and alphas.

    Parameters
    ----------
    reference_rank
        ``R``: the client rank at which ``ranks`` apply as given (``lora.r``).
    ranks
        ``(key, rank)`` pairs, in matching order; ranks positive integers.
    alphas
        ``(key, alpha)`` pairs, in matching order; alphas positive and finite.
    """

    reference_rank: int
    ranks: tuple[tuple[str, int], ...] = ()
    alphas: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.reference_rank, bool) or int(self.reference_rank) < 1:
            raise ValueError(f"reference_rank must be a positive integer, got "
                             f"{self.reference_rank!r}")
        for key, value in self.ranks:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"rank pattern {key!r}: rank must be a positive integer, got "
                                 f"{value!r}")
        for key, value in self.alphas:
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"alpha pattern {key!r}: alpha must be positive and finite, "
                                 f"got {value!r}")

    def rank(self, module: str, client_rank: int) -> int:
        """Rank of ``module`` for a client of rank ``client_rank``:
        ``ceil(p_m · r_k / R)``, or ``r_k`` when no rank key matches."""
        key = match_key((k for k, _ in self.ranks), module)
        if key is None:
            return int(client_rank)
        pattern = dict(self.ranks)[key]
        return max(1, -(-pattern * int(client_rank) // self.reference_rank))

    def alpha(self, module: str, default: float) -> float:
        """``lora_alpha`` of ``module``: its alpha-pattern value, else ``default``."""
        key = match_key((k for k, _ in self.alphas), module)
        return float(default) if key is None else float(dict(self.alphas)[key])

    def scaled_ranks(self, client_rank: int) -> tuple[tuple[str, int], ...]:
        """The rank pattern of a client of rank ``client_rank`` (the keys, scaled ranks)."""
        return tuple((key, max(1, -(-p * int(client_rank) // self.reference_rank)))
                     for key, p in self.ranks)


def module_rank(pattern: ModulePattern | None, module: str, rank: int | Mapping[str, int]
                ) -> int:
    """Rank of ``module`` for a client given by its rank (an int, combined with ``pattern``)
    or directly by its per-module ranks (a mapping)."""
    if isinstance(rank, Mapping):
        return int(rank[module])
    return int(rank) if pattern is None else pattern.rank(module, rank)


def module_scale(pattern: ModulePattern | None, module: str, rank: int, lora_alpha: float,
                 rslora: bool) -> float:
    """LoRA scale of ``module`` at (module) rank ``rank``: ``alpha_m / rank`` (rsLoRA:
    ``alpha_m / sqrt(rank)``), ``alpha_m`` from the alpha pattern or ``lora_alpha``."""
    alpha = lora_alpha if pattern is None else pattern.alpha(module, lora_alpha)
    return scale_for_rank(rank, alpha, rslora)


def check_client_rank(rank: int | Mapping[str, int]) -> None:
    """Reject a client rank that is neither a positive int nor a mapping of positive ints."""
    values = rank.values() if isinstance(rank, Mapping) else [rank]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"rank must be a positive integer (or module -> positive "
                             f"integer), got {rank!r}")
