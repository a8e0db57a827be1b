"""report.html: self-contained, rebuilt by `fedlora report OUT`, renders in headless Chromium."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedlora.experiments import report
from fedlora.experiments import sweep as experiment

SPEC = """
name = "html"
preset = "bbc-minilm"
seeds = [0, 1, 2]
metric = "eval_accuracy"
target = 0.6
reference = "fedit"
baselines = []
[base]
num-clients = 2
num-server-rounds = 4
[[settings]]
label = "dirichlet α=0.3"
data.partitioner = "dirichlet"
[[strategies]]
strategy = "fedit"
[[strategies]]
strategy = "flexlora"
[[strategies]]
strategy = "hetlora"
"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--enable-logging=stderr",
                  "--v=0", "--proxy-server=127.0.0.1:9",  # any fetch from the network fails
                  "--virtual-time-budget=15000", "--window-size=1300,2600"]


def synthetic_out(out: Path) -> experiment.Spec:
    """An output directory holding spec.toml and a runs.csv with every plotted metric."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.toml").write_text(SPEC)
    spec = experiment.load_output_spec(out)
    rng = np.random.default_rng(0)
    effect = {"fedit": 0.0, "flexlora": 0.06, "hetlora": -0.04}
    rows = []
    for seed in spec.seeds:
        for arm in spec.strategies:
            final = 0.8 + effect[arm.label] + rng.normal(0, 0.01)
            cell = experiment.Cell(spec.settings[0], arm, seed).id
            for r in range(5):
                rows.append({"kind": "federated", "setting": spec.settings[0].label,
                             "label": arm.label, "strategy": arm.label, "seed": seed,
                             "cell": cell, "status": "done", "round": r, "cell_wall_s": 30.0,
                             "eval_accuracy": 0.2 + (final - 0.2) * r / 4,
                             "bytes_up": 1e6 * (r > 0), "bytes_down": 2e6 * (r > 0),
                             "agg_error_mean": (0.3 / (r + 1) if arm.label != "flexlora"
                                                else 1e-8) if r else "",
                             "effective_rank_tier4": 3.5 + 0.1 * r if r else "",
                             "effective_rank_tier16": 12.0 - r if r else ""})
    with (out / "runs.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return spec


@pytest.fixture(scope="module")
def chromium() -> str:
    """Chromium's path; installed from Debian's packages when missing (best effort)."""
    names = ("chromium", "chromium-browser", "google-chrome")
    found = next((shutil.which(n) for n in names if shutil.which(n)), None)
    if found:
        return found
    why = "apt-get is not available"
    if shutil.which("apt-get") and os.environ.get("FEDLORA_NO_APT") != "1":
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        try:
            for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq",
                                                        "chromium"]):
                res = subprocess.run(sudo + cmd, capture_output=True, text=True, timeout=900)
                if res.returncode:
                    why = f"`{' '.join(cmd)}` failed: {res.stderr.strip()[-300:]}"
                    break
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = f"apt-get failed: {exc}"
        found = next((shutil.which(n) for n in names if shutil.which(n)), None)
        if found:
            return found
    pytest.skip(f"Chromium is not installed and could not be installed ({why})")


def browse(chromium: str, page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra,
                           page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=240)


def console_messages(stderr: str) -> list[str]:
    """What the page wrote to the console (errors, uncaught exceptions, failed loads).

    Chromium's own pages (``source: chrome://...``, e.g. its "Slow network is detected" notice
    when the machine has no network, as in CI's network namespace) are not the report's.
    """
    return [line for line in stderr.splitlines()
            if ":CONSOLE" in line and "source: chrome://" not in line]


def test_report_html_is_written_beside_summary_and_self_contained(tmp_path):
    spec = synthetic_out(tmp_path)
    report.write(spec, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert (tmp_path / "summary.md").exists() and (tmp_path / "rank_plot.png").exists()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']?(https?:)?//", page)
    assert "Plotly.newPlot" in page and page.count('class="plotly-div"') == 6
    for title in ("eval_accuracy per round", "eval_accuracy vs communication",
                  "aggregation error", "effective rank of the aggregate per tier",
                  "paired Δ final eval_accuracy vs fedit", "rank of the rules"):
        assert title in page
    assert "tier4" in page and "tier16" in page
    # the tables of summary.md, with the paired calls
    assert "<th>Δ final [95 % CI]</th>" in page and "<td>win</td>" in page


def test_fedlora_report_rebuilds_the_report_from_an_output_directory(tmp_path):
    synthetic_out(tmp_path)
    res = subprocess.run([sys.executable, "-m", "fedlora", "report", str(tmp_path),
                          "--reference", "hetlora"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert res.returncode == 0, res.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "reference `hetlora`" in summary and (tmp_path / "report.html").exists()
    bad = subprocess.run([sys.executable, "-m", "fedlora", "report", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "has no spec.toml" in bad.stderr


def test_console_errors_are_detected(chromium, tmp_path):
    """The harness itself: a page with a console error and an exception is caught."""
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>console.error('boom'); nope();</script></body></html>")
    res = browse(chromium, page, tmp_path, "--dump-dom")
    messages = console_messages(res.stderr)
    assert any("boom" in m for m in messages) and any("Uncaught" in m for m in messages)


def test_report_html_renders_offline_in_headless_chromium(chromium, tmp_path):
    spec = synthetic_out(tmp_path / "out")
    report.write(spec, tmp_path / "out")
    page = tmp_path / "out" / "report.html"
    dom = browse(chromium, page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_messages(dom.stderr) == []
    assert dom.stdout.count('class="plotly-div js-plotly-plot"') == 6  # every plot rendered
    assert dom.stdout.count("main-svg") >= 6
    shot = tmp_path / "shot.png"
    res = browse(chromium, page, tmp_path, f"--screenshot={shot}")
    assert res.returncode == 0 and console_messages(res.stderr) == []
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (2600, 1300)
    not_white = (pixels < 235).any(axis=2).mean()
    assert not_white > 0.02, f"the screenshot is nearly blank ({not_white:.3%} non-white)"
    # the traces' colours are on screen: plotly blue (fedit) and green (hetlora), ± antialiasing
    for rgb in ((0x1F, 0x77, 0xB4), (0x2C, 0xA0, 0x2C)):
        close = (np.abs(pixels - np.array(rgb)).max(axis=2) < 12).sum()
        assert close > 200, f"colour {rgb} drawn on only {close} pixels"


def test_the_servers_per_tier_effective_rank_becomes_one_curve_per_tier():
    """metrics.jsonl logs ``tier_effective_rank`` as a dict (one entry per rank tier); the
    report plots each tier as its own ``effective_rank_tier<r>`` curve."""
    from fedlora.experiments.html_report import _flatten_tiers, _rank_keys
    from fedlora.experiments.report import Series, group

    records = [{"round": r, "tier_effective_rank": {"4": 3.0 + r, "16": 10.0 + r},
                "effective_rank_mean": 5.0} for r in range(1, 3)]
    series = [Series("federated", "s", "hetlora", 0, "c0", {}, records)]
    _flatten_tiers(series)
    assert records[1]["effective_rank_tier16"] == 12.0 and records[0]["effective_rank_tier4"] == 4.0
    assert _rank_keys(group(series)) == ["effective_rank_mean", "effective_rank_tier16",
                                         "effective_rank_tier4"]
