"""The ServerApp's own outputs: summary.json on success and on failure."""

from __future__ import annotations

import json

import pytest
from fl_harness import tiny_config
from flwr.app import Context, RecordDict

from clients.app import app as client_app
from server.app import main
from server.inprocess import InProcessGrid


def serve(tmp_path, fail=None):
    flat = tiny_config(num_server_rounds=1, **{"output-dir": str(tmp_path),
                                               "checkpoint-every": 0})
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)],
                         flat, fail=fail)
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                       run_config=flat))
    return json.loads((tmp_path / "summary.json").read_text())


def test_a_completed_run_writes_its_summary_with_timings(tmp_path):
    summary = serve(tmp_path)

    assert summary["status"] == "completed" and summary["rounds"] == 1
    assert summary["model_load_s"] > 0 and summary["export_s"] > 0
    assert summary["wall_s"] > summary["model_load_s"]


def test_a_failing_run_writes_a_failed_summary_then_raises(tmp_path):
    # every node answers the capability query with an error: no round can start
    with pytest.raises(RuntimeError, match="no node answered the capability query"):
        serve(tmp_path, fail=lambda partition, message: True)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"].startswith("RuntimeError: no node answered the capability query")
