"""``fedlora export RUN_DIR --merged OUT``: the run's model as one plain transformers model.

The run's ``adapter/`` is a PEFT adapter that carries the global model's whole ΔW — for flora
and fedex the base corrections of every round too, for the mixed-rank rules the aggregate at
its largest rank (:meth:`fedlora.learning.evaluator.ServerModel.export`). Merging it is therefore
the
same for every rule: rebuild the base as trained (:func:`fedlora.learning.loading.load_model`'s
manifest:
truncation, head, labels), load the adapter with ``PeftModel.from_pretrained`` and fold it in
with peft's ``merge_and_unload`` (``W = W0 + s·B·A`` per adapted layer; trained heads such as
a classifier replace the base's). Variants peft merges itself (DoRA's magnitude, ``Conv1D``
fused projections with ``fan_in_fan_out``, embedding factors) need nothing here.

QLoRA runs: the quantized base is dequantized first (transformers ``dequantize``) — the weights
the run actually trained against, ``dequant(Q(W0))``, not the original ``W0`` — and the adapter
is merged into that copy in ``model.dtype``. A half-precision (``bfloat16``/``float16``) merged
model rounds ΔW into the base's precision, which the run itself never did (it keeps base
corrections in float32, :func:`fedlora.learning.lora.set_base_delta`); ``dtype="float32"`` keeps
them.

``OUT`` loads with ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification
.from_pretrained(OUT)`` alone (no peft, no fedlora) and holds the tokenizer and a
``fedlora-merged.json`` naming the run it came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlora.errors import FedLoraError

MERGED_MANIFEST = "fedlora-merged.json"
DTYPES = ("float32", "bfloat16", "float16")


def merged_model(run_dir: str | Path, dtype: str | None = None, device: str = "cpu"
                 ) -> tuple[Any, Any, dict[str, Any]]:
    """``(merged transformers model, tokenizer, manifest)`` of a run (or its ``adapter/``);
    ``dtype`` defaults to the run's ``model.dtype``."""
    import torch
    from peft import PeftModel

    from fedlora.learning import assets, lora
    from fedlora.learning.loading import _adapter_dir, _manifest

    adapter = _adapter_dir(run_dir)
    info = _manifest(adapter)
    dtype = dtype or info.get("dtype", "float32")
    if dtype not in DTYPES:
        raise FedLoraError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    quantization = info.get("quantization", "none")
    spec = lora.ModelSpec(
        path=assets.resolve_model(info["base_model"]), task=info["task"],
        dtype=info.get("dtype", "float32"), num_labels=int(info.get("num_labels") or 0),
        num_hidden_layers=int(info.get("num_hidden_layers") or 0), device=device,
        quantization=quantization)
    base, tokenizer = lora.load_base(spec)
    if quantization != "none":
        # the weights the run trained against: dequant(Q(W0)), as a float model
        base = base.dequantize()
        for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
            if getattr(base, attr, False):
                setattr(base, attr, False)
    base = base.to(lora._DTYPES[dtype])
    names = info.get("label_names")
    if names and info["task"] == "seq-cls":
        base.config.id2label = dict(enumerate(names))
        base.config.label2id = {name: i for i, name in enumerate(names)}
    model = PeftModel.from_pretrained(base, str(adapter))
    with torch.no_grad():
        merged = model.merge_and_unload()
    merged.eval()
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config  # the weights are plain floats now
    return merged, tokenizer, {**info, "adapter": str(adapter), "merged_dtype": dtype}


def export_merged(run_dir: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Write the merged model, its tokenizer and ``fedlora-merged.json`` to ``out``."""
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise FedLoraError(f"{out} exists and is not empty; give a new directory for --merged")
    model, tokenizer, info = merged_model(run_dir, dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / MERGED_MANIFEST).write_text(json.dumps(info, indent=2))
    return out
