"""`fedlora run --ray-address`: the simulation's workers run on a multi-node Ray cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ray_cluster import LocalRayCluster
from test_simulation import our_processes

from fedlora.federation.outputs import read_metrics

TINY = ("model.num-hidden-layers=1 data.samples-per-client=16 data.eval-samples=32 "
        "data.max-length=32 train.local-steps=2 train.batch-size=8 num-train-nodes=3")


def _actors_on(node_dir: Path) -> int:
    """Flower ClientAppActor processes a Ray node started (its session logs name each)."""
    logs = node_dir / "session_latest" / "logs"
    return sum(":actor_name:ClientAppActor" in f.read_text(errors="replace")
               for f in logs.glob("worker-*.out"))


@pytest.mark.long  # 1-3.5 min on 2 cores: make test-long (CI budget)
@pytest.mark.slow
def test_simulation_runs_on_a_two_node_ray_cluster(tmp_path):
    # Prepare: a head and a worker node (separate raylets on 127.0.0.1), one CPU each, so
    # Flower's actor pool (1 CPU per worker) holds one actor on each node
    cluster = LocalRayCluster(worker_cpus=[1], head_cpus=1).start()
    out = tmp_path / "run"
    try:
        # Execute: 6 virtual clients, 3 sampled per round, on that cluster
        done = subprocess.run(
            [sys.executable, "-m", "fedlora", "run", "--num-clients", "6", "--rounds", "2",
             "--out", str(out), "--ray-address", cluster.address, "-c", TINY],
            capture_output=True, text=True, timeout=900)
        actors = {name: _actors_on(cluster.root / name) for name in ("head", "worker-0")}
        cluster.stop()
        left = our_processes(str(cluster.root)) + our_processes(str(out))
    finally:
        cluster.remove()

    # Assert: the run completed, and its actors were the cluster's: one on each node
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Ray cluster {cluster.address}" in done.stderr
    records = read_metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["num_sampled"] == r["num_accepted"] == 3 for r in records[1:])
    assert actors == {"head": 1, "worker-0": 1}
    assert left == []  # cluster nodes and simulation: nothing left behind
