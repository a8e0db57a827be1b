"""Flower ServerApp: initial adapter → federated rounds → metrics and a PEFT adapter on disk."""

from __future__ import annotations

import time
from logging import INFO, WARNING

import torch
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedlora import checkpoint, config, outputs, privacy
from fedlora.evaluator import ServerModel
from fedlora.secure_wire import check_secure_aggregation
from fedlora.threads import single_threaded_blas
from server.polling import PromptGrid
from server.strategy import FederatedLora, build_optimizer

app = ServerApp()

FEDSA_NOTE = ("fedsa keeps B on the nodes: the central adapter carries the global A and the B "
              "the server sent (its initial B = 0), so its ΔW is 0 and it is no model of the "
              "federation. The models are the nodes' personal adapters (global A + own B), "
              "saved by each node under personal-adapter-dir/<partition-id>/.")


@app.main()
def main(grid: Grid, context: Context) -> None:
    started, started_at = time.perf_counter(), time.time()
    single_threaded_blas()  # numpy's BLAS threads would spin on the cores torch evaluates on
    cfg = config.from_flat(context.run_config)
    build_optimizer(cfg)  # refuse a bad strategy/optimizer pair before loading anything
    check_secure_aggregation(cfg)  # ... and a strategy that needs individual client factors
    privacy.check_config(cfg)  # ... and DP with a rule that is not a mean of updates
    directory = outputs.output_dir(cfg)
    checkpoints = directory / "checkpoints"
    resumed = None
    if cfg.fl.resume:
        resumed = checkpoint.load_latest(checkpoints, warn=lambda text: log(WARNING, text))
        if resumed is None:
            raise checkpoint.CheckpointError(
                f"resume is on but {checkpoints} holds no intact checkpoint; start the run "
                f"afresh (without resume) or point output-dir at the interrupted run")
    out = outputs.RunOutputs(directory, cfg,
                             keep_rounds_upto=resumed.round if resumed else None)
    log(INFO, "fedlora: writing to %s (torch threads: %d)", out.dir, torch.get_num_threads())
    try:
        timings = _run(grid, cfg, out, resumed, context.run_id)
    except Exception as exc:  # tell the launcher now, not at its next `flwr ls`; then fail
        out.write_json("summary.json", {"status": "failed",
                                        "error": f"{type(exc).__name__}: {exc}"})
        raise
    out.write_json("summary.json", {"status": "completed", "rounds": cfg.fl.num_server_rounds,
                                    "resumed_after": resumed.round if resumed else None,
                                    "wall_s": time.perf_counter() - started,
                                    "started_at": started_at, **timings,
                                    "adapter": str(out.adapter_dir),
                                    **({"adapter_note": FEDSA_NOTE,
                                        "personal_adapter_dir": cfg.fl.personal_adapter_dir}
                                       if cfg.fl.strategy == "fedsa" else {})})
    log(INFO, "fedlora: adapter saved to %s", out.adapter_dir)
    if cfg.fl.strategy == "fedsa":
        log(WARNING, "fedlora: %s", FEDSA_NOTE)


def _run(grid: Grid, cfg: config.RunConfig, out: outputs.RunOutputs,
         resumed: checkpoint.Checkpoint | None, run_id: int) -> dict[str, float]:
    """Load the server model, run the rounds, export the adapter; the seconds of the steps."""
    # built at max-rank: a node of any allowed rank gets the leading slice of the same init
    loading = time.perf_counter()
    server_model = ServerModel(cfg, max_rank=cfg.fl.max_rank)
    model_load_s = time.perf_counter() - loading
    strategy = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                             out.log_round, run_id=run_id)
    start = 1
    if resumed is not None:
        strategy.restore(resumed)
        start = resumed.round + 1
        log(INFO, "fedlora: resuming after round %d from %s", resumed.round, resumed.path)
    glob = strategy.run(PromptGrid(grid), start_round=start,
                        checkpoint_dir=out.dir / "checkpoints")
    exporting = time.perf_counter()
    server_model.export(glob, out.adapter_dir)
    return {"model_load_s": model_load_s, "export_s": time.perf_counter() - exporting}
