"""The run's output directory: ``config.json``, ``metrics.jsonl``, ``adapter/``."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
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
        """Append ``record`` as one line of ``metrics.jsonl`` and fsync it."""
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(_clean(record), sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_json(self, name: str, payload: Mapping[str, Any]) -> Path:
        """Write ``payload`` to ``<run dir>/<name>`` atomically (temporary file, then rename)."""
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_clean(payload), indent=2))
        tmp.replace(path)
        return path

    @property
    def adapter_dir(self) -> Path:
        """Where the global adapter is saved in PEFT format: ``<run dir>/adapter``."""
        return self.dir / "adapter"


_LIFETIME_PEAK_MB = 0.0  # the high-water mark before the last reset (start_peak_window)


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mb(peak: bool = False) -> float:
    """Resident memory of this process in MB, now or (``peak``) its high-water mark since it
    started (Linux /proc ``VmRSS`` / ``VmHWM``, across :func:`start_peak_window` resets; 0.0
    where unavailable)."""
    if not peak:
        return _status_mb("VmRSS:") or 0.0
    return max(_LIFETIME_PEAK_MB, _status_mb("VmHWM:") or 0.0)


def start_peak_window() -> bool:
    """Start measuring a new peak (:func:`window_peaks`): reset the kernel's resident-memory
    high-water mark (``5`` to ``/proc/self/clear_refs``, Linux) and torch's CUDA peak
    statistics. Returns whether the RSS mark could be reset (not outside Linux, or where
    /proc is read-only); :func:`rss_mb` keeps the lifetime peak either way."""
    global _LIFETIME_PEAK_MB
    _LIFETIME_PEAK_MB = rss_mb(peak=True)
    torch = sys.modules.get("torch")  # the server never imports torch for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def window_peaks(rss_reset: bool) -> dict[str, float]:
    """Peak memory since :func:`start_peak_window`: ``round-peak-rss-mb`` (when the RSS mark
    was reset) and ``cuda-peak-mb``, the most bytes torch allocated at once on any GPU of this
    process (torch's caching allocator reserves somewhat more; where CUDA is in use)."""
    out: dict[str, float] = {}
    if rss_reset:
        out["round-peak-rss-mb"] = _status_mb("VmHWM:") or 0.0
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda-peak-mb"] = max(torch.cuda.max_memory_allocated(i)
                                  for i in range(torch.cuda.device_count())) / 2**20
    return out


def client_memory(metrics: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The round's per-client peaks for ``metrics.jsonl``: ``client_round_peak_rss_mb`` and
    ``client_cuda_peak_mb`` map each reporting client's partition id to its peak in MB (its
    train message, load and training), with the largest as ``..._max``."""
    out: dict[str, Any] = {}
    metrics = list(metrics)
    for key, name in (("round-peak-rss-mb", "client_round_peak_rss_mb"),
                      ("cuda-peak-mb", "client_cuda_peak_mb")):
        per = {str(int(m.get("partition-id", -1))): round(float(m[key]), 1)
               for m in metrics if isinstance(m.get(key), int | float)}
        if per:
            out[name] = per
            out[name + "_max"] = max(per.values())
    return out


def read_metrics(directory: str | Path) -> list[dict[str, Any]]:
    """The records of ``directory/metrics.jsonl`` in order (``[]`` when it does not exist)."""
    path = Path(directory) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
