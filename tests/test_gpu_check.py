"""benchmarks/gpu_check.sh: without a CUDA device it says so, writes its JSON, and exits 0."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")
def test_gpu_check_without_cuda_exits_cleanly_saying_so(tmp_path):
    res = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "gpu_check: no CUDA device" in res.stdout
    assert "Traceback" not in res.stderr
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["status"] == "no-cuda" and doc["training"] == [] and doc["launches"] == []
    assert "Not run: no CUDA device" in (tmp_path / "RESULTS-gpu.md").read_text()


def test_gpu_check_results_section_lists_every_measurement():
    doc = {"time": "t", "device": "1 CUDA device(s): H200", "status": "ok",
           "versions": {"torch": "2.x", "flwr": "1.42"}, "skipped": ["launch GPU 0 + GPU 1"],
           "training": [{"name": "bf16", "knobs": {}, "weights_mb": 270.4,
                         "peak_cuda_mb": 2048.0, "tokens_per_s": 12345.6},
                        {"name": "nf4", "error": "ConfigError: no smollm2"}],
           "launches": [{"name": "2 nodes on GPU 0", "gpus": [0, 0], "completed": True,
                         "rounds": 2, "round_s": [3.1, 2.9],
                         "client_cuda_peak_mb": [{"0": 900.0}, {"0": 901.0, "1": 902.0}]}]}
    text = gpu_check.markdown(doc)
    assert "| bf16 | — | 270 | 2048 | 12346 |" in text
    assert "error: ConfigError: no smollm2" in text
    assert "| 2 nodes on GPU 0 | [0, 0] | True | 2 | [3.1, 2.9] | {'0': 901.0, '1': 902.0} |" \
        in text
    assert "skipped: launch GPU 0 + GPU 1" in text
