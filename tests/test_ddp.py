"""procs-per-node: a node's round on 2 torch.distributed processes (gloo on CPU)."""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import replace

import numpy as np
import pytest
from fl_harness import tiny_config

from fedlora import config
from fedlora.errors import ConfigError
from fedlora.learning import client_round as client
from fedlora.learning import ddp, lora


@pytest.fixture
def causal_run(tiny_causal_dir):
    flat = tiny_config(**{"model.name": str(tiny_causal_dir), "model.task": "causal-lm",
                          "data.source": "chatterbot", "lora.target-modules": "q_proj,v_proj",
                          "lora.dropout": 0.0, "train.batch-size": 7, "train.local-steps": 3,
                          "data.samples-per-client": 24})
    cfg = config.from_flat(flat)
    node_config = {"partition-id": 0, "num-partitions": 2, "procs-per-node": 2}
    node = client.Node.from_configs(cfg, node_config)
    model, tokenizer = client.load_model(cfg, node)
    examples = client.train_examples(cfg, node, tokenizer)
    rng = np.random.default_rng(0)  # B away from 0, so that A trains from the first step
    arrays = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
              for k, v in lora.adapter_arrays(model).items()}
    return flat, cfg, node_config, node, model, tokenizer, examples, arrays


def test_two_processes_end_one_round_where_one_process_does(causal_run):
    """The same global batch (7 examples per step: shards of 4 and 3, unequal token counts),
    3 AdamW steps, FedProx on. Tolerance: the processes only re-associate float32 sums (as
    gradient accumulation does: test_memory_knobs measures ~2e-7 there); 1e-5 is 50x that."""
    flat, cfg, node_config, node, model, tokenizer, examples, arrays = causal_run
    spec = replace(client.builders.train_spec(cfg, 1, 0), proximal_mu=0.5)
    one, one_metrics = client.train_round(model, tokenizer, examples, arrays, spec, "ab")
    two, two_metrics = ddp.train_round(flat, node_config, model, tokenizer, examples, arrays,
                                       spec, "ab", node.procs)
    moved = max(float(np.abs(one[k] - arrays[k]).max()) for k in arrays)
    assert moved > 1e-3
    assert one.keys() == two.keys()
    assert max(float(np.abs(one[k] - two[k]).max()) for k in one) < 1e-5
    assert two_metrics["train-loss"] == pytest.approx(one_metrics["train-loss"], rel=1e-5)
    assert two_metrics["procs-per-node"] == 2
    assert multiprocessing.active_children() == []  # no helper outlives the round


def _dies(flat, node_config, spec, trainable, port, rank, world):
    """A helper that joins the group, then dies before the adapter arrives."""
    ddp._join(rank, world, port)
    os._exit(3)


def test_a_process_that_dies_fails_the_round_cleanly(causal_run):
    flat, cfg, node_config, node, model, tokenizer, examples, arrays = causal_run
    spec = client.builders.train_spec(cfg, 1, 0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"procs-per-node = 2: distributed training failed"):
        ddp.train_round(flat, node_config, model, tokenizer, examples, arrays, spec, "ab", 2,
                        target=_dies)
    assert time.monotonic() - start < ddp.TIMEOUT_S + 60  # an error, never a hung node
    assert multiprocessing.active_children() == []


def test_procs_per_node_refuses_base_modifying_rules_and_bad_counts():
    cfg = config.from_flat(tiny_config(strategy="flora"))
    with pytest.raises(ConfigError, match="cannot run strategy 'flora'"):
        client.Node.from_configs(cfg, {"partition-id": 0, "num-partitions": 2,
                                       "procs-per-node": 2})
    with pytest.raises(ConfigError, match="procs-per-node must be >= 1"):
        client.Node.from_configs(config.from_flat(tiny_config()), {
            "partition-id": 0, "num-partitions": 2, "procs-per-node": 0})


def test_launch_procs_per_node_reaches_each_nodes_config(tmp_path):
    from fedlora.runtime import deploy

    spec = deploy.NodeSpec(index=1, num_nodes=2, port=0, home=tmp_path, log_path=tmp_path / "l",
                           procs=2)
    assert spec.node_config() == "partition-id=1 num-partitions=2 procs-per-node=2"
    assert "procs-per-node" not in replace(spec, procs=1).node_config()


def test_launch_refuses_procs_per_node_with_one_gpu_per_node(tmp_path):
    from fedlora.runtime import deploy

    with pytest.raises(deploy.DeployError, match="needs 2 GPUs per node"):
        deploy.launch({}, out=tmp_path, gpus=[0], procs_per_node=2)
