"""P5: samples/s of a client's local training, fedlora's ClientApp vs a plain PEFT loop.

The default preset (``bbc-minilm``: all-MiniLM-L6-v2, LoRA r = 8 on ``query``/``value``, batch
16, 48 tokens), partition 0 of 3. Ours is the whole client path of one training round: a
``train`` message through the real ClientApp handler (in process, no Flower transport):
config, the cached model and tokenized examples, unpack → load the adapter → train
(:func:`fedlora.learning.training.train`) → adapter out → pack the reply. The peer is
:mod:`benchmarks.plain`'s loop (transformers + peft + torch only) on the same examples, from the
same initial adapter, with the same seeds, so both must end with the same adapter — checked.
Repeats alternate ours and the peer; the best of each is kept. Samples/s = steps × batch / s.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from benchmarks import plain
from benchmarks.common import at_most, result
from clients.app import app as client_app
from fedlora import config
from fedlora.federation.transport import pack, unpack
from fedlora.learning import builders, data
from fedlora.runtime import run_setup
from server.inprocess import InProcessGrid

ID = "P5"
TITLE = "client throughput"
TARGET = 0.95  # ours >= 0.95 x the plain loop's samples/s
TOLERANCE = 1e-5  # max |ours - plain| of the trained adapter
PARTITION, CLIENTS = 0, 3


def default_job(steps: int) -> dict[str, Any]:
    """The default preset's flat config with ``steps`` local steps."""
    flat = config.defaults()
    layer = run_setup.preset_layer()
    layer.pop("num-clients")
    flat.update(layer)
    flat["train.local-steps"] = steps
    return flat


def train_message(arrays: dict[str, np.ndarray], node_id: int) -> Message:
    instructions = ConfigRecord({"server-round": 1, "trainable": "ab", "send": "ab",
                                 "personal": ""})
    return Message(RecordDict({"arrays": pack(arrays), "config": instructions}),
                   dst_node_id=node_id, message_type="train")


def run(quick: bool = False) -> dict[str, Any]:
    """Time ``repeats`` training rounds of ``steps`` steps each way.

    Parameters
    ----------
    quick
        2 steps and 1 timed repeat instead of 10 steps (one round of the default job) and 5.
    """
    steps, repeats = (2, 1) if quick else (10, 5)
    flat = default_job(steps)
    cfg = config.from_flat(flat)
    spec = builders.model_spec(cfg)
    setup = plain.PlainSetup(model_dir=spec.path, num_labels=spec.num_labels,
                             r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                             target_modules=tuple(cfg.lora.target_module_list))
    model, tokenizer = plain.build(setup)
    initial = plain.adapter(model)
    train_rows, _ = data.client_split(builders.data_spec(cfg), PARTITION, CLIENTS)
    ids = plain.encode(tokenizer, train_rows["text"], cfg.data.max_length)
    labels = [int(v) for v in train_rows["label"]]
    seed = builders.train_spec(cfg, 1, PARTITION).seed

    grid = InProcessGrid(client_app, [{"partition-id": PARTITION, "num-partitions": CLIENTS}],
                         flat)
    node_id = grid.get_node_ids()[0]

    def ours() -> tuple[Message, float]:
        msg = train_message(initial, node_id)
        start = time.perf_counter()
        (reply,) = grid.send_and_receive([msg])
        return reply, time.perf_counter() - start

    def peer() -> tuple[list[float], float]:
        plain.load_adapter(model, initial)  # each repeat starts from the same adapter
        losses, seconds = plain.train(model, tokenizer, ids, labels, steps=steps,
                                      batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                                      seed=seed, weight_decay=cfg.train.weight_decay,
                                      max_grad_norm=cfg.train.max_grad_norm)
        return losses, sum(seconds)

    ours()  # warm-up: ours loads and caches the model and the tokenized partition
    peer()
    ours_times, peer_times, loop_times = [], [], []
    for _ in range(repeats):
        reply, seconds = ours()
        ours_times.append(seconds)
        loop_times.append(float(reply.content["metrics"]["train-seconds"]))
        losses, seconds = peer()
        peer_times.append(seconds)
    if reply.has_error():
        raise RuntimeError(f"the client failed: {reply.error.reason}")
    trained, expected = unpack(reply.content["arrays"]), plain.adapter(model)
    diff = max(float(np.max(np.abs(trained[k] - expected[k]))) for k in expected)
    loss_diff = abs(float(reply.content["metrics"]["train-loss"]) - float(np.mean(losses)))
    samples = steps * cfg.train.batch_size
    ours_s, peer_s = min(ours_times), min(peer_times)
    ratio = peer_s / ours_s
    return result(
        bench_id=ID, name=f"{ID} {TITLE}", ours_s=ours_s, peer="plain PEFT loop", peer_s=peer_s,
        max_abs_diff=diff,
        params={
            "model": "all-MiniLM-L6-v2 (preset bbc-minilm), LoRA r=8 query,value + classifier",
            "steps": steps, "batch_size": cfg.train.batch_size,
            "max_length": cfg.data.max_length, "repeats": repeats,
            "ours_samples_per_s": samples / ours_s, "peer_samples_per_s": samples / peer_s,
            "ours_loop_samples_per_s": samples / min(loop_times),
            "ours_times_s": ours_times, "peer_times_s": peer_times,
            "ours_loop_times_s": loop_times, "train_loss_diff": loss_diff,
            "timing": "ours: the ClientApp train handler (message in, reply out); ours_loop: "
                      "its training.train loop alone; peer: the plain loop",
            "quick": quick,
        },
        target=f"ratio >= {TARGET} (max_abs_diff <= {TOLERANCE:g})",
        target_met=None if quick else ratio >= TARGET,
        checks=[at_most("max |ours - plain| of the trained adapter", diff, TOLERANCE),
                at_most("|mean train loss ours - plain|", loss_diff, TOLERANCE)],
        summary=(f"{samples / ours_s:.1f} vs {samples / peer_s:.1f} samples/s "
                 f"({ratio:.3f}x); training loop alone {samples / min(loop_times):.1f} "
                 f"samples/s; same trained adapter (max |diff| {diff:.1e})"),
    )
