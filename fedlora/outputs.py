"""The run's output directory: ``config.json``, ``metrics.jsonl``, ``adapter/``."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig, to_flat

DEFAULT_RUNS = "fedlora-runs"  # under the home directory of the ServerApp's machine


def output_dir(cfg: RunConfig) -> Path:
    """``output-dir`` (absolute), else ``~/fedlora-runs/<timestamp>``."""
    if cfg.fl.output_dir:
        return Path(cfg.fl.output_dir).expanduser().resolve()
    # not the working directory: under `flwr run .` that is wherever Flower's SuperLink was
    # first started, not where the user typed the command
    return Path.home() / DEFAULT_RUNS / time.strftime("%Y%m%d-%H%M%S")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class RunOutputs:
    """Writes one run's files; each metrics line is flushed and synced as it is written."""

    def __init__(self, directory: Path, cfg: RunConfig, keep_rounds_upto: int | None = None
                 ) -> None:
        """``keep_rounds_upto``: resuming after that round — keep its metrics lines (and those
        before it), drop the lines of rounds that were in flight; ``None`` starts afresh."""
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        kept = ([r for r in read_metrics(self.dir) if r.get("round", 0) <= keep_rounds_upto]
                if keep_rounds_upto is not None and self.metrics_path.exists() else [])
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.metrics_path)
        (self.dir / "config.json").write_text(json.dumps(to_flat(cfg), indent=2, sort_keys=True))

    def log_round(self, record: Mapping[str, Any]) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(_clean(record), sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_json(self, name: str, payload: Mapping[str, Any]) -> Path:
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_clean(payload), indent=2))
        tmp.replace(path)
        return path

    @property
    def adapter_dir(self) -> Path:
        return self.dir / "adapter"


def rss_mb(peak: bool = False) -> float:
    """Resident memory of this process in MB, now or (``peak``) its high-water mark since it
    started (Linux /proc ``VmRSS`` / ``VmHWM``; 0.0 where unavailable)."""
    field = "VmHWM:" if peak else "VmRSS:"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def read_metrics(directory: str | Path) -> list[dict[str, Any]]:
    path = Path(directory) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
