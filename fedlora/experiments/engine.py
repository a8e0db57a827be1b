"""Runs one sweep cell in this process: the real ServerApp against the real ClientApp.

``engine = "inprocess"`` (the default of ``fedlora experiment``) hands each cell to
:class:`server.inprocess.InProcessGrid`: :func:`server.app.main` — the same ServerApp that
``fedlora run`` starts, with its strategy, outputs, checkpoints and export — exchanges real Flower
``Message`` objects with the real ClientApp handlers, each node with its own persistent
``Context`` (``partition-id``, ``num-partitions``, ``context.state``), as on Flower's simulation
engine. What it leaves out is the machinery around them: no SuperLink, no ``flwr run``, no Ray
and no simulation process, so a cell costs its training, aggregation and evaluation plus a model
load, where on the simulation engine a smoke cell paid 26.6 s of start-up and teardown (see
``docs/experiments.md``). ``engine = "simulation"`` runs every cell on Flower's simulation engine
instead (:func:`fedlora.runtime.launcher.run_simulation`).

Between cells the client-side caches are dropped
(:func:`fedlora.learning.client_round.clear_caches`), so every cell starts as a fresh client
process would: a cell cannot see the previous cell's base model,
corrections or tokenized data. Nodes run one after another in this process, as the virtual
clients of one Ray actor do; a hung client hangs the cell (there is no round timeout here).
"""

from __future__ import annotations

import logging
import threading
import tomllib
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlora import config
from fedlora.federation.outputs import read_metrics


class CellFailed(Exception):
    """The cell's ServerApp raised: the error, with the traceback in the cell's ``run.log``."""


class _Forwarder(threading.Thread):
    """Polls ``metrics.jsonl`` and hands each new record to ``on_round`` as it is written."""

    def __init__(self, directory: Path, on_round: Callable[[dict[str, Any]], None] | None,
                 poll_s: float) -> None:
        super().__init__(name="fedlora-metrics", daemon=True)
        self.directory, self.on_round, self.poll_s = directory, on_round, poll_s
        self.records: list[dict[str, Any]] = []
        self.done = threading.Event()
        self.lock = threading.Lock()

    def forward(self) -> None:
        """Hand on the records written since the last call."""
        with self.lock:
            fresh = read_metrics(self.directory)
            for record in fresh[len(self.records):]:
                if self.on_round:
                    self.on_round(record)
            self.records[:] = fresh

    def run(self) -> None:
        """Forward new records every ``poll_s`` until :attr:`done` is set."""
        while not self.done.wait(self.poll_s):
            self.forward()


class _LogToFile:
    """Sends Flower's logger (the ServerApp's round log) to ``path`` instead of the console."""

    def __init__(self, path: Path) -> None:
        self.logger = logging.getLogger("flwr")
        self.handler = logging.FileHandler(path, mode="w", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s"))

    def __enter__(self) -> _LogToFile:
        self.saved = self.logger.handlers[:], self.logger.propagate
        self.logger.handlers[:] = [self.handler]
        self.logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.handlers[:], self.logger.propagate = self.saved
        self.handler.close()


def run_in_process(run_config_file: Path, output_dir: Path, num_clients: int,
                   on_round: Callable[[dict[str, Any]], None] | None = None,
                   run_id: int = 1, poll_s: float = 0.25, threads: int = 1
                   ) -> list[dict[str, Any]]:
    """Run one cell's ServerApp against ``num_clients`` in-process nodes to completion; return
    its metrics records (``on_round`` gets each as it is written).

    The run config is what Flower's simulation gives the apps: the defaults with
    ``run_config_file`` (``flwr run --run-config``) on top. torch runs on ``threads`` threads
    (unless the run sets ``train.num-threads``), as a Ray actor reserving that many CPUs does
    (Ray sets its ``OMP_NUM_THREADS``): the float sums, and so the results, are then the
    simulation engine's bit for bit, and on a shared 2-core machine one thread is also the
    fastest (a 20-round cell of hetero-sampled took 31 s on one thread, 165 s on two, at
    load 3-4). Raises :class:`CellFailed` with the ServerApp's exception; its traceback and the
    round log are in ``output_dir/run.log``.
    """
    import torch
    from flwr.app import Context, RecordDict

    from clients.app import app as client_app
    from fedlora.learning.client_round import clear_caches
    from server.app import main as server_main
    from server.inprocess import InProcessGrid

    run_config = config.defaults()
    run_config.update(tomllib.loads(run_config_file.read_text()))
    nodes = [{"partition-id": i, "num-partitions": num_clients} for i in range(num_clients)]
    clear_caches()
    (output_dir / "summary.json").unlink(missing_ok=True)
    forwarder = _Forwarder(output_dir, on_round, poll_s)
    log_path = output_dir / "run.log"
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        with _LogToFile(log_path):
            grid = InProcessGrid(client_app, nodes, run_config, run_id=run_id)
            forwarder.start()
            try:
                server_main(grid, Context(run_id=run_id, node_id=0, node_config={},
                                          state=RecordDict(), run_config=dict(run_config)))
            except Exception as exc:
                logging.getLogger("flwr").error("%s", traceback.format_exc())
                raise CellFailed(f"{type(exc).__name__}: {exc}") from exc
    finally:
        torch.set_num_threads(saved_threads)
        forwarder.done.set()
        if forwarder.is_alive():
            forwarder.join()
        clear_caches()  # the cell's models and data are not kept past it
    forwarder.forward()
    return forwarder.records
