"""Flower ServerApp: initial adapter → federated rounds → metrics and a PEFT adapter on disk."""

from __future__ import annotations

import time
from logging import INFO

import torch
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedlora import config, outputs
from fedlora.evaluator import ServerModel
from server.strategy import FederatedLora, build_optimizer

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    cfg = config.from_flat(context.run_config)
    build_optimizer(cfg)  # refuse a bad strategy/optimizer pair before loading anything
    out = outputs.RunOutputs(outputs.output_dir(cfg), cfg)
    log(INFO, "fedlora: writing to %s (torch threads: %d)", out.dir, torch.get_num_threads())

    # built at max-rank: a node of any allowed rank gets the leading slice of the same init
    server_model = ServerModel(cfg, max_rank=cfg.fl.max_rank)
    glob = server_model.initial_global()
    strategy = FederatedLora(cfg, glob, server_model.evaluate, out.log_round)
    strategy.run(grid)

    server_model.export(glob, out.adapter_dir)
    out.write_json("summary.json", {"status": "completed", "rounds": cfg.fl.num_server_rounds,
                                    "wall_s": time.perf_counter() - started,
                                    "adapter": str(out.adapter_dir)})
    log(INFO, "fedlora: adapter saved to %s", out.adapter_dir)
