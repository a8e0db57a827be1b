"""Load what a run trained: ``fedlora.load_model(run_dir)`` returns the model as it was trained.

A run's ``adapter/`` directory is a plain PEFT adapter, but the adapter alone does not say how
to rebuild its base: a run with ``model.num-hidden-layers`` trained a truncated base, a
classification run a head of ``num_labels`` outputs, a QLoRA run a quantized base. The
ServerApp writes ``adapter/fedlora.json`` beside it (:func:`fedlora.learning.evaluator.manifest`);
this
module reads it, rebuilds that base and loads the adapter onto it, so the model evaluates to the
run's final central metric. Runs exported before the manifest recorded the base are loaded
from the run directory's ``config.json`` instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlora.errors import FedLoraError

MANIFEST = "fedlora.json"


def _adapter_dir(path: str | Path) -> Path:
    p = Path(path).expanduser().resolve()
    for candidate in (p, p / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FedLoraError(f"{p} is neither a run's output directory (with adapter/) nor an adapter "
                       f"directory (with adapter_config.json); pass the --out of the run")


def _manifest(adapter: Path) -> dict[str, Any]:
    """The recorded model facts; for old runs, rebuilt from the run's ``config.json``."""
    path = adapter / MANIFEST
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    if "task" in recorded:
        return recorded
    run_config = adapter.parent / "config.json"
    if not run_config.is_file():
        raise FedLoraError(f"{adapter} records neither the model it was trained on "
                           f"({MANIFEST} without 'task') nor a run config ({run_config}); "
                           f"load it by hand with PeftModel.from_pretrained")
    from fedlora import config
    from fedlora.learning import builders

    cfg = config.from_flat(json.loads(run_config.read_text()))
    return {"base_model": cfg.model.name, "task": cfg.model.task,
            "num_labels": recorded.get("num_labels", builders.num_labels(cfg)),
            "label_names": None, "num_hidden_layers": cfg.model.num_hidden_layers,
            "dtype": cfg.model.dtype, "quantization": cfg.model.quantization,
            "max_length": cfg.data.max_length}


def model_info(run_dir: str | Path) -> dict[str, Any]:
    """What :func:`load_model` rebuilds: base, task, labels, truncation, dtype, quantization,
    ``max_length`` (tokens per example in training and evaluation), ranks."""
    return _manifest(_adapter_dir(run_dir))


def load_model(run_dir: str | Path, device: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a finished run, as trained, in eval mode.

    ``run_dir`` is the run's output directory (``--out``) or its ``adapter/``. The base is
    ``base_model`` of the manifest (the embedded ``minilm``/``smollm2``, a directory or a hub
    id, resolved on this machine), cut to ``num_hidden_layers``, with a ``num_labels`` head
    (``id2label`` from the label names when recorded) and the run's dtype and quantization;
    ``device`` defaults to CUDA when available. Tokenize inputs with ``truncation=True,
    max_length=model_info(run_dir)["max_length"]`` to see what the run evaluated.
    """
    from peft import PeftModel

    from fedlora.learning import assets, builders, lora

    adapter = _adapter_dir(run_dir)
    info = _manifest(adapter)
    spec = lora.ModelSpec(
        path=assets.resolve_model(info["base_model"]), task=info["task"],
        dtype=info.get("dtype", "float32"), num_labels=int(info.get("num_labels") or 0),
        num_hidden_layers=int(info.get("num_hidden_layers") or 0),
        device=device or builders.device(), quantization=info.get("quantization", "none"))
    base, tokenizer = lora.load_base(spec)
    names = info.get("label_names")
    if names and info["task"] == "seq-cls":
        base.config.id2label = dict(enumerate(names))
        base.config.label2id = {name: i for i, name in enumerate(names)}
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    return model, tokenizer
