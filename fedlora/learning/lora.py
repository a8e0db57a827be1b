"""The PEFT/transformers boundary: build LoRA models, move adapters to and from arrays.

Wire names are peft's state-dict names (``get_peft_model_state_dict``): a LoRA module
``M`` contributes ``M.lora_A.weight`` (r, in) and ``M.lora_B.weight`` (out, r); every other key
is a declared head (``modules_to_save``, e.g. the classifier) sent in full.

Every adapted layer is seen as a linear map ``x -> W x`` of shape ``(out, in)``, whatever the
layer stores (:func:`base_shape`):

* ``nn.Linear`` (and bitsandbytes' quantized linears): ``W`` is the weight, ``(out, in)``.
* transformers' ``Conv1D`` (GPT-2's fused ``c_attn``, ``c_proj``, ``c_fc``): the weight is
  stored ``(in, out)`` (``fan_in_fan_out``); peft still keeps ``lora_A`` (r, in) and
  ``lora_B`` (out, r) and adds ``(B A)ᵀ`` to the stored weight. Phi-3's ``qkv_proj`` is a plain
  ``nn.Linear``. peft adapts a fused projection as one layer (q, k and v share A and B).
* ``nn.Embedding`` (peft's ``lora_embedding_A`` (r, vocab), ``lora_embedding_B`` (dim, r)):
  a lookup is the product with a one-hot vector, so the layer is the linear map
  ``(dim, vocab)``, stored transposed as ``(vocab, dim)``; the adapter adds
  ``(B A)ᵀ`` and computes ``B A[:, ids]``. Its factors travel under the linear names
  ``M.lora_A.weight`` / ``M.lora_B.weight`` (:func:`adapter_arrays` renames them,
  :func:`load_adapter_arrays` renames them back), so every aggregation rule, view and
  base correction applies to them unchanged with ``in = vocab`` and ``out = dim``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.config import is_base_dependent
from fedlora.errors import ConfigError, PayloadError
from fedlora.learning.targets import HEAD_MODULES, check_targets

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# peft 0.21 calls a transformers 5 method deprecated in favour of a new name: noise for users
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
# peft sets fan_in_fan_out itself for transformers' Conv1D (GPT-2's c_attn), which is what we
# want: the weight is stored (in, out); see base_shape
warnings.filterwarnings("ignore", message=r"fan_in_fan_out is set to False but the target "
                        r"module is `Conv1D`", category=UserWarning)

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
EMB_A = ".lora_embedding_A"  # peft's names for an embedding's factors (ParameterDict entries)
EMB_B = ".lora_embedding_B"
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
    quantization: str = "none"  # "nf4" / "int8": QLoRA, base weights through bitsandbytes
    gradient_checkpointing: bool = False  # recompute activations in the backward pass


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
    use_dora: bool = False  # M.lora_magnitude_vector (out,) travels as a head
    init: str = "default"
    # peft's rank_pattern / alpha_pattern, (key, value) in matching order; the ranks are this
    # adapter's own (already combined with its r: fedlora.aggregation.patterns)
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def with_rank(self, r: int) -> AdapterSpec:
        """The same adapter at rank ``r`` (its rank pattern left as it is)."""
        return replace(self, r=r)

    @property
    def scale(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)``) of the modules no rank/alpha pattern names."""
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
    if spec.quantization == "none":
        model = auto.from_pretrained(spec.path, config=config, dtype=_DTYPES[spec.dtype])
        model.to(spec.device)
        if spec.gradient_checkpointing:
            _enable_checkpointing(model)
    else:
        model = _load_quantized(auto, spec, config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if spec.device == "cpu":
        # Small activations underflow to denormals in deep LMs; on CPUs they are ~3x slower
        # (SmolLM2 forward: 19 s -> 6 s here). Flushing them to zero changes no result we use.
        torch.set_flush_denormal(True)
    return model, tokenizer


def _enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation (gradient) checkpointing of the transformer blocks (Chen et al. 2016,
    "Training Deep Nets with Sublinear Memory Cost"): each block keeps only its input and
    recomputes its activations in the backward pass, ~ one extra forward of compute. The
    non-reentrant variant, so the frozen embeddings' output needs no ``requires_grad``."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient-checkpointing: {type(model).__name__} does not "
                          f"support gradient checkpointing; set train.gradient-checkpointing"
                          f"=off")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# Output heads stay floating point: classification heads are trained in full (modules_to_save),
# and lm_head is often tied to the input embeddings (an explicit skip list replaces
# transformers' default one, which would have kept it).


def _load_quantized(auto: Any, spec: ModelSpec, config: Any) -> torch.nn.Module:
    """QLoRA: the frozen base in 4-bit NF4 or 8-bit (bitsandbytes), prepared for k-bit training.

    Quantized weights, float ``spec.dtype`` compute, LoRA factors and heads in float32; peft's
    :func:`~peft.prepare_model_for_kbit_training` casts the remaining float weights (norms) to
    float32 and turns on gradient checkpointing when ``spec.gradient_checkpointing``.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"model.quantization={spec.quantization} needs bitsandbytes, which is not installed: "
            f"pip install 'fedlora[qlora]' (or set model.quantization=none)") from None
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    if spec.quantization == "nf4":
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_DTYPES[spec.dtype], llm_int8_skip_modules=list(HEAD_MODULES))
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(HEAD_MODULES))
    try:
        model = auto.from_pretrained(spec.path, config=config, quantization_config=quant,
                                     device_map={"": spec.device}, dtype=_DTYPES[spec.dtype])
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise ConfigError(
            f"bitsandbytes could not load {spec.path!r} with model.quantization="
            f"{spec.quantization} on {spec.device}: {exc}. bitsandbytes >= 0.50 has CPU and "
            f"CUDA kernels; on other devices set model.quantization=none") from exc
    for layer in model.modules():
        # bitsandbytes 0.50 repacks 4-bit weights for AVX512-BF16 CPU inference on the first
        # eval forward, and a later training forward on the repacked weight fails (in-place bias
        # add on a leaf); a client model alternates both, so keep the trainable layout.
        if getattr(layer, "support_avx512bf16_for_cpu", False):
            layer.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=spec.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})


def is_quantized(layer: torch.nn.Module) -> bool:
    """Whether a layer's weight is stored quantized (bitsandbytes 4-/8-bit)."""
    weight = getattr(layer, "weight", None)
    return weight is not None and not torch.is_floating_point(weight)


def peft_config(spec: AdapterSpec, task: str) -> Any:
    """The ``peft.LoraConfig`` of ``spec`` for ``task`` (seq-cls or causal-lm)."""
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
        use_dora=spec.use_dora,
        # a base-dependent init is computed once, on the server (base_dependent_init); every
        # other model gets a plain LoRA shell whose factors the server's arrays overwrite, so
        # peft never rewrites a node's (or an export's) base weights
        init_lora_weights=(True if spec.init == "default" or is_base_dependent(spec.init)
                           else spec.init),
        rank_pattern=dict(spec.rank_pattern),
        alpha_pattern=dict(spec.alpha_pattern),
    )


def build_peft_model(model_spec: ModelSpec, adapter: AdapterSpec, seed: int = 0) -> tuple[Any, Any]:
    """A fresh PEFT model with a seeded adapter (the server's initial global adapter)."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # covers new heads (e.g. the classifier) and the LoRA init
        base, tokenizer = load_base(model_spec)
        check_targets(base, adapter)
        model = get_peft_model(base, peft_config(adapter, model_spec.task))
    return model, tokenizer


class ModelCache:
    """Process-level cache: one frozen base model per :class:`ModelSpec`, shared by every
    adapter shape.

    In Flower's simulation one Ray actor serves many virtual clients, possibly of different
    LoRA ranks. Each base model is loaded once; each :class:`AdapterSpec` (a rank) adds a named
    PEFT adapter to it, and :meth:`get` activates the one asked for, so clients of three ranks
    share one copy of the frozen weights (not with ``lora.bias`` other than ``none``: trained
    biases belong to the base, so each adapter shape then gets its own model, rebuilt when the
    shape asked for changes). The model is shared by all clients: callers must
    overwrite every adapter array from the incoming message before training. Only frozen
    weights are worth caching; adapter and optimizer state never live here.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity  # base models kept (least recently used evicted first)
        self._models: OrderedDict[ModelSpec, tuple[Any, Any, dict[AdapterSpec, str]]] = \
            OrderedDict()

    def clear(self) -> None:
        """Drop every cached model (what a fresh client process starts with)."""
        self._models.clear()

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
        if adapter not in names and (adapter.bias != "none" or
                                     any(a.bias != "none" for a in names)):
            # trained biases are the base layers' own parameters, shared by every adapter, so
            # peft allows one adapter per model then: a new shape gets a fresh model
            del self._models[model_spec]
            return self.get(model_spec, adapter)
        if adapter not in names:
            check_targets(model, adapter)
            name = f"adapter-{len(names)}"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model.add_adapter(name, peft_config(adapter, model_spec.task))
            names[adapter] = name  # only once it exists
        model.set_adapter(names[adapter])
        return model, tokenizer


# ----------------------------------------------------------------------------- arrays


def adapter_arrays(model: Any) -> dict[str, np.ndarray]:
    """The active adapter (LoRA factors + declared heads) as float32 numpy arrays, peft key
    names (the same for every adapter name)."""
    return {_wire_name(k): v.detach().to("cpu", torch.float32).numpy().copy()
            for k, v in _adapter_tensors(model).items()}


def _wire_name(key: str) -> str:
    """peft's state-dict key → the wire key (embedding factors under the linear names)."""
    if key.endswith(EMB_A):
        return key[: -len(EMB_A)] + LORA_A
    if key.endswith(EMB_B):
        return key[: -len(EMB_B)] + LORA_B
    return key


def load_adapter_arrays(model: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Overwrite every adapter array of ``model``; the key sets and shapes must match exactly."""
    from peft import set_peft_model_state_dict

    tensors = _adapter_tensors(model)
    peft_name = {_wire_name(k): k for k in tensors}
    expected = {_wire_name(k): tuple(v.shape) for k, v in tensors.items()}
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
    state = {peft_name[k]: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
             for k, v in arrays.items()}
    set_peft_model_state_dict(model, state, adapter_name=model.active_adapter)


def _adapter_tensors(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    # "auto" (peft's default) re-reads the base model's config from disk on every call to see
    # whether the vocabulary was resized (~12 ms here); fedlora never resizes it, and never
    # sends base embedding weights
    return get_peft_model_state_dict(model, adapter_name=model.active_adapter,
                                     save_embedding_layers=False)


def set_trainable(model: Any, train_a: bool = True, train_b: bool = True) -> None:
    """Freeze lora_A and/or lora_B of the active adapter (FFA-LoRA trains B only; RoLoRA
    alternates); other adapters stay frozen."""
    active = model.active_adapter
    for name, param in model.named_parameters():
        if f".lora_A.{active}." in name or name.endswith(f"{EMB_A}.{active}"):
            param.requires_grad_(train_a)
        elif f".lora_B.{active}." in name or name.endswith(f"{EMB_B}.{active}"):
            param.requires_grad_(train_b)


def save_adapter(model: Any, directory: str | Path) -> Path:
    """Write ``model``'s active adapter as a PEFT adapter directory that
    ``PeftModel.from_pretrained`` loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # only the active adapter, at the top of ``directory``: a cached base (ModelCache) holds one
    # named adapter per rank, and peft would save them all, the first one ("default") on top
    active = model.active_adapter
    with contextlib.redirect_stdout(None):
        model.save_pretrained(directory, selected_adapters=[active])
    if active != "default":  # peft put it in a subdirectory of its name
        for item in (directory / active).iterdir():
            item.replace(directory / item.name)
        (directory / active).rmdir()
    # peft writes target_modules from a set, in an order that varies per process (string
    # hashing): sorted, the same adapter gives the same adapter_config.json bytes every run
    config_file = directory / "adapter_config.json"
    conf = json.loads(config_file.read_text())
    if isinstance(conf.get("target_modules"), list):
        conf["target_modules"] = sorted(conf["target_modules"])
        config_file.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    return directory


def base_shape(layer: torch.nn.Module) -> tuple[int, int, bool]:
    """``(out, in, transposed)`` of the linear map ``layer`` computes (see the module
    docstring): ``transposed`` when the weight is stored ``(in, out)`` (``Conv1D``,
    ``nn.Embedding``), so a correction ``ΔW`` (out, in) is added to it as ``ΔWᵀ``."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(layer, torch.nn.Embedding):
        return layer.embedding_dim, layer.num_embeddings, True
    if isinstance(layer, Conv1D):
        return layer.nf, layer.weight.shape[0], True
    if hasattr(layer, "out_features") and hasattr(layer, "in_features"):
        return layer.out_features, layer.in_features, False
    raise ConfigError(f"LoRA on a {type(layer).__name__} layer is not supported by fedlora "
                      f"(only nn.Linear, transformers' Conv1D and nn.Embedding); take it out "
                      f"of lora.target-modules")


def set_base_delta(model: Any, deltas: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   tag: Any) -> None:
    """Make each adapted module compute with ``W0 + B @ A`` (FLoRA/FedEx base corrections).

    ``deltas`` maps a LoRA module name to scale-1 factors ``(B (out, R), A (R, in))`` of the
    layer's linear map (:func:`base_shape`; a weight stored ``(in, out)`` takes ``(B A)ᵀ``). A
    float32 ``nn.Linear`` / ``Conv1D`` weight takes the correction in place (its original is
    kept on the model the first time, so the call is idempotent and a cached model shared by
    several virtual clients can move to any correction). A quantized (QLoRA) or
    half-precision weight cannot hold it — a 4-bit weight has no room for it and bfloat16
    rounds small corrections away — so those layers keep the factors in a separate float32
    buffer, added to the layer's output as ``x Aᵀ Bᵀ``. So do embeddings, whatever their
    dtype: an input embedding is often tied to the output head (GPT-2, small Llamas), and
    peft's embedding LoRA changes only the lookup, so the shared weight must stay as it is.
    ``tag`` names the correction applied (nothing is recomputed when it is unchanged).
    """
    if getattr(model, "_fedlora_base_tag", None) == tag:
        return
    originals: dict[str, torch.Tensor] = model.__dict__.setdefault("_fedlora_base_w0", {})
    buffered: set[str] = model.__dict__.setdefault("_fedlora_buffered", set())
    with torch.no_grad():
        for module, (b, a) in deltas.items():
            layer = model.get_submodule(module).base_layer
            out_features, in_features, transposed = base_shape(layer)
            expected = (out_features, in_features)
            if (np.shape(b)[0], np.shape(a)[-1]) != expected or np.shape(b)[1] != np.shape(a)[0]:
                raise PayloadError("SHAPE_MISMATCH", f"base correction of {module}: expected "
                                   f"{expected}, got B {np.shape(b)} @ A {np.shape(a)}")
            if (layer.weight.dtype == torch.float32
                    and not isinstance(layer, torch.nn.Embedding)):
                if module not in originals:
                    originals[module] = layer.weight.detach().clone()
                delta = torch.from_numpy(np.asarray(b, np.float32) @ np.asarray(a, np.float32))
                if transposed:
                    delta = delta.T
                layer.weight.copy_(originals[module] + delta.to(layer.weight.device))
            else:
                set_correction_buffer(layer, b, a)
                buffered.add(module)
        for module, w0 in originals.items():
            if module not in deltas:
                model.get_submodule(module).base_layer.weight.copy_(w0)
        for module in buffered - set(deltas):
            set_correction_buffer(model.get_submodule(module).base_layer, None, None)
        buffered &= set(deltas)
    model._fedlora_base_tag = tag


def _add_correction(layer: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    b, a = layer._fedlora_correction
    if isinstance(layer, torch.nn.Embedding):  # token ids: row lookup of Aᵀ (vocab, R)
        return output + (torch.nn.functional.embedding(inputs[0], a.T) @ b.T).to(output.dtype)
    return output + ((inputs[0].to(a.dtype) @ a.T) @ b.T).to(output.dtype)


def set_correction_buffer(layer: torch.nn.Module, b: np.ndarray | None,
                          a: np.ndarray | None) -> None:
    """Add ``x Aᵀ Bᵀ`` (float32; an embedding adds ``Aᵀ[ids] Bᵀ``) to ``layer``'s output;
    ``None`` removes the correction."""
    handle = layer.__dict__.pop("_fedlora_hook", None)
    if handle is not None:
        handle.remove()
    layer.__dict__.pop("_fedlora_correction", None)
    if b is None:
        return
    device = next(layer.parameters()).device
    layer._fedlora_correction = (torch.as_tensor(np.asarray(b, np.float32), device=device),
                                 torch.as_tensor(np.asarray(a, np.float32), device=device))
    layer._fedlora_hook = layer.register_forward_hook(_add_correction)
