"""Tests of benchmarks.scale's arithmetic: summaries, fitted growth, ratios, table and plot."""

from __future__ import annotations

import pytest

from benchmarks import scale


def _records(durations: list[float], server: list[float], worker: list[float]) -> list[dict]:
    out = [{"round": 0, "duration_s": 0.0, "discover_s": 4.0, "server_peak_rss_mb": server[0]}]
    for i, (d, s, w) in enumerate(zip(durations, server[1:], worker, strict=True), start=1):
        out.append({"round": i, "duration_s": d, "server_cpu_s": d / 2, "client_cpu_s": 1.0,
                    "server_peak_rss_mb": s, "client_peak_rss_mb_max": w})
    return out


def _grid(round_s, mem=lambda n, k: 900.0):
    return [{"n": n, "k": k, "round_s": round_s(n, k), "round_s_q1": round_s(n, k),
             "round_s_q3": round_s(n, k), "server_cpu_s": 0.1, "cpu_s": 0.2, "first_round_s": 9.0,
             "discovery_s": 3.0,
             "server_peak_mb": mem(n, k), "worker_peak_mb": mem(n, k) + 50}
            for n in (10, 100, 1000) for k in (2, 5, 10)]


def test_summary_skips_the_warm_up_round_and_takes_peaks():
    records = _records([30.0, 2.0, 4.0, 3.0], [800, 850, 870, 860, 865], [900, 920, 910, 915])

    summary = scale.summarize(records)

    assert summary["round_s"] == 3.0 and summary["first_round_s"] == 30.0
    assert summary["server_cpu_s"] == 1.5 and summary["cpu_s"] == 2.5
    assert (summary["round_s_min"], summary["round_s_max"]) == (2.0, 4.0)
    assert summary["round_s_q1"] <= 3.0 <= summary["round_s_q3"]
    assert summary["server_peak_mb"] == 870 and summary["worker_peak_mb"] == 920
    assert summary["discovery_s"] == 4.0 and summary["rounds"] == 4


def test_fit_recovers_exact_slopes_in_k_and_n():
    cells = _grid(lambda n, k: 0.5 + 0.3 * k + 0.002 * n)

    fit = scale.fit_growth(cells)

    assert fit["intercept_s"] == pytest.approx(0.5)
    assert fit["per_sampled_client_s"] == pytest.approx(0.3)
    assert fit["per_1000_clients_s"] == pytest.approx(2.0)
    assert fit["r2"] == pytest.approx(1.0)


def test_linear_in_k_per_n():
    cells = _grid(lambda n, k: 1.0 + 0.25 * k + (0.5 if n == 1000 else 0.0))

    lin = scale.linear_in_k(cells, 1000)

    assert lin["slope_s"] == pytest.approx(0.25) and lin["r2"] == pytest.approx(1.0)


def test_memory_ratio_compares_largest_with_smallest_n_at_each_k():
    cells = _grid(lambda n, k: 1.0, mem=lambda n, k: 1000.0 + n / 10)

    ratios = scale.memory_ratios(cells)

    assert set(ratios) == {2, 5, 10}
    assert ratios[5]["server"] == pytest.approx(1100 / 1001)
    assert ratios[5]["worker"] == pytest.approx(1150 / 1051)


def test_table_and_plot(tmp_path):
    cells = _grid(lambda n, k: 0.5 + 0.3 * k)

    text = scale.table(cells)
    scale.plot(cells, tmp_path / "scale.png")

    assert text.count("\n") == 2 + 9
    assert "| 1,000 | 10 | 3.50 s | 3.50–3.50 s | 0.20 s | 0.10 s |" in text
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_order_visits_every_cell_once_changing_n_and_k_together():
    order = scale.grid_order([10, 100, 1000], [2, 5, 10])

    assert sorted(order) == [(n, k) for n in (10, 100, 1000) for k in (2, 5, 10)]
    assert order[:3] == [(10, 2), (100, 10), (1000, 5)]  # one diagonal: every N and every K
