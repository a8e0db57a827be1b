"""Real runs on Flower's simulation engine through the `fedlora` CLI (SuperLink + Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora import config
from fedlora.aggregation import available_strategies, requires_equal_ranks
from fedlora.federation.outputs import read_metrics
from fedlora.learning import builders, data, training
from fedlora.learning.evaluator import load_exported

REQUIRED = {"round", "strategy", "train_loss", "eval_loss", "eval_accuracy", "bytes_up",
            "bytes_down", "duration_s"}


def fedlora_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlora", *args], capture_output=True,
                          text=True, timeout=timeout)


def our_processes(marker: str) -> list[str]:
    """Live processes whose command line or environment (FLWR_HOME) mentions ``marker``.

    Every process a run starts — CLI, SuperLink, SuperExec, simulation, Ray — inherits
    FLWR_HOME=<out>/.flwr, so this finds all of them and nothing else.
    """
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == str(os.getpid()):
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (proc / "environ").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if state != "Z" and (marker in cmd or marker in env):
            found.append(cmd)
    return found


def reevaluate(out: Path) -> dict[str, float]:
    """Accuracy of the saved adapter loaded with PeftModel.from_pretrained on a fresh base."""
    cfg = config.from_flat(json.loads((out / "config.json").read_text()))
    model, tokenizer = load_exported(out / "adapter", cfg)
    heldout = data.heldout(builders.data_spec(cfg))
    examples = data.tokenize(heldout, tokenizer, cfg.model.task, cfg.data.max_length)
    return training.evaluate(model, examples, 64, tokenizer.pad_token_id, cfg.model.task)


def check_run(out: Path, rounds: int) -> list[dict]:
    records = read_metrics(out)
    assert [r["round"] for r in records] == list(range(rounds + 1))
    for rec in records[1:]:
        assert set(rec) >= REQUIRED, REQUIRED - set(rec)
        assert rec["num_accepted"] == rec["num_sampled"]
    assert json.loads((out / "config.json").read_text())["num-server-rounds"] == rounds
    assert (out / "adapter" / "adapter_config.json").exists()
    again = reevaluate(out)
    # the server evaluated in its process, this re-evaluates the exported adapter here (scale
    # folded into B: a float32 reassociation, ≈ γ_384 relative per layer): a logit within that
    # of a tie may flip one of the 300 predictions, and the mean loss moves far below 1e-3;
    # a wrong export costs ≫ 0.01 accuracy
    assert again["eval-accuracy"] == pytest.approx(records[-1]["eval_accuracy"], abs=0.01)
    assert again["eval-loss"] == pytest.approx(records[-1]["eval_loss"], rel=1e-3)
    return records


@pytest.mark.slow  # a real Flower simulation (make test-fast skips it)
def test_simulation_two_clients_two_rounds(tmp_path):
    out = tmp_path / "run"
    res = fedlora_cli("run", "--num-clients", "2", "--rounds", "2", "--out", str(out), "-c",
                      "model.num-hidden-layers=1 data.samples-per-client=32 data.eval-samples=64 "
                      "train.local-steps=3")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "round 2/2" in res.stderr
    check_run(out, rounds=2)
    assert our_processes(str(out)) == []  # SuperLink, SuperExec, simulation, Ray: all gone


@pytest.mark.slow  # a real Flower simulation (make test-fast skips it)
def test_failed_run_exits_nonzero_with_the_reason(tmp_path):
    """Every client fails (a learning rate that blows the adapter up, which no check before the
    run can see: each client's outgoing schema refuses to send a non-finite loss): the CLI
    reports the reason and exits 1. (Data mistakes are refused before Flower starts:
    tests/test_first_hour.py.)"""
    out = tmp_path / "bad"
    res = fedlora_cli("run", "--num-clients", "2", "--rounds", "1", "--out", str(out), "-c",
                      "model.num-hidden-layers=1 data.samples-per-client=16 "
                      "data.eval-samples=16 train.local-steps=2 train.lr=1e30")
    assert res.returncode == 1, res.stderr
    assert "without enough accepted updates" in res.stderr
    assert "rejections {'CLIENT_ERROR': 2}" in res.stderr  # both clients refused to send
    assert "'train-loss' must be finite" in res.stderr
    assert our_processes(str(out)) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [(["-c", "lora.rank=8"], "did you mean 'lora.r'"),
     (["-c", "lora.r=eight"], "expects int"),
     (["--preset", "nope"], "available: bbc-minilm"),
     (["-c", "model.name=./no/such/model"], "does not exist"),
     (["-c", "data.source=files data.path=/no/such-{partition-id}.jsonl model.num-labels=5"],
      "do not exist"),
     (["-c", "rank-by-partition='4,8'"], "needs equal LoRA ranks"),
     (["-c", "strategy=fedavg"], "available: fedex, fedit")],
)
def test_bad_input_fails_fast_with_a_clear_error(tmp_path, args, message):
    res = fedlora_cli("run", "--out", str(tmp_path / "x"), *args, timeout=60)
    assert res.returncode == 2
    assert message in res.stderr


@pytest.mark.slow
def test_default_job_end_to_end(tmp_path):
    """`fedlora run` with no options: 3 clients × 3 rounds on BBC News with MiniLM."""
    out = tmp_path / "default"
    res = fedlora_cli("run", "--out", str(out), timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    records = check_run(out, rounds=3)
    assert records[-1]["eval_accuracy"] >= 0.85


# Every rule runs through the real ClientApp/ServerApp in-process (test_federated_rounds.py);
# on Ray we run the three whose node state matters most across rounds in actor processes:
# fedsa (personal B: in the 50-client test below), fedex (base corrections) and flexlora
# (mixed ranks, SVD re-projection).
ON_RAY = ["fedex", "flexlora"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ON_RAY)
def test_rules_on_flowers_simulation_engine(tmp_path, strategy):
    """3 clients × 2 rounds on Ray; ranks 4/8/16 for the rules that accept mixed ranks."""
    assert strategy in available_strategies()
    ranks = "" if requires_equal_ranks(strategy) else "4,8,16"
    out = tmp_path / strategy
    res = fedlora_cli("run", "--num-clients", "3", "--rounds", "2", "--out", str(out), "-c",
                      f"strategy={strategy} rank-by-partition='{ranks}' model.num-hidden-layers=1 "
                      "data.samples-per-client=16 data.eval-samples=32 data.max-length=32 "
                      "train.local-steps=2 train.batch-size=8")
    assert res.returncode == 0, res.stdout + res.stderr
    records = check_run(out, 2)  # rounds, every reply accepted, exported adapter re-evaluated
    for rec in records[1:]:
        assert sorted(rec["clients"]) == [0, 1, 2] and rec["rejected"] == {}
        # both rules are exact: the state each actor kept (fedex's base corrections, the
        # flexlora factors of three ranks) reached the server intact
        assert rec["agg_error_max"] < 1e-5, rec["agg_error"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_fifty_virtual_clients_with_sampling_on_flowers_simulation_engine(tmp_path):
    """50 Ray-served virtual clients, 4 sampled per round: every node is discovered once, each
    round trains exactly the nodes the server's seeded sampling draws (per reply's partition
    id), and the run ends with a loadable adapter. (Personal state across skipped rounds is
    checked message by message in ``tests/test_scale.py``.)"""
    from server.strategy import FederatedLora, NodeInfo

    out = tmp_path / "fifty"
    res = fedlora_cli("run", "--num-clients", "50", "--rounds", "3", "--out", str(out), "-c",
                      "strategy=fedsa num-train-nodes=4 model.num-hidden-layers=1 "
                      "data.samples-per-client=2 data.eval-samples=32 data.max-length=32 "
                      "train.local-steps=1 train.batch-size=2 checkpoint-every=0")
    assert res.returncode == 0, res.stdout + res.stderr
    records = read_metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2, 3]

    cfg = config.from_flat(json.loads((out / "config.json").read_text()))
    strategy = FederatedLora(cfg, None, lambda _: None, lambda _: None)
    nodes = [NodeInfo(node_id=p, partition_id=p, rank=8) for p in range(50)]
    for rec in records[1:]:
        want = [n.partition_id for n in strategy.sample(nodes, rec["round"])]
        assert rec["num_sampled"] == rec["num_accepted"] == 4
        assert sorted(rec["clients"]) == want, rec["round"]
    assert len({tuple(r["clients"]) for r in records[1:]}) == 3  # a new draw every round
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow  # real simulations (make test-fast skips them)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_launcher_leaves_no_process_behind(tmp_path, sig):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fedlora", "run", "--out", str(out),
                             "--num-clients", "2", "-c", "model.num-hidden-layers=1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.5)  # wait until the ServerApp is running
    assert (out / "metrics.jsonl").exists(), "the ServerApp did not log round 0 within 120 s"
    assert our_processes(str(out)), "the simulation never started"
    proc.send_signal(sig)
    proc.wait(60)
    deadline = time.monotonic() + 30  # the reaper's grace period is 10 s
    while our_processes(str(out)) and time.monotonic() < deadline:
        time.sleep(1)
    assert our_processes(str(out)) == []


def _adapter_tensors(out: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identically(tmp_path):
    """Kill `fedlora run` with SIGKILL once round 2 is logged, resume with --resume: the
    final adapter equals, bit for bit, that of the same run left alone."""
    tiny = ("strategy=fedit server-optimizer=fedadam model.num-hidden-layers=1 "
            "data.samples-per-client=16 data.eval-samples=32 data.max-length=32 "
            "train.local-steps=2 train.batch-size=8")
    args = ["--num-clients", "2", "--rounds", "5", "-c", tiny]
    straight = tmp_path / "straight"
    res = fedlora_cli("run", "--out", str(straight), *args)
    assert res.returncode == 0, res.stderr[-2000:]

    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "fedlora", "run", "--out", str(out), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(
            r["round"] >= 2 for r in read_metrics(out)):
        time.sleep(0.05)
    proc.kill()
    proc.wait(30)
    # the ServerApp outlives the killed CLI until the reaper stops it (10 s grace): wait for
    # every process of the run to be gone before reading what it logged
    deadline = time.monotonic() + 30
    while our_processes(str(out)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert our_processes(str(out)) == [], "the killed run's processes are still running"
    assert not (out / "adapter").exists(), "the run finished before it could be interrupted"
    # rounds are short: one more may have finished between the poll and the kill
    logged = max(r["round"] for r in read_metrics(out))
    assert 2 <= logged < 5

    res = fedlora_cli("run", "--resume", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stderr
    records = read_metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4, 5]  # no round lost or duplicated
    summary = json.loads((out / "summary.json").read_text())
    # a round is logged, then checkpointed: at most the round being checkpointed is lost
    assert summary["resumed_after"] in (logged - 1, logged)
    want, got = _adapter_tensors(straight), _adapter_tensors(out)
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].tobytes() == got[key].tobytes(), key
    assert our_processes(str(out)) == []


def test_resume_needs_a_run_directory(tmp_path):
    res = fedlora_cli("run", "--resume", str(tmp_path), timeout=60)
    assert res.returncode == 2 and "is not the output directory of a `fedlora run`" in res.stderr


