"""The PEFT/transformers boundary: build LoRA models, move adapters to and from arrays.

Wire names are peft's state-dict names (``get_peft_model_state_dict``): a LoRA module
``M`` contributes ``M.lora_A.weight`` (r, in) and ``M.lora_B.weight`` (out, r); every other key
is a declared head (``modules_to_save``, e.g. the classifier) sent in full.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.errors import ConfigError, PayloadError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# peft 0.21 calls a transformers 5 method deprecated in favour of a new name: noise for users
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Which frozen base model to load (hashable: the process-level cache key)."""

    path: str
    task: str
    dtype: str = "float32"
    num_labels: int = 0
    num_hidden_layers: int = 0
    device: str = "cpu"


@dataclass(frozen=True)
class AdapterSpec:
    """The ``LoraConfig`` knobs a user sets in practice."""

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("query", "value")
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False
    init: str = "default"

    def with_rank(self, r: int) -> AdapterSpec:
        return replace(self, r=r)

    @property
    def scale(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def load_base(spec: ModelSpec) -> tuple[torch.nn.Module, Any]:
    """Load the frozen base model and its tokenizer from a directory or hub id."""
    _quiet_transformers()
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    overrides: dict[str, Any] = {}
    if spec.num_hidden_layers:
        overrides["num_hidden_layers"] = spec.num_hidden_layers
    if spec.task == "seq-cls":
        if spec.num_labels < 2:
            raise ConfigError(f"classification needs >= 2 labels; got {spec.num_labels}")
        overrides["num_labels"] = spec.num_labels
    try:
        config = AutoConfig.from_pretrained(spec.path, **overrides)
        tokenizer = AutoTokenizer.from_pretrained(spec.path)
    except OSError as exc:
        raise ConfigError(
            f"cannot load model {spec.path!r}: {exc}. Give an existing model directory, a hub id "
            f"reachable from this machine, or 'minilm' / 'smollm2'"
        ) from exc
    auto = AutoModelForSequenceClassification if spec.task == "seq-cls" else AutoModelForCausalLM
    model = auto.from_pretrained(spec.path, config=config, dtype=_DTYPES[spec.dtype])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(spec.device)
    if spec.device == "cpu":
        # Small activations underflow to denormals in deep LMs; on CPUs they are ~3x slower
        # (SmolLM2 forward: 19 s -> 6 s here). Flushing them to zero changes no result we use.
        torch.set_flush_denormal(True)
    return model, tokenizer


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the layers LoRA can adapt (the candidates for ``target_modules``)."""
    from transformers.pytorch_utils import Conv1D

    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.Linear | Conv1D)}
    return sorted(names)


def _check_targets(model: torch.nn.Module, spec: AdapterSpec) -> None:
    if spec.target_modules == "all-linear":
        return
    candidates = linear_module_names(model)
    module_names = [name for name, _ in model.named_modules()]
    missing = [t for t in spec.target_modules
               if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        raise ConfigError(
            f"lora.target-modules {missing} are not modules of this model; candidates: "
            f"{', '.join(candidates)}"
        )


def peft_config(spec: AdapterSpec, task: str) -> Any:
    from peft import LoraConfig, TaskType

    targets = spec.target_modules if spec.target_modules == "all-linear" else list(
        spec.target_modules)
    return LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "seq-cls" else TaskType.CAUSAL_LM,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        bias=spec.bias,
        modules_to_save=list(spec.modules_to_save) or None,
        use_rslora=spec.use_rslora,
        init_lora_weights=True if spec.init == "default" else spec.init,
    )


def build_peft_model(model_spec: ModelSpec, adapter: AdapterSpec, seed: int = 0) -> tuple[Any, Any]:
    """A fresh PEFT model with a seeded adapter (the server's initial global adapter)."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # covers new heads (e.g. the classifier) and the LoRA init
        base, tokenizer = load_base(model_spec)
        _check_targets(base, adapter)
        model = get_peft_model(base, peft_config(adapter, model_spec.task))
    return model, tokenizer


class ModelCache:
    """Process-level cache: one frozen base model per :class:`ModelSpec`, shared by every
    adapter shape.

    In Flower's simulation one Ray actor serves many virtual clients, possibly of different
    LoRA ranks. Each base model is loaded once; each :class:`AdapterSpec` (a rank) adds a named
    PEFT adapter to it, and :meth:`get` activates the one asked for, so clients of three ranks
    share one copy of the frozen weights. The model is shared by all clients: callers must
    overwrite every adapter array from the incoming message before training. Only frozen
    weights are worth caching; adapter and optimizer state never live here.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity  # base models kept (least recently used evicted first)
        self._models: OrderedDict[ModelSpec, tuple[Any, Any, dict[AdapterSpec, str]]] = \
            OrderedDict()

    def get(self, model_spec: ModelSpec, adapter: AdapterSpec) -> tuple[Any, Any]:
        """(model with ``adapter`` active, tokenizer)."""
        if model_spec in self._models:
            self._models.move_to_end(model_spec)
        else:
            while len(self._models) >= self.capacity:
                self._models.popitem(last=False)
            model, tokenizer = build_peft_model(model_spec, adapter)
            self._models[model_spec] = (model, tokenizer, {adapter: "default"})
        model, tokenizer, names = self._models[model_spec]
        if adapter not in names:
            _check_targets(model, adapter)
            names[adapter] = f"adapter-{len(names)}"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model.add_adapter(names[adapter], peft_config(adapter, model_spec.task))
        model.set_adapter(names[adapter])
        return model, tokenizer


# ----------------------------------------------------------------------------- arrays


def adapter_arrays(model: Any) -> dict[str, np.ndarray]:
    """The active adapter (LoRA factors + declared heads) as float32 numpy arrays, peft key
    names (the same for every adapter name)."""
    return {k: v.detach().to("cpu", torch.float32).numpy().copy()
            for k, v in _adapter_tensors(model).items()}


def load_adapter_arrays(model: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Overwrite every adapter array of ``model``; the key sets and shapes must match exactly."""
    from peft import set_peft_model_state_dict

    expected = {k: tuple(v.shape) for k, v in _adapter_tensors(model).items()}
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise PayloadError(
            "KEY_MISMATCH",
            f"adapter keys differ from this model's: missing {missing[:4]}, unexpected "
            f"{extra[:4]} ({len(missing)} missing, {len(extra)} unexpected)",
        )
    for key, shape in expected.items():
        got = tuple(np.shape(arrays[key]))
        if got != shape:
            raise PayloadError("SHAPE_MISMATCH", f"{key}: expected shape {shape}, got {got}")
        if not np.all(np.isfinite(arrays[key])):
            raise PayloadError("NON_FINITE", f"{key} holds NaN or Inf")
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in
             arrays.items()}
    set_peft_model_state_dict(model, state, adapter_name=model.active_adapter)


def _adapter_tensors(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=model.active_adapter)


def set_trainable(model: Any, train_a: bool = True, train_b: bool = True) -> None:
    """Freeze lora_A and/or lora_B of the active adapter (FFA-LoRA trains B only; RoLoRA
    alternates); other adapters stay frozen."""
    active = model.active_adapter
    for name, param in model.named_parameters():
        if f".lora_A.{active}." in name:
            param.requires_grad_(train_a)
        elif f".lora_B.{active}." in name:
            param.requires_grad_(train_b)


def save_adapter(model: Any, directory: str | Path) -> Path:
    """Write a PEFT adapter directory that ``PeftModel.from_pretrained`` loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(None):
        model.save_pretrained(directory)
    return directory


def set_base_delta(model: Any, deltas: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   tag: Any) -> None:
    """Make each adapted module's frozen weight ``W0 + B @ A`` (FLoRA/FedEx base corrections).

    ``deltas`` maps a LoRA module name to scale-1 factors ``(B (out, R), A (R, in))``. The
    original weights are kept on the model the first time, so the call is idempotent and a
    cached model shared by several virtual clients can move to any correction; ``tag`` names the
    correction applied (nothing is recomputed when it is unchanged).
    """
    if getattr(model, "_fedlora_base_tag", None) == tag:
        return
    originals: dict[str, torch.Tensor] = model.__dict__.setdefault("_fedlora_base_w0", {})
    with torch.no_grad():
        for module, (b, a) in deltas.items():
            layer = model.get_submodule(module).base_layer
            if module not in originals:
                originals[module] = layer.weight.detach().clone()
            w0 = originals[module]
            delta = torch.from_numpy(np.asarray(b, np.float32) @ np.asarray(a, np.float32))
            if delta.shape != w0.shape:
                raise PayloadError("SHAPE_MISMATCH", f"base correction of {module}: expected "
                                   f"{tuple(w0.shape)}, got {tuple(delta.shape)}")
            layer.weight.copy_(w0 + delta.to(device=w0.device, dtype=w0.dtype))
        for module, w0 in originals.items():
            if module not in deltas:
                model.get_submodule(module).base_layer.weight.copy_(w0)
    model._fedlora_base_tag = tag
