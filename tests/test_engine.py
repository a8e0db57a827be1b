"""The in-process sweep engine: a cell run in the sweep's own process gives exactly what the same
cell gives on Flower's simulation engine, one cell never sees the previous cell's client state,
and a failing cell is reported without ending the sweep."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora import config
from fedlora.aggregation import LoraFactors
from fedlora.experiments import engine
from fedlora.experiments import runner as experiment_runner
from fedlora.experiments import sweep as experiment
from fedlora.federation.outputs import read_metrics
from fedlora.learning import builders, client_round, lora
from fedlora.runtime import run_setup
from tests.fl_harness import tiny_config

ROOT = Path(__file__).resolve().parent.parent
# wall clocks (``*_s``, ``*_s_max``) and memory differ between any two runs
CLOCKS = re.compile(r"_s(_|$)|time|rss|cpu")


def _numbers(cell: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not CLOCKS.search(k)} for r in read_metrics(cell)]


def _digest(cell: Path) -> str:
    return hashlib.sha256((cell / "adapter" / "adapter_model.safetensors").read_bytes()
                          ).hexdigest()


def _cell(tmp_path: Path, name: str, clients: int = 2, **keys) -> tuple[Path, Path]:
    """A tiny cell's directory and run-config file (the way the runner writes them)."""
    directory = tmp_path / name
    flat = tiny_config(**keys)
    flat["output-dir"] = str(directory)
    run_setup.finalize(flat, clients)
    return directory, run_setup.write_run_config(flat, directory)


# ------------------------------------------------------------------------------ fast


def test_a_cell_after_another_in_the_same_process_equals_the_cell_run_alone(tmp_path):
    """Two PiSSA cells hold version 1 of the base correction (the residual base) at the same
    rank, on different modules: the second cell must start from its own residual base, not the
    first cell's (the client caches are dropped between cells, and the run id names a
    correction)."""
    keys = {"lora.init": "pissa", "num-server-rounds": 1, "lora.r": 4}
    qv, qkv = {**keys, "lora.target-modules": "query,value"}, {
        **keys, "lora.target-modules": "query,key,value"}
    first, first_cfg = _cell(tmp_path, "first", **qv)
    after, after_cfg = _cell(tmp_path, "after", **qkv)
    alone, alone_cfg = _cell(tmp_path, "alone", **qkv)
    client_round.clear_caches()  # a fresh process, whatever the engine does
    engine.run_in_process(first_cfg, first, 2, run_id=1)
    engine.run_in_process(after_cfg, after, 2, run_id=2)
    client_round.clear_caches()
    engine.run_in_process(alone_cfg, alone, 2, run_id=3)
    assert _numbers(after) == _numbers(alone)
    assert _digest(after) == _digest(alone)


def test_two_runs_at_the_same_base_version_get_their_own_correction():
    """A cached base that held run 1's version-1 correction takes run 2's version 1."""
    cfg = config.from_flat(tiny_config())
    client_round.clear_caches()
    model, _ = client_round.MODELS.get(builders.model_spec(cfg), builders.adapter_spec(cfg, 4))
    module = sorted(k[: -len(lora.LORA_A)] for k in lora.adapter_arrays(model)
                    if k.endswith(lora.LORA_A))[0]
    weight = model.get_submodule(module).base_layer.weight
    w0 = weight.detach().clone()
    out, inp = w0.shape
    rng = np.random.default_rng(0)

    def state(scale: float) -> client_round.BaseState:
        a = rng.standard_normal((2, inp)).astype(np.float32)
        b = (scale * rng.standard_normal((out, 2))).astype(np.float32)
        return client_round.BaseState(1, {module: LoraFactors(a=a, b=b, scale=1.0)})

    one, two = state(0.1), state(0.2)
    one.apply_to(model, run=1)
    two.apply_to(model, run=2)
    expected = w0 + torch.from_numpy(two.factors[module].b @ two.factors[module].a)
    assert torch.allclose(weight, expected, atol=1e-6)
    client_round.clear_caches()


def test_each_record_reaches_on_round_while_the_cell_runs(tmp_path):
    directory, cfg = _cell(tmp_path, "cell", num_server_rounds=3)
    seen: list[tuple[int, bool]] = []
    records = engine.run_in_process(cfg, directory, 2, poll_s=0.02, on_round=lambda r: seen.append(
        (r["round"], (directory / "summary.json").exists())))
    assert [r for r, _ in seen] == [0, 1, 2, 3] == [r["round"] for r in records]
    assert not all(finished for _, finished in seen)  # forwarded before the run had ended
    assert json.loads((directory / "summary.json").read_text())["status"] == "completed"


def test_a_failing_cell_raises_with_its_reason_and_logs_the_traceback(tmp_path):
    flwr = logging.getLogger("flwr")
    handlers = flwr.handlers[:]
    directory, cfg = _cell(tmp_path, "cell", resume=True)  # nothing to resume from
    with pytest.raises(engine.CellFailed, match="CheckpointError: resume is on but"):
        engine.run_in_process(cfg, directory, 2)
    assert "Traceback" in (directory / "run.log").read_text()
    assert flwr.handlers == handlers  # Flower's console log is back for the next cell


def test_an_unknown_engine_is_refused_with_the_choices():
    text = (ROOT / "simulations" / "experiments" / "smoke.toml").read_text()
    with pytest.raises(experiment.SpecError, match="engine must be one of inprocess, "
                                                   "simulation; got 'ray'"):
        experiment.parse_spec('engine = "ray"\n' + text)


# ------------------------------------------------------------------------------ slow

REALISTIC = """
name = "engines"
preset = "bbc-minilm"
seeds = [0]
metric = "eval_accuracy"
baselines = []
engine = "{engine}"

[base]
num-clients = 4
num-train-nodes = 3
num-server-rounds = 2
rank-by-partition = "2,4,8"
attack = "malformed-array"
attackers = "1,"
model.num-hidden-layers = 1
data.partitioner = "dirichlet"
data.dirichlet-alpha = 0.5
data.samples-per-client = 24
data.eval-samples = 32
data.max-length = 32
train.local-steps = 2
train.batch-size = 8

[[strategies]]
label = "hetlora"
strategy = "hetlora"
"""


@pytest.mark.slow  # one real Flower simulation (make test-fast skips it)
def test_an_inprocess_cell_equals_the_cell_on_flowers_simulation_engine(tmp_path):
    """Mixed ranks 2/4/8, 3 of 4 clients sampled, client 1 sending a malformed array: the same
    metrics every round and the same adapter bytes on both engines (the in-process engine runs
    torch on the threads a Ray actor reserves: one per client CPU)."""
    outs = {}
    for name in ("inprocess", "simulation"):
        path = tmp_path / f"{name}.toml"
        path.write_text(REALISTIC.format(engine=name))
        spec = experiment.load_spec(path)
        outs[name] = tmp_path / name
        status = experiment_runner.Runner(spec, outs[name]).run()
        assert [s["status"] for s in status] == ["done"], status
        timing = json.loads((outs[name] / "timing.json").read_text())
        assert timing["engine"] == name
        assert timing["superlinks_started"] == (0 if name == "inprocess" else 1)
    cell = "default--hetlora--seed0"
    records = _numbers(outs["inprocess"] / "cells" / cell)
    rounds = [r for r in records if r["round"] > 0]
    assert all(r["num_sampled"] == 3 for r in rounds)  # partial participation
    assert sum(r["num_sampled"] - r["num_accepted"] for r in rounds) >= 1  # refused reply
    assert records == _numbers(outs["simulation"] / "cells" / cell)
    assert _digest(outs["inprocess"] / "cells" / cell) == _digest(outs["simulation"] / "cells" /
                                                                  cell)
