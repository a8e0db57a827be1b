"""What a client may send, declared once: imported by the ClientApp (which enforces it before
anything leaves the node) and by the server (which checks every reply against it).

Arrays: exactly the trainable state the round's rule asks back (:func:`select_outgoing`: the
factors named by the round's ``send`` — "ab", "a" or "b" — and every declared head / module to
save), each of the shape the node received. Metrics: only the keys below, each a finite number
of its declared kind; anything else (a token id, a label, a string) is refused on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedlora.errors import PayloadError
from fedlora.learning.lora import LORA_A, LORA_B

DATA_ERROR = "data-error"  # capability key: why this node cannot train on its data

# kind of every metric a train reply may carry: "int" (a Python int) or "float" (int or float)
TRAIN_METRICS: dict[str, str] = {
    "server-round": "int",
    "num-examples": "int",
    "train-loss": "float",
    "train-steps": "int",
    "train-seconds": "float",
    "load-seconds": "float",
    "train-cpu-s": "float",
    "rss-mb": "float",
    "peak-rss-mb": "float",
    "round-peak-rss-mb": "float",  # peak RSS of this round's message (train.* memory knobs)
    "cuda-peak-mb": "float",  # most bytes torch allocated at once on a GPU this round
    "partition-id": "int",
    "lora-rank": "int",
    "base-version": "int",
    "dp-norm": "float",  # central DP only: the update norm before clipping
    "dp-clip-factor": "float",
    "secagg-clipped": "int",  # secure aggregation: coordinates clipped to ±secagg-clip-range
    "tail-norm": "float",  # hetlora-prune: Σ ‖B_tail A_tail‖_F after local training
    "pruned-rank": "int",  # hetlora-prune: the rank of this upload (lower after a prune)
}
TRAIN_REQUIRED = ("server-round", "num-examples", "train-loss")

# an evaluate reply: the held-out metrics and the example count they average over
EVAL_METRICS: dict[str, str] = {
    "num-examples": "int",
    "partition-id": "int",
    "eval-loss": "float",
    "eval-examples": "int",
    "eval-accuracy": "float",
    "eval-perplexity": "float",
}
EVAL_RANGES = {"eval-loss": (0.0, math.inf), "eval-accuracy": (0.0, 1.0),
               "eval-perplexity": (1.0, math.inf), "eval-examples": (0, math.inf)}


def eval_required(task: str) -> tuple[str, ...]:
    """The metrics every evaluate reply of ``task`` must carry (what the server averages)."""
    return ("num-examples", "eval-loss",
            "eval-accuracy" if task == "seq-cls" else "eval-perplexity")


def select_outgoing(arrays: Mapping[str, np.ndarray], send: str) -> dict[str, np.ndarray]:
    """Keep the factors named in ``send`` ("ab", "a" or "b") and every declared head."""
    keep = {}
    for key, value in arrays.items():
        if key.endswith(LORA_A) and "a" not in send:
            continue
        if key.endswith(LORA_B) and "b" not in send:
            continue
        keep[key] = value
    return keep


def check_metrics(metrics: Mapping[str, Any], schema: Mapping[str, str],
                  required: tuple[str, ...]) -> dict[str, int | float]:
    """The metrics as a plain dict, after checking every key and value against ``schema``.

    Raises
    ------
    PayloadError
        ``BAD_METRICS``: a key outside the schema, a required key missing, or a value that is
        not a finite number of its kind (bools, strings, lists and bytes are refused).
    """
    if not isinstance(metrics, Mapping):
        raise PayloadError("BAD_METRICS", f"metrics must be a record, got "
                           f"{type(metrics).__name__}")
    out: dict[str, int | float] = {}
    for key, value in metrics.items():
        kind = schema.get(key) if isinstance(key, str) else None
        if kind is None:
            raise PayloadError("BAD_METRICS", f"metric {str(key)[:40]!r} is not in the declared "
                               f"schema ({', '.join(sorted(schema))})")
        if isinstance(value, bool) or not isinstance(value, int if kind == "int" else
                                                         int | float):
            raise PayloadError("BAD_METRICS", f"metric {key!r} must be "
                               f"{'an int' if kind == 'int' else 'a number'}, got "
                               f"{type(value).__name__} {str(value)[:40]}")
        if kind == "float" and not math.isfinite(value):
            raise PayloadError("BAD_METRICS", f"metric {key!r} must be finite, got {value!r}")
        out[key] = value
    missing = [k for k in required if k not in out]
    if missing:
        raise PayloadError("BAD_METRICS", f"metrics lack {', '.join(missing)}")
    return out


def check_outgoing(arrays: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                   send: str, metrics: Mapping[str, Any], rank: int | None = None) -> None:
    """Client side, before a train reply leaves the node: exactly the trainable state of
    ``send``, each array float32 of the shape received, and metrics of :data:`TRAIN_METRICS`.
    With ``rank`` (HetLoRA self-pruning) the LoRA factors have the received shapes truncated
    to their first ``rank`` components (``A[:rank]``, ``B[:, :rank]``).

    Raises
    ------
    PayloadError
        ``KEY_MISMATCH``, ``SHAPE_MISMATCH``, ``BAD_DTYPE`` or ``BAD_METRICS``: the node would
        send something the schema does not allow (a bug on this node; nothing was sent).
    """
    expected = select_outgoing(received, send)
    if rank is not None:
        from fedlora.learning.hetlora_prune import truncate

        expected = truncate(expected, rank)
    if set(arrays) != set(expected):
        odd = sorted(set(arrays) ^ set(expected))[:3]
        raise PayloadError("KEY_MISMATCH", f"the node would send {sorted(arrays)[:3]}…; the "
                           f"schema of send = {send!r} differs in {odd}")
    for key, value in arrays.items():
        if np.asarray(value).dtype not in (np.float32, np.float16, np.float64):
            raise PayloadError("BAD_DTYPE", f"{key} is {np.asarray(value).dtype}, not a float")
        if np.shape(value) != np.shape(expected[key]):
            raise PayloadError("SHAPE_MISMATCH", f"{key} has shape {np.shape(value)}; it was "
                               f"received as {np.shape(expected[key])}")
    check_metrics(metrics, TRAIN_METRICS, TRAIN_REQUIRED)
