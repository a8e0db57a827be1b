"""Typed reading of the plain-data snapshot a :class:`~fedlora.privacy.secagg.SecAggClient`
keeps between stages (:meth:`~fedlora.privacy.secagg.SecAggClient.snapshot`)."""

from __future__ import annotations

from collections.abc import Mapping

from fedlora.privacy.secagg.errors import ProtocolError

#: A client's state between stages: ints, bytes and lists of them (no objects), so that it fits
#: Flower's ``context.state``.
Snapshot = dict[str, int | bytes | list[int] | list[bytes]]


class SnapshotReader:
    """Typed access to a snapshot mapping, raising ``BAD_SNAPSHOT`` on any mismatch."""

    def __init__(self, snapshot: Mapping[str, object]) -> None:
        self._snapshot = snapshot

    def _get(self, key: str) -> object:
        if key not in self._snapshot:
            raise ProtocolError("BAD_SNAPSHOT", f"the snapshot has no {key!r}; use snapshot()")
        return self._snapshot[key]

    def get_int(self, key: str) -> int:
        """``snapshot[key]`` as an int (not a bool)."""
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError("BAD_SNAPSHOT", f"snapshot[{key!r}] must be an int, got {value!r}")
        return value

    def get_bytes(self, key: str) -> bytes:
        """``snapshot[key]`` as bytes."""
        value = self._get(key)
        if not isinstance(value, bytes):
            raise ProtocolError("BAD_SNAPSHOT", f"snapshot[{key!r}] must be bytes")
        return value

    def get_ints(self, key: str) -> list[int]:
        """``snapshot[key]`` as a list of ints."""
        value = self._get(key)
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ProtocolError("BAD_SNAPSHOT", f"snapshot[{key!r}] must be a list of ints")
        return list(value)

    def get_bytes_list(self, key: str) -> list[bytes]:
        """``snapshot[key]`` as a list of bytes."""
        value = self._get(key)
        if not isinstance(value, list | tuple) or not all(isinstance(v, bytes) for v in value):
            raise ProtocolError("BAD_SNAPSHOT", f"snapshot[{key!r}] must be a list of bytes")
        return list(value)

    def columns(self, ids: str, first: str, second: str) -> list[tuple[int, bytes, bytes]]:
        """The lists ``ids``, ``first`` and ``second`` zipped into rows (of equal length)."""
        columns = self.get_ints(ids), self.get_bytes_list(first), self.get_bytes_list(second)
        if len({len(column) for column in columns}) != 1:
            raise ProtocolError(
                "BAD_SNAPSHOT", f"snapshot lists {ids!r}, {first!r}, {second!r} differ in length"
            )
        return list(zip(*columns, strict=True))
