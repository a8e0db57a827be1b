"""Field and check helpers shared by the run-config dataclasses (:mod:`fedlora.config`,
:mod:`fedlora.federation_config`)."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from fedlora.errors import ConfigError


def help_field(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best in the tables
    """A dataclass field with ``default`` and the ``help`` text `fedlora config` prints."""
    return field(default=default, metadata={"help": help})


def csv_items(text: str) -> tuple[str, ...]:
    """The non-empty, stripped items of a comma-separated value (``" a, ,b"`` -> ``("a", "b")``)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` naming ``key`` and ``choices`` unless ``value`` is one of them."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def check_positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value > 0`` (``>= 0`` with ``zero_ok``)."""
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{key} must be {bound}; got {value!r}")
