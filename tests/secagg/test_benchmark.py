"""Smoke test of the secure-aggregation micro-benchmark (quick mode)."""

from __future__ import annotations

from benchmarks.secagg import run


def test_quick_benchmark_reports_throughput_and_upload_size() -> None:
    result = run(quick=True)
    assert result["ours_gb_s"] > 0 and result["peer_gb_s"] > 0 and result["encode_gb_s"] > 0
    assert 4.0 <= result["bytes_per_param"] < 4.001
