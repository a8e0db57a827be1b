"""fedlora: federated LoRA fine-tuning on Flower.

``fedlora.load_model(run_dir)`` returns ``(model, tokenizer)`` of a finished run, as trained
(:mod:`fedlora.learning.loading`). Imported lazily: ``import fedlora`` loads neither torch nor
Flower.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model", "model_info"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedlora.learning import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")
