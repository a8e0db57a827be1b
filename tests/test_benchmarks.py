"""Tests of the benchmark suite: the quick run end to end, its JSON, its exit status."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULT_KEYS = {"id", "name", "ours_s", "peer", "peer_s", "ratio", "max_abs_diff", "params",
               "target", "target_met", "checks", "correct", "summary"}
TOLERANCE = {"P1": 1e-6, "P2": 1e-5, "P4": 0.0}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess,
                                                                  dict]:
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads(path.read_text(encoding="utf-8"))


def test_quick_run_document_header(quick_run):
    _, doc = quick_run

    assert doc["schema"] == "fedlora-benchmarks/1" and doc["quick"] is True
    assert doc["correct"] is True
    assert set(doc["versions"]) == {"python", "numpy", "torch", "flwr", "peft"}
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["cpu_model"]
    assert doc["date"].endswith("+00:00")
    assert [r["id"] for r in doc["results"]] == ["P1", "P2", "P4"]


def test_quick_run_results_schema_and_correctness(quick_run):
    _, doc = quick_run

    for r in doc["results"]:
        assert set(r) == RESULT_KEYS, r["id"]
        assert r["ours_s"] > 0 and r["peer_s"] > 0
        assert math.isclose(r["ratio"], r["peer_s"] / r["ours_s"])
        assert 0.0 <= r["max_abs_diff"] <= TOLERANCE[r["id"]], r["id"]
        assert r["target_met"] in (True, False, None)
        assert r["checks"] and all(c["passed"] for c in r["checks"]), r["checks"]
        assert r["correct"] is True


def test_quick_run_byte_accounting(quick_run):
    _, doc = quick_run
    wire = next(r for r in doc["results"] if r["id"] == "P4")["params"]

    reply = wire["reply_bytes"]
    assert reply["theory"] == 4 * reply["params"] == 4 * (wire["lora_params"] +
                                                          wire["head_params"])
    assert reply["theory"] < reply["payload"] < reply["record"] < reply["object_push"]
    assert wire["full_model_bytes"]["params"] > 100 * reply["params"]


def test_quick_run_prints_the_table(quick_run):
    done, _ = quick_run

    for bench_id in ("P1", "P2", "P4"):
        assert f"running {bench_id}" in done.stdout
    assert "wrote" in done.stdout


def test_failed_check_exits_one(tmp_path, monkeypatch):
    # Prepare: a stand-in benchmark whose only check fails
    from benchmarks import __main__ as suite
    from benchmarks.common import at_most, result

    def run(quick: bool) -> dict:
        return result(bench_id="P1", name="P1 fake", ours_s=1.0, peer="peer", peer_s=2.0,
                      max_abs_diff=1.0, params={}, target="ratio >= 4", target_met=False,
                      checks=[at_most("max |diff|", 1.0, 1e-6)], summary="fake")

    monkeypatch.setattr(suite, "load", lambda _: SimpleNamespace(TITLE="fake", run=run))
    path = tmp_path / "out.json"

    # Execute
    status = suite.main(["--only", "P1", "--json", str(path)])

    # Assert
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert status == 1 and doc["correct"] is False
    assert doc["results"][0]["checks"][0]["passed"] is False


@pytest.mark.parametrize(("names", "expected"), [
    (None, ["P1", "P2", "P4"]),
    (["p4", "P1"], ["P1", "P4"]),
    (["wire_bytes", "flexlora_svd"], ["P2", "P4"]),
])
def test_select(names, expected):
    from benchmarks.__main__ import select

    assert select(names) == expected


def test_select_unknown_lists_valid_names():
    from benchmarks.__main__ import select

    with pytest.raises(ValueError, match=r"unknown benchmark\(s\) \['P3'\].*P1 "):
        select(["P3"])
