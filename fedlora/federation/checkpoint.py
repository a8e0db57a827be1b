"""Atomic, verifiable checkpoints of the server's state — no pickle anywhere.

A checkpoint is a directory ``OUT/checkpoints/round-000007/`` holding

* ``arrays.safetensors`` — every array (global adapter, view factors, heads, base corrections,
  server-optimizer buffers) under a flat name, with its exact dtype;
* ``state.json`` — everything else (round, scales, view parameters, counters, config digest);
* ``manifest.json`` — SHA-256 and size of the two files above, written last.

It is written into a temporary sibling directory, every file fsync'ed, then renamed into place
(and the parent directory fsync'ed), so a crash leaves either the whole checkpoint or none. On
load, a checkpoint whose manifest is missing or whose files do not match it (truncated,
corrupted) is skipped with a warning and the previous one is used. The last ``keep`` are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedlora.errors import FedLoraError

FORMAT = 1
ARRAYS, STATE, MANIFEST = "arrays.safetensors", "state.json", "manifest.json"
_NAME = re.compile(r"^round-(\d{6})$")


class CheckpointError(FedLoraError):
    """No usable checkpoint, or one that does not belong to this run."""


@dataclass
class Checkpoint:
    """One loaded server checkpoint: its round, JSON state, arrays and directory."""
    round: int
    state: dict[str, Any]
    arrays: dict[str, np.ndarray]
    path: Path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: Path, round_: int, state: Mapping[str, Any],
         arrays: Mapping[str, np.ndarray], keep: int = 2) -> Path:
    """Write the checkpoint of ``round_`` atomically; prune all but the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"round-{round_:06d}"
    tmp = directory / f".tmp-round-{round_:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    save_file(contiguous, str(tmp / ARRAYS))
    (tmp / STATE).write_text(json.dumps({"format": FORMAT, "round": round_, **state},
                                        sort_keys=True))
    for name in (ARRAYS, STATE):
        _fsync_file(tmp / name)
    manifest = {"format": FORMAT, "round": round_,
                "files": {name: {"sha256": _sha256(tmp / name),
                                 "bytes": (tmp / name).stat().st_size}
                          for name in (ARRAYS, STATE)}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(directory)
    for old in checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, oldest first."""
    if not directory.exists():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def verify(path: Path) -> str | None:
    """``None`` when the checkpoint at ``path`` is intact, else what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"manifest unreadable ({exc.__class__.__name__})"
    for name, meta in manifest.get("files", {}).items():
        file = path / name
        if not file.exists():
            return f"{name} is missing"
        if file.stat().st_size != meta["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(file) != meta["sha256"]:
            return f"{name} does not match its SHA-256"
    if set(manifest.get("files", {})) != {ARRAYS, STATE}:
        return "manifest does not list the checkpoint's files"
    return None


def load_latest(directory: Path, warn=print) -> Checkpoint | None:
    """The newest intact checkpoint (corrupted newer ones are reported and skipped)."""
    for path in reversed(checkpoints(directory)):
        problem = verify(path)
        if problem:
            warn(f"checkpoint {path.name} is unusable ({problem}); trying the previous one")
            continue
        state = json.loads((path / STATE).read_text())
        if state.get("format") != FORMAT:
            warn(f"checkpoint {path.name} has format {state.get('format')}, expected {FORMAT}")
            continue
        return Checkpoint(int(state["round"]), state, dict(load_file(str(path / ARRAYS))), path)
    return None


def config_digest(flat: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """SHA-256 of a flat config (minus keys that may change between attempts)."""
    kept = {k: v for k, v in sorted(flat.items()) if k not in ignore}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
