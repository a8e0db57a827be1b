"""Flower ClientApp: fine-tune LoRA on this node's private data, send only the factors.

Wire contract (the server side: ``server/round/messages.py``, ``server/round/validate.py``)

* in  ``arrays``      ArrayRecord — the adapter for this node's rank (peft key names), in the
  run's ``wire-dtype`` (float32, float16 or bfloat16; ``fedlora/federation/transport.py``)
* in  ``config``      ConfigRecord — ``server-round``, ``trainable``/``send`` ("ab", "a", "b"),
  ``personal`` ("b" for FedSA: B never leaves the node), ``base-from``/``base-to``
* in  ``correction``  ArrayRecord, optional — base correction versions base-from..base-to
* out ``arrays``      ArrayRecord — only the LoRA factors in ``send`` and the declared heads,
  in ``wire-dtype``
* out ``metrics``     MetricRecord — ``num-examples``, ``train-loss``, ``server-round`` (the
  round this reply answers: stale replies are rejected) and other numbers
* out ``signature``   ConfigRecord, with ``sign-updates`` only — the Ed25519 envelope over the
  other records (``fedlora/privacy/signed_wire.py``); the capability reply then also announces the
  node's public key

With ``secure-aggregation`` a train message's config has ``secagg-stage = "train"``: the node
trains the same way but replies with public keys instead of ``arrays``, and three ``query``
messages (``secagg_share_keys``, ``secagg_masked_input``, ``secagg_unmask``) finish the round;
the server only ever sees the masked sum (``fedlora/privacy/secure_wire.py`` lists every message).

Simulation with ``attack``: the client mod :func:`fedlora.experiments.attacks.mod` rewrites the
replies of
the attacking partitions after these handlers built them (honest nodes pass through).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import config
from fedlora.aggregation import LoraFactors
from fedlora.errors import ConfigError
from fedlora.experiments import attacks
from fedlora.federation import outputs, wire_schema
from fedlora.federation.transport import pack, pack_correction, unpack, unpack_correction
from fedlora.learning import builders, ddp, hetlora_prune, lora, training
from fedlora.learning import client_round as client
from fedlora.privacy import dp as privacy
from fedlora.privacy import secure_client, secure_hetlora, signed_wire
from fedlora.privacy.secure_wire import SECAGG, STAGE_KEY, secagg_config

app = ClientApp(mods=[attacks.mod])  # attack simulation: rewrites an attacker's replies only

PERSONAL = "fedlora.personal"
BASE = "fedlora.base"
BASE_META = "fedlora.base-meta"
PRUNE = "fedlora.hetlora-prune"  # this node's last tail norm and the rank it was measured at


def _base_state(context: Context) -> client.BaseState:
    if BASE_META not in context.state:
        return client.BaseState()
    version = int(context.state[BASE_META]["version"])
    corr = unpack_correction(context.state[BASE])
    return client.BaseState(version, {m: LoraFactors(a=a, b=b, scale=1.0)
                                      for m, (b, a) in corr.items()})


def _prepare(msg: Message, context: Context):
    """Parse config, load the cached model, catch the base up, assemble the incoming adapter."""
    cfg = config.from_flat(context.run_config)
    node = client.Node.from_configs(cfg, context.node_config)
    instructions = msg.content["config"]
    if cfg.fl.hetlora_prune and "lora-rank" in instructions:  # the rank this node pruned to
        now = int(instructions["lora-rank"])
        if not 0 < now <= node.rank:
            raise ConfigError(f"the server sent lora-rank {now}; this node's rank is "
                              f"{node.rank} and self-pruning only lowers it")
        node = dataclasses.replace(node, rank=now)
    model, tokenizer = client.load_model(cfg, node)
    base = _base_state(context)
    if "correction" in msg.content:
        base = base.advance(unpack_correction(msg.content["correction"]),
                            int(instructions["base-from"]), int(instructions["base-to"]))
    # a base init's residual depends on the rank: virtual clients of two ranks differ
    base.apply_to(model, node.rank if lora.is_base_dependent(cfg.lora.init) else 0,
                  run=context.run_id)
    arrays = unpack(msg.content["arrays"])
    if instructions.get("personal") == "b" and PERSONAL in context.state:
        arrays.update(unpack(context.state[PERSONAL]))  # FedSA: this node's own B
    return cfg, node, model, tokenizer, instructions, base, arrays


@app.query("capabilities")
def capabilities(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition and LoRA rank (it cannot read node configs), its
    number of training examples when asked (``num-examples`` true: data-size sampling), and
    ``data-error`` when its own data cannot be trained on (missing file, column, label...)."""
    cfg = config.from_flat(context.run_config)
    node = client.Node.from_configs(cfg, context.node_config)
    caps = ConfigRecord({"partition-id": node.partition_id,
                         "num-partitions": node.num_partitions, "lora-rank": node.rank})
    if cfg.fl.sign_updates:
        caps.update(signed_wire.announcement(signed_wire.node_key(context), context.run_id,
                                             context.node_id))
    problem = client.data_problem(cfg, node)
    if problem:  # one line per node on the server, instead of a traceback every round
        caps[client.DATA_ERROR] = problem
    elif msg.content["q"].get("num-examples"):
        caps["num-examples"] = len(client.train_rows(cfg, node))
    return Message(RecordDict({"caps": caps}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round on this node: catch up, train, and reply with the factors in ``send`` (under
    ``secure-aggregation`` with this round's public keys instead: the factors follow masked)."""
    started = time.perf_counter()
    cpu = time.process_time()  # this worker process's CPU spent on the message
    rss_reset = outputs.start_peak_window()  # this message's peak memory: load and train
    cfg, node, model, tokenizer, instructions, base, arrays = _prepare(msg, context)
    secure = instructions.get(STAGE_KEY) == "train"  # secure aggregation: the factors stay here
    if cfg.fl.secure_aggregation and not secure:
        raise ConfigError("this run has secure-aggregation = true, but the server asked for "
                          "the factors in the clear (a train message without secagg-stage); "
                          "the node refuses to send them")
    trained, metrics, load_seconds = _train_round(cfg, node, model, tokenizer, instructions,
                                                  arrays, context, started)
    _keep_state(context, instructions, trained, base)
    metrics.update({"partition-id": node.partition_id, "lora-rank": node.rank,
                    "base-version": base.version,
                    "server-round": int(instructions["server-round"]),
                    "rss-mb": outputs.rss_mb(), "peak-rss-mb": outputs.rss_mb(peak=True),
                    "load-seconds": load_seconds, "train-cpu-s": time.process_time() - cpu,
                    **outputs.window_peaks(rss_reset)})
    outgoing = _outgoing(cfg, context, node, instructions, arrays, trained, metrics, secure)
    if secure:
        return Message(_secure_keys(cfg, context, node, instructions, outgoing, metrics),
                       reply_to=msg)
    reply = RecordDict({"arrays": pack(outgoing, cfg.fl.wire_dtype),
                        "metrics": MetricRecord(metrics)})
    if cfg.fl.sign_updates:
        signed_wire.sign_reply(reply, signed_wire.node_key(context), context.run_id,
                               context.node_id, int(instructions["server-round"]))
    return Message(reply, reply_to=msg)


def _train_round(cfg: config.RunConfig, node: client.Node, model, tokenizer,
                 instructions: ConfigRecord, arrays: dict[str, np.ndarray], context: Context,
                 started: float) -> tuple[dict[str, np.ndarray], dict, float]:
    """Train the factors in ``trainable`` on this node's data (with torch.distributed when
    the node has several processes): the trained arrays, the training metrics and the
    seconds spent loading until training began."""
    train_examples = client.train_examples(cfg, node, tokenizer)
    spec = builders.train_spec(cfg, int(instructions["server-round"]), node.partition_id)
    load_seconds = time.perf_counter() - started  # model (cached after the first), data, adapter
    trainable = str(instructions.get("trainable", "ab"))
    if node.procs > 1:  # this process is rank 0 of the node's torch.distributed group
        trained, metrics = ddp.train_round(context.run_config, context.node_config, model,
                                           tokenizer, train_examples, arrays, spec, trainable,
                                           node.procs)
    else:
        trained, metrics = client.train_round(model, tokenizer, train_examples, arrays, spec,
                                              trainable)
    return trained, metrics, load_seconds


def _keep_state(context: Context, instructions: ConfigRecord, trained: dict[str, np.ndarray],
                base: client.BaseState) -> None:
    """What the node keeps between rounds: its personal B (FedSA) and its base corrections."""
    if instructions.get("personal") == "b":
        context.state[PERSONAL] = pack({k: v for k, v in trained.items()
                                        if k.endswith(lora.LORA_B)})
    if base.version:
        context.state[BASE] = pack_correction(base.factors)
        context.state[BASE_META] = ConfigRecord({"version": base.version})


def _outgoing(cfg: config.RunConfig, context: Context, node: client.Node,
              instructions: ConfigRecord, arrays: dict[str, np.ndarray],
              trained: dict[str, np.ndarray], metrics: dict, secure: bool
              ) -> dict[str, np.ndarray]:
    """What leaves the node: the factors in ``send`` (clipped under secure aggregation),
    privatized under DP, self-pruned under hetlora-prune, checked against the declared
    outgoing schema (nothing else leaves)."""
    send = str(instructions.get("send", "ab"))
    outgoing = client.select_outgoing(trained, send)
    if secure:
        outgoing = secure_client.clip_update(outgoing, arrays, cfg.fl.clip_update_norm)
    dp = cfg.fl.dp_spec()
    if dp.enabled:  # clip, and add this node's noise, before anything leaves the node
        contributors = _dp_contributors(cfg, dp, instructions)
        if secure:  # decided on public values only, before the data is touched
            privacy.check_secure_range({k: arrays[k] for k in outgoing}, dp, contributors,
                                       cfg.fl.secagg_clip_range)
        outgoing, dp_metrics = privacy.privatize(outgoing, arrays, dp,
                                                 contributors=contributors)
        privacy.withhold_metrics(dp, metrics, dp_metrics)
    if cfg.fl.hetlora_prune:  # HetLoRA's local rank self-pruning, decided on this node
        outgoing = _self_prune(cfg, context, node, trained, outgoing, metrics)
    wire_schema.check_outgoing(outgoing, arrays, send, metrics,
                               rank=int(metrics["pruned-rank"]) if cfg.fl.hetlora_prune
                               else None)
    return outgoing


def _secure_keys(cfg: config.RunConfig, context: Context, node: client.Node,
                 instructions: ConfigRecord, outgoing: dict[str, np.ndarray], metrics: dict
                 ) -> RecordDict:
    """Secure round, stage 0: the factors stay on the node (weighted, padded for HetLoRA);
    the reply carries this round's public keys (signed with ``sign-updates``) and metrics."""
    dp = cfg.fl.dp_spec()
    server_round = int(instructions["server-round"])
    if cfg.fl.strategy == "hetlora":  # norm weights and padding applied here, summed there
        outgoing = secure_hetlora.prescale(
            outgoing, int(metrics["num-examples"]), node.rank, int(instructions["hetlora-rank"]),
            cfg.lora.alpha, cfg.lora.use_rslora, cfg.fl.hetlora_weight_by_examples,
            gain=float(instructions["hetlora-gain"]), clip_range=cfg.fl.secagg_clip_range)
    if dp.mode not in privacy.UNTRUSTED_SERVER:  # a count of this data's large values
        # the codec clips every coordinate to ±secagg-clip-range: say how many it will
        metrics["secagg-clipped"] = int(sum(
            np.count_nonzero(~(np.abs(v) <= cfg.fl.secagg_clip_range))
            for v in outgoing.values()))
    weight = 1 if dp.enabled else int(metrics["num-examples"])  # DP: an unweighted mean
    keys = secure_client.begin(context, secagg_config(cfg), server_round, outgoing, weight)
    if cfg.fl.sign_updates:  # vouch for this round's keys, for the neighbours to check
        keys.update(signed_wire.sign_keys(
            signed_wire.node_key(context), context.run_id, context.node_id, server_round,
            keys["mask-key"], keys["encryption-key"]))
    return RecordDict({SECAGG: keys, "metrics": MetricRecord(metrics)})


def _self_prune(cfg: config.RunConfig, context: Context, node: client.Node,
                trained: dict[str, np.ndarray], outgoing: dict[str, np.ndarray],
                metrics: dict) -> dict[str, np.ndarray]:
    """HetLoRA's rank self-pruning (:mod:`fedlora.learning.hetlora_prune`): the tail norm after this
    round against this node's previous one at the same rank; on a fall, the upload keeps the
    first ``max(1, floor(γ r))`` components. The norm is kept in ``context.state``."""
    gamma = cfg.fl.hetlora_prune_gamma
    norm = hetlora_prune.tail_norm(trained, gamma)
    previous = dict(context.state[PRUNE]) if PRUNE in context.state else None
    rank = hetlora_prune.decide(node.rank, norm, previous, gamma)
    context.state[PRUNE] = ConfigRecord({"rank": node.rank, "norm": norm})
    metrics.update({"tail-norm": norm, "pruned-rank": rank})
    return outgoing if rank == node.rank else hetlora_prune.truncate(outgoing, rank)


def _dp_contributors(cfg: config.RunConfig, dp: privacy.DPSpec, instructions: ConfigRecord
                     ) -> int:
    """``m`` of distributed DP (this node adds 1/m of the noise's variance), from the server,
    checked against what the run config lets the node know: a larger ``m`` would shrink its
    noise (a smaller one only adds noise)."""
    if dp.mode != "distributed":
        return 1
    if privacy.CONTRIBUTORS_KEY not in instructions:
        raise ConfigError("this run has dp-mode = 'distributed', but the train message does "
                          f"not say how many contributors share the noise "
                          f"({privacy.CONTRIBUTORS_KEY}); the node refuses to upload an update "
                          "whose noise it cannot size")
    m = int(instructions[privacy.CONTRIBUTORS_KEY])
    bound = cfg.fl.dp_min_contributors or cfg.fl.num_train_nodes
    if m < 1 or (bound and m > bound):
        raise ConfigError(f"the server asks this node to add 1/{m} of the noise, but the run "
                          f"config allows at most {bound} contributors (dp-min-contributors, "
                          f"else num-train-nodes); the node refuses to upload")
    return m


@app.query("secagg_share_keys")
def secagg_share_keys(msg: Message, context: Context) -> Message:
    """Secure round, stage 1: encrypted shares of this round's secrets for the neighbours
    (with ``sign-updates`` only after every key in the directory proved to be signed by its
    node's Ed25519 key)."""
    cfg = config.from_flat(context.run_config)
    verify = None
    if cfg.fl.sign_updates:
        def verify(record) -> None:
            ids = list(record["node-ids"])
            signed_wire.verify_directory(
                context.run_id, int(record["server-round"]), context.node_id,
                signed_wire.node_key(context).public_key().public_bytes_raw(), ids,
                list(record["mask-keys"]), list(record["encryption-keys"]), record,
                signed_wire.peer_registry(context.node_config, cfg.fl.signing_keys))
    return Message(secure_client.share_keys(context, secagg_config(cfg), msg.content, verify),
                   reply_to=msg)


@app.query("secagg_masked_input")
def secagg_masked_input(msg: Message, context: Context) -> Message:
    """Secure round, stage 2: the masked, weighted, fixed-point update (signed with
    ``sign-updates``: it is the only message that carries this node's update)."""
    cfg = config.from_flat(context.run_config)
    reply = secure_client.mask_input(context, secagg_config(cfg), msg.content)
    if cfg.fl.sign_updates:
        signed_wire.sign_reply(reply, signed_wire.node_key(context), context.run_id,
                               context.node_id, int(reply[SECAGG]["server-round"]))
    return Message(reply, reply_to=msg)


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Secure round, stage 3: the shares that remove the remaining masks from the sum (signed
    with ``sign-updates``: a share altered in transit would corrupt the unmasked sum)."""
    cfg = config.from_flat(context.run_config)
    reply = secure_client.unmask(context, secagg_config(cfg), msg.content)
    if cfg.fl.sign_updates:
        signed_wire.sign_reply(reply, signed_wire.node_key(context), context.run_id,
                               context.node_id, int(reply[SECAGG]["server-round"]))
    return Message(reply, reply_to=msg)


@app.query("personal_export")
def personal_export(msg: Message, context: Context) -> Message:
    """The run has ended (FedSA): save the final global A with this node's own B as a PEFT
    adapter in ``<personal-adapter-dir>/<partition-id>/`` (node config, else run config).
    ``personal-saved`` is 0 when no directory is configured."""
    cfg, node, model, _, _, _, arrays = _prepare(msg, context)
    root = str(context.node_config.get("personal-adapter-dir", "") or
               cfg.fl.personal_adapter_dir)
    metrics = {"partition-id": node.partition_id, "personal-saved": 0}
    if root:
        directory = Path(root).expanduser() / str(node.partition_id)
        lora.load_adapter_arrays(model, arrays)
        lora.save_adapter(model, directory)
        (directory / "fedlora.json").write_text(json.dumps({
            "strategy": cfg.fl.strategy, "partition_id": node.partition_id, "rank": node.rank,
            "server_round": int(msg.content["config"]["server-round"]),
            # a node that never trained has no B of its own: it holds the server's B
            "own_b": PERSONAL in context.state, "base_model": cfg.model.name}, indent=2))
        metrics["personal-saved"] = 1
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global adapter (with this node's personal factors) on its held-out data."""
    cfg, node, model, tokenizer, _, _, arrays = _prepare(msg, context)
    heldout = client.heldout_examples(cfg, node, tokenizer)
    lora.load_adapter_arrays(model, arrays)
    metrics = training.evaluate(model, heldout, cfg.eval.batch_size, tokenizer.pad_token_id,
                                cfg.model.task)
    metrics.update({"num-examples": len(heldout), "partition-id": node.partition_id})
    wire_schema.check_metrics(metrics, wire_schema.EVAL_METRICS,
                              wire_schema.eval_required(cfg.model.task))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


