"""Attack simulation: some simulated clients send hostile messages, for robustness experiments.

``attack`` names one attack from :data:`ATTACKS`; ``attackers`` says which partitions run it (a
count ``"2"`` = partitions 0 and 1, or partition ids with a comma ``"3,7"`` / ``"5,"``);
``attack-scale`` sizes the poisoning attacks. Every other client stays honest.

The attack is a Flower client mod (:func:`mod`, installed on the ClientApp in
``clients/app.py``): the honest handler builds its reply, and on an attacking node the mod
rewrites that reply (or, in a secure round, the update the node will mask) before it leaves, and
signs it again with the node's own key under ``sign-updates`` — an attacker holds valid
credentials. So the hostile message really crosses Flower to the ServerApp, which has to survive
it. Three families:

protocol
    malformed messages the server must reject with a reason, never crash on.
poisoning
    well-formed updates chosen to hurt the global model (Δ = what the node trained − what it
    received, per uploaded LoRA factor — sign-flip, scale and noise leave the heads honest, so
    that each attack hits one part of the upload; the attacker skips the client-side clipping
    and DP noise an honest node applies, since it sends what it likes):

    - ``sign-flip``: received − Δ (the "bit-flipping" client of Karimireddy, He & Jaggi,
      "Byzantine-robust learning on heterogeneous datasets via bucketing", ICLR 2022);
    - ``scale``: received + s·Δ with s = ``attack-scale`` (a boosted update, Bhagoji et al.,
      "Analyzing federated learning through an adversarial lens", ICML 2019);
    - ``noise``: received + ξ, ξ ~ N(0, (s·rms(Δ))²) per tensor (the Gaussian attack of Fang et
      al., USENIX Security 2020, with the spread set relative to the honest update so that it
      does not depend on the model's scale);
    - ``free-rider``: sends back exactly what it received (Lin et al., "Free-riders in federated
      learning", 2019);
    - ``head-poison``: every head value (classifier, modules-to-save) set to 1e30, or the wire
      dtype's largest finite value / 2 when that is smaller;
    - ``weight-inflation``: declares the largest example count the server accepts
      (``max-examples``; ``secagg-max-weight`` in secure rounds) with its honest update.
secure
    a client breaking the secure-aggregation protocol (secure-aggregation = true only): a
    low-order public key, forged share ciphertexts, a shifted Shamir share, a bad weight word.

Applicability is declared per attack (:attr:`Attack.applies`) and checked when the run config
is built (:func:`check`), so an attack that cannot act under a configuration is refused with the
reason instead of running as a no-op. Simulation only: ``fedlora launch`` refuses ``attack``.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.experiments.attack_catalog import (  # noqa: F401 — the catalog, under its old names
    ATTACKS,
    POISONING,
    PROTOCOL,
    SECURE,
    Attack,
    attacking_partitions,
    check,
    describe,
    parse_attackers,
    refuse_in_deployment,
)

if TYPE_CHECKING:
    from flwr.app import Context, Message, RecordDict

    from fedlora.config import RunConfig

HUGE_ELEMENTS = 1 << 42  # what huge-header's .npy header declares (16 TiB of float32)
HEAD_VALUE = 1e30


# ----------------------------------------------------------------------------- poisoning


def poison(name: str, outgoing: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
           scale: float, rng: np.random.Generator, wire_max: float = np.inf
           ) -> dict[str, np.ndarray]:
    """The poisoned upload of ``name`` for ``outgoing`` (the honest upload) and ``received``.

    Pure: new float32 arrays, the same keys and shapes as ``outgoing``, clipped to
    ``±wire_max`` (the wire dtype's finite range). ``weight-inflation`` leaves the arrays as
    they are (it lies about the example count, see :func:`mod`).
    """
    from fedlora.learning import lora

    out: dict[str, np.ndarray] = {}
    for key in sorted(outgoing):
        x = np.asarray(outgoing[key], dtype=np.float64)
        x0 = np.asarray(received[key], dtype=np.float64)
        delta = x - x0
        head = not key.endswith((lora.LORA_A, lora.LORA_B))
        if head and name in ("sign-flip", "scale", "noise"):
            y = x  # these target the LoRA factors; head-poison targets the heads
        elif name == "sign-flip":
            y = x0 - delta
        elif name == "scale":
            y = x0 + scale * delta
        elif name == "noise":
            rms = float(np.sqrt(np.mean(delta ** 2))) if delta.size else 0.0
            y = x0 + rng.normal(0.0, scale * rms, size=x.shape)
        elif name == "free-rider":
            y = x0
        elif name == "head-poison":
            y = np.full_like(x, min(HEAD_VALUE, wire_max / 2)) if head else x
        elif name == "weight-inflation":
            y = x
        else:
            raise ValueError(f"{name!r} is not a poisoning attack")
        out[key] = np.clip(y, -wire_max, wire_max).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- protocol


def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """A ``.npy`` version-1.0 header for ``dtype`` and ``shape`` (no body)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
        "shape": shape})
    return buffer.getvalue()


def corrupt_array(name: str, array: Any) -> Any:
    """``malformed-array``: the body cut in half; ``huge-header``: a header of 2^42 elements
    over 16 bytes. The declared dtype and shape of the ``Array`` are kept."""
    from flwr.app import Array

    if name == "malformed-array":
        stream = io.BytesIO(array.data)
        np.lib.format.read_array_header_1_0(stream) if np.lib.format.read_magic(stream) == (
            1, 0) else np.lib.format.read_array_header_2_0(stream)
        header = stream.tell()
        body = len(array.data) - header
        data = array.data[:header + body // 2] if body > 1 else array.data[:header - 1]
    else:
        data = npy_header(array.dtype, (HUGE_ELEMENTS,)) + b"\0" * 16
    return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=data)


def _corrupt_first(name: str, record: Any) -> Any:
    from flwr.app import ArrayRecord

    keys = list(record)
    return ArrayRecord({k: corrupt_array(name, record[k]) if k == keys[0] else record[k]
                        for k in keys})


# ----------------------------------------------------------------------------- the mod


def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
        ) -> Message:
    """Flower client mod: honest nodes pass through; an attacking node's reply is rewritten."""
    from fedlora import config
    from fedlora.learning import client_round as client

    cfg = config.from_flat(context.run_config)
    if not cfg.fl.attack:
        return call_next(msg, context)
    node = client.Node.from_configs(cfg, context.node_config)
    attackers = attacking_partitions(cfg, node.num_partitions)
    if node.partition_id not in attackers:
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    kind = msg.metadata.message_type
    tamper = _TAMPER.get(kind)
    if tamper is not None:
        ordinal = sorted(attackers).index(node.partition_id)
        tamper(cfg, msg, reply.content, context, node, ordinal)
    return reply


def _resign(cfg: RunConfig, content: RecordDict, context: Context, server_round: int) -> None:
    """Sign the rewritten reply with the node's own key (``sign-updates``)."""
    from fedlora.privacy import signed_wire

    if not cfg.fl.sign_updates or signed_wire.SIGNATURE not in content:
        return
    del content[signed_wire.SIGNATURE]
    signed_wire.sign_reply(content, signed_wire.node_key(context), context.run_id,
                           context.node_id, server_round)


def _wire_max(wire_dtype: str) -> float:
    return float(np.finfo(np.float16).max) if wire_dtype == "float16" else float(
        np.finfo(np.float32).max)


def _on_capabilities(cfg: RunConfig, msg: Message, content: RecordDict, context: Context,
                     node: Any, ordinal: int) -> None:
    if cfg.fl.attack != "bad-discovery":
        return
    variant = ordinal % 3
    if variant == 0:
        del content["caps"]
    elif variant == 1:
        content["caps"]["partition-id"] = "x"
    else:
        content["caps"]["lora-rank"] = cfg.fl.max_rank + 1


def _on_train(cfg: RunConfig, msg: Message, content: RecordDict, context: Context,
              node: Any, ordinal: int) -> None:
    from flwr.app import ConfigRecord

    from fedlora.federation.transport import pack, unpack
    from fedlora.privacy import secure_client
    from fedlora.privacy.secure_wire import SECAGG

    name, fl = cfg.fl.attack, cfg.fl
    server_round = int(msg.content["config"]["server-round"])
    secure = SECAGG in content
    metrics = content["metrics"]
    if name == "bad-metrics":
        metrics["rss-mb"] = [1.0, 2.0]
        metrics["train-cpu-s"] = [0.5, 0.5]
    elif ATTACKS[name].family == POISONING:
        received = unpack(msg.content["arrays"])
        if secure:  # the update the node keeps for stage 2, masked there
            honest = unpack(context.state[secure_client.UPDATE])
        else:
            honest = unpack(content["arrays"])
        rng = np.random.default_rng([fl.seed, server_round, node.partition_id, 0xA77AC])
        poisoned = poison(name, honest, received, fl.attack_scale, rng,
                          np.inf if secure else _wire_max(fl.wire_dtype))
        if name == "weight-inflation":
            declared = fl.secagg_max_weight if secure else fl.max_examples
            metrics["num-examples"] = int(declared)
            if secure:
                state = dict(context.state[secure_client.STATE])
                state[secure_client.WEIGHT] = int(declared)
                context.state[secure_client.STATE] = ConfigRecord(state)
        if secure:
            context.state[secure_client.UPDATE] = pack(poisoned)
        else:
            content["arrays"] = pack(poisoned, fl.wire_dtype)
    elif not secure and name in ("malformed-array", "huge-header"):
        content["arrays"] = _corrupt_first(name, content["arrays"])
    elif not secure and name == "wrong-record-type":
        content["arrays"] = ConfigRecord({key: "not an array" for key in content["arrays"]})
    _resign(cfg, content, context, server_round)


def _on_evaluate(cfg: RunConfig, msg: Message, content: RecordDict, context: Context,
                 node: Any, ordinal: int) -> None:
    from flwr.app import MetricRecord

    if cfg.fl.attack == "bad-eval-count":
        content["metrics"] = MetricRecord({"num-examples": -20})


def _on_share_keys(cfg: RunConfig, msg: Message, content: RecordDict, context: Context,
                   node: Any, ordinal: int) -> None:
    from fedlora.privacy.secure_wire import SECAGG

    if cfg.fl.attack == "forged-shares":
        record = content[SECAGG]
        record["ciphertexts"] = [secrets.token_bytes(len(c)) for c in record["ciphertexts"]]


def _on_masked_input(cfg: RunConfig, msg: Message, content: RecordDict, context: Context,
                     node: Any, ordinal: int) -> None:
    from flwr.app import Array, ArrayRecord

    from fedlora.privacy.secure_wire import MASKED, MASKED_KEY, SECAGG

    name = cfg.fl.attack
    array = content[MASKED][MASKED_KEY]
    if name in ("malformed-array", "huge-header"):
        content[MASKED] = ArrayRecord({MASKED_KEY: corrupt_array(name, array)})
    elif name == "bad-weight-word":
        from fedlora.privacy import secure_client

        # the codec's weight word is round(w / W · L), L = ⌊(2^31 − 1) / n⌋ levels per client
        state = context.state[secure_client.STATE]
        n = int(state["num_clients"])
        level = round(int(state[secure_client.WEIGHT]) / cfg.fl.secagg_max_weight
                      * ((2**31 - 1) // n))
        words = array.numpy().copy()  # (d + 1,) uint32, the last word the weight
        words[:-1] += np.uint32(1 << 30)
        words[-1] -= np.uint32((n * level - 1) % 2**32)  # Σ weights = 1 level if all equal
        content[MASKED] = ArrayRecord({MASKED_KEY: Array(words)})
    else:
        return
    _resign(cfg, content, context, int(content[SECAGG]["server-round"]))


def _on_unmask(cfg: RunConfig, msg: Message, content: RecordDict, context: Context,
               node: Any, ordinal: int) -> None:
    from fedlora.privacy.secagg.shamir import PRIME, SHARE_BYTES
    from fedlora.privacy.secure_wire import SECAGG

    if cfg.fl.attack == "shifted-share":
        record = content[SECAGG]
        record["self-mask-shares"] = [((int.from_bytes(s, "big") + 1) % PRIME).to_bytes(
            SHARE_BYTES, "big") for s in record["self-mask-shares"]]


def _on_advert(cfg: RunConfig, msg: Message, content: RecordDict, context: Context,
               node: Any, ordinal: int) -> None:
    from fedlora.privacy.secure_wire import SECAGG

    if cfg.fl.attack == "low-order-key" and SECAGG in content:
        content[SECAGG]["encryption-key"] = bytes(32)  # u = 0: every shared secret is 0


def _on_train_message(cfg: RunConfig, msg: Message, content: RecordDict, context: Context,
                      node: Any, ordinal: int) -> None:
    _on_advert(cfg, msg, content, context, node, ordinal)
    _on_train(cfg, msg, content, context, node, ordinal)


_TAMPER: dict[str, Callable[[Any, Any, Any, Any, Any, int], None]] = {
    "query.capabilities": _on_capabilities,
    "train": _on_train_message,
    "evaluate": _on_evaluate,
    "query.secagg_share_keys": _on_share_keys,
    "query.secagg_masked_input": _on_masked_input,
    "query.secagg_unmask": _on_unmask,
}
