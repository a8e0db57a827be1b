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
TOLERANCE = {"P1": 1e-6, "P2": 1e-5, "P3": 0.0, "P4": 0.0, "P5": 1e-5, "P7": 1e-4}
QUICK_IDS = ["P1", "P2", "P3", "P4", "P5", "P7"]


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
    assert [r["id"] for r in doc["results"]] == QUICK_IDS
    assert set(doc["skipped"]) == {"P6"} and "fedlora run" in doc["skipped"]["P6"]


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


def result_of(doc: dict, bench_id: str) -> dict:
    return next(r for r in doc["results"] if r["id"] == bench_id)


def test_quick_run_federated_overhead(quick_run):
    _, doc = quick_run
    p3 = result_of(doc, "P3")["params"]

    assert p3["engine"] == "in-process" and p3["rounds"] == 2
    assert math.isclose(p3["overhead_per_round_s"],
                        p3["in_process_per_round_s"] - p3["plain_per_round_s"])
    split = p3["in_process_split_s"]
    assert set(split) == {"client_load_s_max", "client_train_s_max", "aggregate_s", "eval_s",
                          "messaging_s", "between_rounds_s", "round_s"}
    assert split["client_train_s_max"] > 0 and split["eval_s"] > 0


def test_quick_run_client_throughput_trains_the_same_adapter(quick_run):
    _, doc = quick_run
    p5 = result_of(doc, "P5")

    assert p5["max_abs_diff"] <= 1e-5 and p5["params"]["train_loss_diff"] <= 1e-5
    samples = p5["params"]["steps"] * p5["params"]["batch_size"]
    assert math.isclose(p5["params"]["ours_samples_per_s"], samples / p5["ours_s"])
    assert math.isclose(p5["params"]["peer_samples_per_s"], samples / p5["peer_s"])


def test_quick_run_secure_aggregation_against_flower(quick_run):
    _, doc = quick_run
    p7 = result_of(doc, "P7")["params"]

    masks, upload, rounds = p7["masks"], p7["upload"], p7["rounds"]
    assert masks["ours_gb_s"] > 0 and masks["flower_gb_s"] > 0
    assert 4.0 < upload["ours_record_bytes_per_param"] < 4.02  # uint32 words + npy header
    assert 8.0 < upload["flower_record_bytes_per_param"] < 8.1  # int64 words
    assert rounds["ours_secure_s"] > 0 and rounds["flower_secure_s"] > 0
    assert p7["flower_aggregate_error"] <= p7["flower_quantization_bound"]


def test_quick_run_prints_the_table(quick_run):
    done, _ = quick_run

    for bench_id in QUICK_IDS:
        assert f"running {bench_id}" in done.stdout
    assert "skipping P6 under --quick" in done.stdout
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
    (None, ["P1", "P2", "P3", "P4", "P5", "P6", "P7"]),
    (["p4", "P1"], ["P1", "P4"]),
    (["wire_bytes", "flexlora_svd"], ["P2", "P4"]),
    (["secagg", "demo_split", "p3"], ["P3", "P6", "P7"]),
])
def test_select(names, expected):
    from benchmarks.__main__ import select

    assert select(names) == expected


def test_select_unknown_lists_valid_names():
    from benchmarks.__main__ import select

    with pytest.raises(ValueError, match=r"unknown benchmark\(s\) \['P9'\].*P1 "):
        select(["P9"])


def test_p1s_three_paths_equal_an_independent_mean_of_its_replies():
    """P1's correctness, checked here rather than from the benchmark's own ``correct`` flag:
    on one layer of its replies, our zero-copy mean, Flower's and the generic FedIT pipeline
    each equal a float64 example-weighted mean computed in this test, within the derived
    float32 bound of ``tests/tolerances.py``."""
    from tolerances import assert_within, weighted_sum_bound

    from benchmarks import aggregation_throughput as p1
    from fedlora.federation.transport import unpack

    contents = p1.replies(layers=1)
    arrays = [unpack(c["arrays"]) for c in contents]
    weights = [int(c["metrics"][p1.WEIGHT_KEY]) for c in contents]
    p = [w / sum(weights) for w in weights]
    for name, got in (("ours", p1.ours(contents)), ("flower", p1.peer(contents)),
                      ("fedit", p1.fedit_pipeline(contents))):
        got = unpack(got)
        assert got.keys() == arrays[0].keys(), name
        for key in got:
            want = sum(pk * a[key].astype("float64") for pk, a in zip(p, arrays, strict=True))
            assert_within(got[key], want, weighted_sum_bound([a[key] for a in arrays], weights),
                          f"{name} {key}")
