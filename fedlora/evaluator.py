"""Server-side model: the seeded initial adapter, central evaluation and adapter export.

The server keeps one PEFT model of the base. To evaluate any rule the same way — flexlora's
full-rank aggregate, flora's base corrections, hetlora's padded factors — it merges the global
model's total ΔW into the frozen weights (``W0 + ΔW``), zeroes the LoRA factors and loads the
heads. The exported adapter is a plain PEFT adapter carrying the same ΔW, so
``PeftModel.from_pretrained(base, out/"adapter")`` reproduces the reported metrics.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedlora import builders, data, lora, training
from fedlora.aggregation import LoraFactors
from fedlora.config import RunConfig
from fedlora.federation import GlobalAdapter, join_arrays, split_arrays


class ServerModel:
    """The server's copy of the base model with its held-out data."""

    def __init__(self, cfg: RunConfig, max_rank: int) -> None:
        self.cfg = cfg
        self.adapter = builders.adapter_spec(cfg, max_rank)
        self.model, self.tokenizer = lora.build_peft_model(builders.model_spec(cfg), self.adapter,
                                                           seed=cfg.fl.seed)
        self.model.eval()
        # the server merges ΔW into the frozen weights, so its own LoRA factors stay zero
        arrays = lora.adapter_arrays(self.model)
        self._zero_factors = {k: np.zeros_like(v) for k, v in arrays.items()
                              if k.endswith((lora.LORA_A, lora.LORA_B))}
        heldout = data.heldout(builders.data_spec(cfg))
        self.examples = (None if heldout is None else
                         data.tokenize(heldout, self.tokenizer, cfg.model.task,
                                       cfg.data.max_length))

    def initial_global(self) -> GlobalAdapter:
        """The seeded initial adapter (largest rank; smaller ranks get its leading slice)."""
        arrays = lora.adapter_arrays(self.model)
        factors, heads = split_arrays(arrays, self.adapter.scale)
        return GlobalAdapter(factors, heads, self.adapter.alpha, self.adapter.use_rslora)

    def _load(self, glob: GlobalAdapter) -> None:
        total = glob.export_factors()
        lora.load_adapter_arrays(self.model, {**self._zero_factors, **glob.heads})
        lora.set_base_delta(self.model, {m: (f.b, f.a) for m, f in total.items()},
                            tag=("global", glob.updates))

    def evaluate(self, glob: GlobalAdapter) -> dict[str, float] | None:
        """Held-out metrics of the global model (``None`` without server-side data)."""
        if not self.examples:
            return None
        self._load(glob)
        return training.evaluate(self.model, self.examples, self.cfg.eval.batch_size,
                                 self.tokenizer.pad_token_id, self.cfg.model.task)

    def export(self, glob: GlobalAdapter, directory: Path) -> Path:
        """Save the global model as a PEFT adapter directory (ΔW as LoRA factors + heads)."""
        total = glob.export_factors()
        if not total:  # no round finished: the initial adapter
            total = {m: LoraFactors(a=f.a, b=f.scale * f.b, scale=1.0)
                     for m, f in glob.view(self.adapter.r).items()}
        rank = max(f.rank for f in total.values())
        spec = builders.adapter_spec(self.cfg, rank)
        # alpha = r (alpha = sqrt(r) with rsLoRA) makes the exported scale 1: B carries ΔW's scale
        spec = replace(spec, alpha=float(rank**0.5 if spec.use_rslora else rank))
        padded = {m: LoraFactors(a=_pad(f.a, rank, 0), b=_pad(f.b, rank, 1), scale=1.0)
                  for m, f in total.items()}
        base, _ = lora.load_base(builders.model_spec(self.cfg))
        from peft import get_peft_model

        model = get_peft_model(base, lora.peft_config(spec, self.cfg.model.task))
        lora.load_adapter_arrays(model, join_arrays(padded, glob.heads))
        lora.save_adapter(model, directory)
        self.tokenizer.save_pretrained(directory)
        (directory / "fedlora.json").write_text(json.dumps(
            {"strategy": self.cfg.fl.strategy, "rank": rank, "base_model": self.cfg.model.name,
             "num_labels": builders.num_labels(self.cfg)}, indent=2))
        return directory


def _pad(x: np.ndarray, rank: int, axis: int) -> np.ndarray:
    width = [(0, 0), (0, 0)]
    width[axis] = (0, rank - x.shape[axis])
    return np.pad(np.asarray(x, np.float32), width)


def load_exported(adapter_dir: str | Path, cfg: RunConfig) -> tuple[Any, Any]:
    """Load an exported adapter onto a fresh base with ``PeftModel.from_pretrained``."""
    from peft import PeftModel

    base, tokenizer = lora.load_base(builders.model_spec(cfg))
    return PeftModel.from_pretrained(base, str(adapter_dir)), tokenizer
