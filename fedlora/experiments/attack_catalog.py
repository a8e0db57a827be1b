"""The attack catalog: every attack's name, family, summary and where it can act.

Separate from :mod:`fedlora.experiments.attacks` (what the attacks do, a Flower client mod) because
the run
configuration checks a named attack when it is built (``RunConfig.__post_init__`` calls
:func:`check`), and the configuration must not depend on the ClientApp, the wire formats and
the secure-aggregation client that the attacks themselves use. The catalog reads a
configuration through :class:`RunView` and imports nothing of ``fedlora.config``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedlora.errors import ConfigError

PROTOCOL, POISONING, SECURE = "protocol", "poisoning", "secure"


class RunView(Protocol):
    """The parts of a :class:`fedlora.config.RunConfig` that the applicability checks read."""

    @property
    def fl(self) -> Any:
        """The federation keys (``attack``, ``attackers``, ``secure-aggregation``, ...)."""
        ...

    @property
    def model(self) -> Any:
        """The model keys (``model.task``)."""
        ...

    @property
    def lora(self) -> Any:
        """The adapter keys (``lora.modules-to-save``)."""
        ...


@dataclass(frozen=True)
class Attack:
    """One attack: its family, a one-line description and where it can act.

    ``applies(cfg)`` returns ``""`` when the attack can act under ``cfg``, else why not.
    """

    name: str
    family: str
    summary: str
    applies: Callable[[RunView], str]


def _plain_or_secure(cfg: RunView) -> str:
    return ""


def _plain_only(cfg: RunView) -> str:
    if cfg.fl.secure_aggregation:
        return ("it edits the clear-text 'arrays' reply, which a secure round never sends; "
                "use huge-header or malformed-array (they also hit the masked input)")
    return ""


def _federated_eval(cfg: RunView) -> str:
    if cfg.fl.fraction_evaluate > 0 or cfg.fl.strategy == "fedsa":
        return ""
    return ("it answers federated evaluation, which this run never asks for; set "
            "fraction-evaluate > 0")


def _secure_only(cfg: RunView) -> str:
    if not cfg.fl.secure_aggregation:
        return "it attacks the secure-aggregation protocol; set secure-aggregation = true"
    return ""


def _poisoning(cfg: RunView) -> str:
    if cfg.fl.secure_aggregation and cfg.fl.strategy == "hetlora":
        return ("secure hetlora uploads norm-weighted, padded factors, not received + Δ; "
                "poison a plain hetlora run or a secure fedit/ffa/fedsa/rolora one")
    return ""


def _weighted(cfg: RunView) -> str:
    if cfg.fl.dp_mode != "off":
        return (f"with dp-mode = {cfg.fl.dp_mode!r} every update weighs the same, so a declared "
                "example count changes nothing; use dp-mode = 'off'")
    return _poisoning(cfg)


def _has_heads(cfg: RunView) -> str:
    if cfg.model.task == "seq-cls" or cfg.lora.modules_to_save_list:
        return _poisoning(cfg)
    return ("this run uploads no head (causal-lm without lora.modules-to-save); poison the "
            "factors instead (scale, noise, sign-flip)")


ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("malformed-array", PROTOCOL, "truncates the .npy body of its first uploaded array "
           "(the masked input in secure rounds)", _plain_or_secure),
    Attack("huge-header", PROTOCOL, "sends an array whose .npy header declares 2^42 elements "
           "over 16 bytes of data (the masked input in secure rounds)", _plain_or_secure),
    Attack("wrong-record-type", PROTOCOL, "puts a ConfigRecord where its 'arrays' ArrayRecord "
           "belongs", _plain_only),
    Attack("bad-metrics", PROTOCOL, "reports list-valued rss-mb and train-cpu-s metrics",
           _plain_or_secure),
    Attack("bad-discovery", PROTOCOL, "answers the capability query without caps, with "
           "partition-id 'x', or with a rank above max-rank (by attacker, in turn)",
           _plain_or_secure),
    Attack("bad-eval-count", PROTOCOL, "answers federated evaluation with num-examples = -20 and "
           "no eval metrics", _federated_eval),
    Attack("sign-flip", POISONING, "sends received - Δ: its update reversed", _poisoning),
    Attack("scale", POISONING, "sends received + attack-scale × Δ", _poisoning),
    Attack("noise", POISONING, "sends received + Gaussian noise of attack-scale × the RMS of "
           "its honest Δ, per tensor", _poisoning),
    Attack("free-rider", POISONING, "sends back exactly the adapter it received", _poisoning),
    Attack("head-poison", POISONING, "sets every uploaded head value to 1e30", _has_heads),
    Attack("weight-inflation", POISONING, "declares the largest example count the server "
           "accepts (max-examples, or secagg-max-weight)", _weighted),
    Attack("low-order-key", SECURE, "advertises the low-order X25519 point u = 0 as its "
           "encryption key", _secure_only),
    Attack("forged-shares", SECURE, "sends random share ciphertexts of the right length to "
           "every neighbour", _secure_only),
    Attack("shifted-share", SECURE, "adds 1 to every self-mask share it reveals at unmasking",
           _secure_only),
    Attack("bad-weight-word", SECURE, "shifts its masked weight word so that the summed weight "
           "is one level (equal weights) and adds 2^30 to every masked coordinate",
           _secure_only),
)}


def describe() -> list[str]:
    """One line per attack: name, family, what it does (``fedlora attacks``)."""
    return [f"{a.name:18} {a.family:10} {a.summary}" for a in ATTACKS.values()]


def parse_attackers(text: str) -> tuple[int | None, tuple[int, ...]]:
    """``attackers`` → (a count, or ``None``; the listed partition ids, or ``()``)."""
    text = text.strip()
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return count, ()
        ids = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
        if not ids or min(ids) < 0:
            raise ValueError
        return None, ids
    except ValueError:
        raise ConfigError(
            f"attackers must be a count of attacking clients ('2' = partitions 0 and 1) or "
            f"partition ids with a comma ('3,7', or '5,' for partition 5 alone); got {text!r}"
        ) from None


def check(cfg: RunView) -> None:
    """Refuse an unknown attack, missing attackers, or an attack that cannot act under ``cfg``."""
    fl = cfg.fl
    if not fl.attack:
        if fl.attackers:
            raise ConfigError(f"attackers = {fl.attackers!r} but no attack is named; set attack "
                              f"to one of {', '.join(ATTACKS)} (or drop attackers)")
        return
    if fl.attack not in ATTACKS:
        raise ConfigError(f"unknown attack {fl.attack!r}; choose one of {', '.join(ATTACKS)} "
                          f"(`fedlora attacks` says what each does)")
    if not fl.attackers:
        raise ConfigError(f"attack = {fl.attack!r} needs attackers: a count ('1') or partition "
                          f"ids ('3,7')")
    parse_attackers(fl.attackers)
    why = ATTACKS[fl.attack].applies(cfg)
    if why:
        raise ConfigError(f"attack {fl.attack!r} does not apply to this run: {why}")
    if not np.isfinite(fl.attack_scale) or fl.attack_scale <= 0:
        raise ConfigError(f"attack-scale must be a finite number > 0; got {fl.attack_scale}")


def attacking_partitions(cfg: RunView, num_partitions: int) -> frozenset[int]:
    """The partitions that attack, among ``num_partitions``."""
    if not cfg.fl.attack:
        return frozenset()
    count, ids = parse_attackers(cfg.fl.attackers)
    if count is not None:
        if count >= num_partitions:
            raise ConfigError(f"attackers = {count} leaves no honest client among "
                              f"{num_partitions}; use fewer attackers")
        return frozenset(range(count))
    outside = [i for i in ids if i >= num_partitions]
    if outside:
        raise ConfigError(f"attackers lists partitions {outside}, but the federation has "
                          f"partitions 0..{num_partitions - 1}")
    return frozenset(ids)


def refuse_in_deployment(flat: Mapping[str, Any]) -> None:
    """Attacks are a simulation feature: a deployment's nodes are real participants."""
    if flat.get("attack"):
        raise ConfigError(f"attack = {flat['attack']!r} is for simulations (fedlora run, "
                          f"fedlora experiment); a deployment's nodes are real participants. "
                          f"Drop attack and attackers from the run config")
