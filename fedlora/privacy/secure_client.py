"""The client's steps of a secure round (see :mod:`fedlora.privacy.secure_wire` for the messages).

Each step is one ClientApp message, possibly in a fresh process, so everything between steps
lives in Flower's ``context.state``, which never leaves the node: the protocol state
(:meth:`~fedlora.privacy.secagg.SecAggClient.snapshot`, private keys and shares included) and, from
stage 0 until they are masked in stage 2, the trained arrays. A step that fails forgets the
whole round (fail closed: later messages of the round find no state and are refused).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict

from fedlora.errors import PayloadError
from fedlora.federation.transport import pack, unpack
from fedlora.privacy.secagg import SecAggClient, SecAggConfig, flatten_arrays
from fedlora.privacy.secure_wire import (
    SECAGG,
    advert_record,
    bundle_record,
    masked_content,
    read_directory,
    read_relayed,
    read_unmask_request,
    unmask_record,
)

STATE = "fedlora.privacy.secagg"  # SecAggClient.snapshot() + the update's weight
UPDATE = "fedlora.privacy.secagg.update"  # the arrays to aggregate, until they are masked
WEIGHT = "update-weight"
T = TypeVar("T")


def clip_update(outgoing: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                max_norm: float) -> dict[str, np.ndarray]:
    """``clip-update-norm`` on the client: what the server does to a plain reply.

    The Frobenius norm of the whole upload's change ``x − x_received`` (LoRA factors, heads,
    biases and modules to save) is brought down to ``max_norm`` by moving each array back
    towards what it received; an update within the bound (or ``max_norm = 0``) is returned
    unchanged.
    """
    if not max_norm:
        return dict(outgoing)
    factors = sorted(outgoing)
    norm = float(np.sqrt(sum(float(np.sum((outgoing[k].astype(np.float64) - received[k]) ** 2))
                             for k in factors)))
    if norm <= max_norm:
        return dict(outgoing)
    keep = max_norm / norm
    clipped = dict(outgoing)
    for key in factors:
        clipped[key] = (received[key] + keep * (outgoing[key] - received[key])
                        ).astype(outgoing[key].dtype)
    return clipped


def begin(context: Context, settings: SecAggConfig, server_round: int,
          outgoing: Mapping[str, np.ndarray], weight: int) -> ConfigRecord:
    """Stage 0, after training: keep the update here, draw this round's keys, publish them."""
    client = SecAggClient(context.node_id, settings, server_round)
    advert = client.advertise_keys()
    context.state[UPDATE] = pack(outgoing)
    _save(context, client, weight)
    return advert_record(advert)


def share_keys(context: Context, settings: SecAggConfig, content: RecordDict,
               verify: Callable[[Any], None] | None = None) -> RecordDict:
    """Stage 1: secret-share this round's secrets with the neighbours in the key directory.

    ``verify(record)`` checks the directory's key signatures first (``sign-updates``, see
    :func:`fedlora.privacy.signed_wire.verify_directory`); if it raises, nothing is shared and the
    node leaves the round.
    """
    def step(client: SecAggClient, weight: int) -> RecordDict:
        if verify is not None:
            verify(content.get(SECAGG))
        bundle = client.share_keys(read_directory(content.get(SECAGG)))
        _save(context, client, weight)
        return RecordDict({SECAGG: bundle_record(bundle)})
    return _step(context, settings, step)


def mask_input(context: Context, settings: SecAggConfig, content: RecordDict) -> RecordDict:
    """Stage 2: encode ``weight · clip(update)``, mask it, and forget the plain update."""
    def step(client: SecAggClient, weight: int) -> RecordDict:
        if UPDATE not in context.state:
            raise PayloadError("MALFORMED", "no trained update is waiting to be masked; the "
                               "stage-0 train message of this round never reached this node")
        vector, _ = flatten_arrays(unpack(context.state[UPDATE]))  # (d,), sorted by name
        masked = client.mask_input(read_relayed(content.get(SECAGG)), vector, weight)
        del context.state[UPDATE]
        _save(context, client, weight)
        return masked_content(masked)
    return _step(context, settings, step)


def unmask(context: Context, settings: SecAggConfig, content: RecordDict) -> RecordDict:
    """Stage 3: reveal the shares the server asks for; the round is over for this client."""
    def step(client: SecAggClient, weight: int) -> RecordDict:
        response = client.unmask(read_unmask_request(content.get(SECAGG)))
        forget(context)
        return RecordDict({SECAGG: unmask_record(response)})
    return _step(context, settings, step)


def forget(context: Context) -> None:
    """Drop every trace of the round (keys, shares, the plain update)."""
    for key in (STATE, UPDATE):
        if key in context.state:
            del context.state[key]


def _step(context: Context, settings: SecAggConfig,
          step: Callable[[SecAggClient, int], T]) -> T:
    if STATE not in context.state:
        raise PayloadError("MALFORMED", "this node holds no secure-aggregation round: it did "
                           "not train in stage 0, or it left the round after an error")
    state = context.state[STATE]
    try:
        client = SecAggClient.restore(settings, state)
        return step(client, int(state[WEIGHT]))
    except Exception:
        forget(context)
        raise


def _save(context: Context, client: SecAggClient, weight: int) -> None:
    context.state[STATE] = ConfigRecord({**client.snapshot(), WEIGHT: int(weight)})
