"""Flower ServerApp: initial adapter → federated rounds → metrics and a PEFT adapter on disk."""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedlora import config
from fedlora.errors import DataError
from fedlora.federation import checkpoint, outputs
from fedlora.federation.wire_schema import DATA_ERROR
from fedlora.learning.evaluator import RoundExtras, ServerModel, no_evaluation_reason
from fedlora.privacy import dp as privacy
from fedlora.privacy.secure_wire import check_secure_aggregation
from fedlora.runtime.threads import single_threaded_blas
from server.polling import PromptGrid
from server.strategy import FederatedLora, build_optimizer

app = ServerApp()

FEDSA_NOTE = ("fedsa keeps B on the nodes: the central adapter carries the global A and the B "
              "the server sent (its initial B = 0), so its ΔW is 0 and it is no model of the "
              "federation. The models are the nodes' personal adapters (global A + own B), "
              "saved by each node under personal-adapter-dir/<partition-id>/.")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp: check the config, run (or resume) the rounds, write ``summary.json``."""
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
    log(INFO, "fedlora: writing to %s (output-dir%s; torch threads: %d)", out.dir,
        "" if cfg.fl.output_dir else " unset: the default", torch.get_num_threads())
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
    evaluation = server_model.describe_evaluation()
    nothing = no_evaluation_reason(cfg, bool(server_model.examples)) is not None
    log(WARNING if nothing else INFO, "fedlora: %s", evaluation)
    evaluate = _no_evaluation if nothing else server_model.evaluate
    extras = RoundExtras(server_model, out.dir)
    strategy = FederatedLora(cfg, server_model.initial_global(), evaluate,
                             out.log_round, run_id=run_id, after_round=extras)
    start = 1
    if resumed is not None:
        strategy.restore(resumed)
        start = resumed.round + 1
        log(INFO, "fedlora: resuming after round %d from %s", resumed.round, resumed.path)
    screened = DataScreenedGrid(PromptGrid(grid))
    try:
        glob = strategy.run(screened, start_round=start, checkpoint_dir=out.dir / "checkpoints")
    except RuntimeError as exc:
        if screened.left_out and str(exc).startswith("no node answered the capability query"):
            raise DataError(f"no node can train: {'; '.join(screened.left_out)}") from exc
        raise
    exporting = time.perf_counter()
    server_model.export(glob, out.adapter_dir)
    export_s = time.perf_counter() - exporting
    evaluating = time.perf_counter()
    results = extras.final(out.adapter_dir)
    if results is not None:
        log(INFO, "fedlora: eval.tasks on the export: %s", results)
    return {"model_load_s": model_load_s, "export_s": export_s,
            "lm_eval_s": time.perf_counter() - evaluating}


NO_EVALUATION = {"evaluation": "none"}  # in every round line of a run that evaluates nothing


def _no_evaluation(glob: object) -> dict[str, str]:
    return dict(NO_EVALUATION)


class DataScreenedGrid:
    """Wraps a ``Grid``: a capability reply whose node reports a data error (``data-error``,
    :func:`fedlora.learning.client_round.data_problem`) is logged as one line and dropped, so the
    node is left
    out of the run like a node that did not answer; every other reply passes unchanged."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid
        self.left_out: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        """The wrapped grid's replies, less the capability replies that report a data
        error (each logged once and kept in :attr:`left_out`)."""
        kept = []
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            caps = (reply.content.get("caps") if not reply.has_error()
                    and reply.metadata.message_type == "query.capabilities" else None)
            if caps is not None and DATA_ERROR in caps:
                line = (f"node {reply.metadata.src_node_id} (partition "
                        f"{caps.get('partition-id')}): {caps[DATA_ERROR]}")
                log(ERROR, "fedlora: left out, cannot train on its data: %s", line)
                self.left_out.append(line)
                continue
            kept.append(reply)
        return kept
