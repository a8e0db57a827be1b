"""P7: fedlora's secure aggregation against Flower's own SecAgg+ (issue #6).

Three measures, each on identical inputs:

1. **Mask generation.** One 32-byte seed expanded into the mask of d = 4,194,304 parameters
   (Llama-2-7B q/v LoRA r = 8, as P1) and added to the upload. Ours: AES-256-CTR keystream
   added in place to the ``uint32`` vector (:func:`fedlora.privacy.secagg.prg.apply_mask`).
   Flower's,
   as ``secaggplus_mod`` does for every mask: ``pseudo_rand_gen(seed, 2**32, shapes)``
   (``numpy.random.RandomState`` seeded with 32 bits, ``int64`` draws) then
   ``parameters_addition``. GB/s counts 4 bytes per parameter (ours' ring element); best of
   ``repeats``, interleaved.
2. **Upload size.** The masked-input reply of one client for the same update size, taken
   from the real messages of each protocol in the rounds below: record bytes (Flower's
   ``count_bytes`` of every record in the reply) and the ``Message`` protobuf, per parameter.
3. **Round time.** 3 clients, one secure and one plain round on the same in-process transport
   (:mod:`server.inprocess`, every message serialized to protobuf and back as on the wire),
   best of ``repeats``. Ours: :class:`~server.strategy.FederatedLora` with
   ``secure-aggregation`` on and off, the real ClientApp training 1 local step of the default
   preset (MiniLM, LoRA r = 8 + classifier: 75,653 parameters; one layer, 14,213, in quick
   mode). Flower: ``SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2)`` vs
   ``default_fit_workflow`` with ``FedAvg``, a legacy ``ClientApp`` with ``secaggplus_mod``
   whose ``NumPyClient`` returns arrays of the same shapes at once. Flower's overhead =
   secure − plain round. Ours is reported two ways: the protocol time the server measures
   (``secagg_s``: stages 1–3, clients' work included, in process) and secure − plain round,
   which also carries the noise of the training both rounds do.

Correctness: our secure round's global adapter against the plain round's (same training,
same seeds), and Flower's SecAgg+ aggregate against the exact weighted mean.
Run ``python -m benchmarks --only P7 [--quick]``.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto

from benchmarks.common import at_most, best_times, equal, result
from clients.app import app as fedlora_client_app
from fedlora import config
from fedlora.learning.evaluator import ServerModel
from fedlora.privacy.secagg.prg import apply_mask
from fedlora.privacy.secure_wire import MASKED, MASKED_INPUT, MASKED_KEY
from fedlora.runtime import run_setup
from server.inprocess import InProcessGrid
from server.strategy import FederatedLora

ID = "P7"
TITLE = "secure aggregation vs Flower SecAgg+"
TARGET_GB_S = 3.0
CLIENTS = 3
EXAMPLES = 32  # per client (equal weights)
MASK_PARAMS = 4_194_304
# SecAggPlusWorkflow's defaults: clipping_range 8, quantization_range 2^22, max_weight 1000. A
# client's update is scaled by its weight ratio (32 / 1000, quantized to 1 / 2^22) and then
# stochastically rounded to steps of 2 * 8 / 2^22: the mean is off by less than one step / ratio.
FLOWER_BOUND = 2 * 8.0 / round(EXAMPLES / 1000.0 * 2**22)


class WireGrid(InProcessGrid):
    """The in-process grid with every message and reply serialized and parsed, as on the wire
    (a message shared by several nodes must not be shared in memory: Flower's mod edits it)."""

    def _deliver(self, msg: Message) -> Message:
        reply = super()._deliver(message_from_proto(message_to_proto(msg)))
        return message_from_proto(message_to_proto(reply))


def reply_bytes(reply: Message) -> dict[str, int]:
    """A reply's size: its records (Flower's ``count_bytes``) and its protobuf."""
    content = reply.content
    records = [*content.array_records.values(), *content.config_records.values(),
               *content.metric_records.values()]
    return {"record": sum(r.count_bytes() for r in records),
            "protobuf": message_to_proto(reply).ByteSize()}


def _npy_header_bytes(shape: tuple[int, ...]) -> int:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        stream, {"descr": "<u4", "fortran_order": False, "shape": shape})
    return len(stream.getvalue())


# ----------------------------------------------------------------------------- masks


def mask_generation(size: int, repeats: int) -> dict[str, Any]:
    """Best seconds of expanding and adding one mask of ``size`` parameters, both ways."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    seed = os.urandom(32)
    ours_target = np.zeros(size, dtype=np.uint32)
    flower_target = [np.zeros(size, dtype=np.int64)]

    def ours() -> None:
        apply_mask(ours_target, seed, 1)

    def flower() -> None:
        mask = pseudo_rand_gen(seed, 2**32, [(size,)])
        flower_target[0] = parameters_addition(flower_target, mask)[0]

    ours()  # warm-up: page faults, cipher start-up
    flower()
    times, _ = best_times({"ours": ours, "flower": flower}, repeats)
    return {"params": size, "ours_s": times["ours"], "flower_s": times["flower"],
            "ours_gb_s": 4 * size / times["ours"] / 1e9,
            "flower_gb_s": 4 * size / times["flower"] / 1e9,
            "flower_mask_dtype": "int64"}


# ----------------------------------------------------------------------------- ours


def ours_config(secure: bool, quick: bool) -> dict[str, Any]:
    flat = config.defaults()
    layer = run_setup.preset_layer()
    layer.pop("num-clients")
    flat.update(layer)
    flat.update({"num-server-rounds": 1, "train.local-steps": 1,
                 "data.samples-per-client": EXAMPLES, "data.eval-samples": 16,
                 "checkpoint-every": 0, "secure-aggregation": secure})
    if quick:
        flat["model.num-hidden-layers"] = 1
    return flat


def ours_round(secure: bool, quick: bool) -> dict[str, Any]:
    """One round of ours (after the round-0 evaluation); its duration, result and replies."""
    flat = ours_config(secure, quick)
    cfg = config.from_flat(flat)
    replies: list[Message] = []
    grid = WireGrid(fedlora_client_app,
                    [{"partition-id": i, "num-partitions": CLIENTS} for i in range(CLIENTS)],
                    flat, on_reply=replies.append)
    server_model = ServerModel(cfg, cfg.fl.max_rank)
    records: list[dict[str, Any]] = []
    strategy = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                             records.append)
    glob = strategy.run(grid)
    masked = [r for r in replies if r.metadata.message_type == MASKED_INPUT]
    return {"seconds": records[1]["duration_s"], "record": records[1],
            "arrays": glob.arrays_for(cfg.lora.r),
            "masked_reply": masked[0] if masked else None}


# ----------------------------------------------------------------------------- Flower's


def flower_round(shapes: list[tuple[int, ...]], secure: bool, seed: int = 0
                 ) -> dict[str, Any]:
    """One round of Flower's legacy workflow on the same transport; its result and replies."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.server.workflow.default_workflows import default_fit_workflow

    rng = np.random.default_rng(seed)
    updates = [[rng.normal(0.0, 0.02, s).astype(np.float32) for s in shapes]
               for _ in range(CLIENTS)]

    class FixedUpdate(NumPyClient):
        def __init__(self, partition: int) -> None:
            self.partition = partition

        def fit(self, parameters, config):
            return updates[self.partition], EXAMPLES, {}

    app = ClientApp(client_fn=lambda ctx: FixedUpdate(int(ctx.node_config["partition-id"]))
                    .to_client(), mods=[secaggplus_mod] if secure else [])
    replies: list[Message] = []
    grid = WireGrid(app, [{"partition-id": i, "num-partitions": CLIENTS}
                          for i in range(CLIENTS)], {}, on_reply=replies.append)
    grid.run = type("Run", (), {"run_id": grid.run_id})()  # read by Flower's client proxies
    context = LegacyContext(
        context=Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                        run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=FedAvg(min_fit_clients=CLIENTS, min_available_clients=CLIENTS),
        client_manager=SimpleClientManager())
    for node_id in grid.get_node_ids():
        context.client_manager.register(GridClientProxy(node_id, grid, grid.run_id))
    initial = ndarrays_to_parameters([np.zeros(s, np.float32) for s in shapes])
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        initial, True)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {Key.CURRENT_ROUND: 1, Key.START_TIME: time.time()})
    workflow: Callable[..., None] = (
        SecAggPlusWorkflow(num_shares=CLIENTS, reconstruction_threshold=2) if secure
        else default_fit_workflow)
    start = time.perf_counter()
    workflow(grid, context)
    seconds = time.perf_counter() - start
    aggregate = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], True))
    exact = [np.mean([u[i].astype(np.float64) for u in updates], axis=0)
             for i in range(len(shapes))]
    error = max(float(np.max(np.abs(a - e))) for a, e in zip(aggregate, exact, strict=True))
    masked = [r for r in replies if r.has_content() and _flower_masked(r)]
    return {"seconds": seconds, "error": error, "masked_reply": masked[0] if masked else None}


def _flower_masked(reply: Message) -> bool:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    return configs is not None and Key.MASKED_PARAMETERS in configs


# ----------------------------------------------------------------------------- run


def run(quick: bool = False) -> dict[str, Any]:
    """Masks, upload size and round time (see module docstring).

    Parameters
    ----------
    quick
        Masks of 262,144 parameters and 1 repeat (instead of 4,194,304 and 5); rounds on the
        one-layer model, 1 repeat (instead of 3).
    """
    masks = mask_generation(262_144 if quick else MASK_PARAMS, 1 if quick else 5)
    repeats = 1 if quick else 3
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)  # Flower logs every stage of every round
    try:
        ours_round(False, quick)  # warm-up: the clients load and cache the model and data
        ours_runs = {secure: [ours_round(secure, quick) for _ in range(repeats)]
                     for secure in (False, True)}
        arrays = ours_runs[False][0]["arrays"]
        shapes = [arrays[k].shape for k in sorted(arrays)]
        flower_runs = {secure: [flower_round(shapes, secure) for _ in range(repeats)]
                       for secure in (False, True)}
    finally:
        flwr_logger.setLevel(level)
    params = sum(int(np.prod(s)) for s in shapes)

    def best(runs: list[dict[str, Any]]) -> float:
        return min(r["seconds"] for r in runs)

    plain_global, secure_global = ours_runs[False][0]["arrays"], ours_runs[True][0]["arrays"]
    ours_diff = max(float(np.max(np.abs(secure_global[k] - plain_global[k])))
                    for k in plain_global)
    ours_bound = float(ours_runs[True][0]["record"]["secagg_error_bound"])
    ours_masked = ours_runs[True][0]["masked_reply"]
    flower_masked = flower_runs[True][0]["masked_reply"]
    ours_upload, flower_upload = reply_bytes(ours_masked), reply_bytes(flower_masked)
    ours_payload = len(ours_masked.content.array_records[MASKED][MASKED_KEY].data)
    flower_error = max(r["error"] for r in flower_runs[True])
    rounds = {
        "ours_plain_s": best(ours_runs[False]), "ours_secure_s": best(ours_runs[True]),
        "ours_protocol_s": min(r["record"]["secagg_s"] for r in ours_runs[True]),
        "flower_plain_s": best(flower_runs[False]), "flower_secure_s": best(flower_runs[True]),
    }
    rounds["ours_overhead_s"] = rounds["ours_secure_s"] - rounds["ours_plain_s"]
    rounds["flower_overhead_s"] = rounds["flower_secure_s"] - rounds["flower_plain_s"]
    upload = {
        "params": params,
        "ours_record_bytes_per_param": ours_upload["record"] / params,
        "ours_protobuf_bytes_per_param": ours_upload["protobuf"] / params,
        "flower_record_bytes_per_param": flower_upload["record"] / params,
        "flower_protobuf_bytes_per_param": flower_upload["protobuf"] / params,
    }
    checks = [
        at_most("ours: |secure - plain global adapter| <= 2 x the decoding bound", ours_diff,
                2 * ours_bound),
        at_most("Flower: |SecAgg+ aggregate - exact mean| <= its quantization step",
                flower_error, FLOWER_BOUND),
        equal("ours: masked payload = 4 x (params + 1) + npy header", ours_payload,
              4 * (params + 1) + _npy_header_bytes((params + 1,))),
    ]
    return result(
        bench_id=ID, name=f"{ID} {TITLE}", ours_s=masks["ours_s"],
        peer="Flower SecAgg+ pseudo_rand_gen + addition", peer_s=masks["flower_s"],
        max_abs_diff=ours_diff,
        params={"masks": masks, "upload": upload, "rounds": rounds, "clients": CLIENTS,
                "ours_decoding_bound": ours_bound, "flower_aggregate_error": flower_error,
                "flower_quantization_bound": FLOWER_BOUND,
                "repeats": repeats, "quick": quick,
                "timing": "ours_s / peer_s: one mask of masks.params parameters, expanded "
                          "and added to the upload"},
        target=f"ours >= {TARGET_GB_S:g} GB/s mask generation",
        target_met=None if quick else masks["ours_gb_s"] >= TARGET_GB_S,
        checks=checks,
        summary=(f"masks {masks['ours_gb_s']:.2f} vs {masks['flower_gb_s']:.2f} GB/s; upload "
                 f"{upload['ours_record_bytes_per_param']:.3f} vs "
                 f"{upload['flower_record_bytes_per_param']:.3f} B/param; secure round "
                 f"protocol {rounds['ours_protocol_s']:.2f} s vs SecAgg+ overhead "
                 f"{rounds['flower_overhead_s']:.2f} s, {CLIENTS} clients, {params:,} params"),
    )


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2, default=str))
