"""Typed run configuration, built once from Flower's flat ``run_config``.

Flower hands apps a flat mapping such as ``{"lora.r": 8, "strategy": "fedit"}``. Every key
belongs to a dataclass field: top-level keys to :class:`FederationConfig` (in
:mod:`fedlora.federation_config`, re-exported here), ``model.*`` to
:class:`ModelConfig`, and so on (kebab-case keys, snake_case fields). :func:`from_flat` rejects
unknown keys (listing the valid ones) and wrong types, then each dataclass checks its values.
Components never see this module's classes: builders turn them into plain arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from fedlora.config_fields import check_choice as _choice
from fedlora.config_fields import check_positive as _positive
from fedlora.config_fields import csv_items as _csv
from fedlora.config_fields import help_field as _f
from fedlora.errors import ConfigError
from fedlora.experiments import attack_catalog
from fedlora.federation_config import (  # noqa: F401 - the constants are re-exported
    SAMPLINGS,
    SERVER_OPTIMIZERS,
    WIRE_DTYPES,
    FederationConfig,
)

TASKS = ("seq-cls", "causal-lm")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "int8")
DATA_SOURCES = ("bbc-news", "chatterbot", "files")
PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")
LORA_BIASES = ("none", "all", "lora_only")
LORA_INITS = ("default", "gaussian", "pissa", "olora")  # and pissa_niter_<k>
# fedlora.learning.training
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
AUTOCASTS = ("none", "bf16", "fp16")
CHECKPOINTINGS = ("auto", "on", "off")


def is_base_dependent(init: str) -> bool:
    """Whether ``lora.init`` derives the factors from the base weights (PiSSA, OLoRA; peft
    rewrites such a base to the residual ``W - s B0 A0``)."""
    k = init[len("pissa_niter_"):] if init.startswith("pissa_niter_") else ""
    return init in ("pissa", "olora") or (k.isdigit() and int(k) >= 1)


@dataclass(frozen=True)
class ModelConfig:
    """``model.*`` keys: the base model, its task, dtype, truncation and quantization."""
    name: str = _f("minilm", "'minilm', 'smollm2', a local model directory or a hub id")
    task: str = _f("seq-cls", "seq-cls (sequence classification) or causal-lm")
    dtype: str = _f("float32", "dtype of the frozen base weights: " + ", ".join(DTYPES))
    num_hidden_layers: int = _f(0, "truncate the model to this many layers (0 = all; tests)")
    num_labels: int = _f(0, "classes of a seq-cls task (0 = from the packaged corpus)")
    quantization: str = _f("none", "QLoRA: load the frozen base in 4-bit 'nf4' or 'int8' through "
                           "bitsandbytes (pip install 'fedlora[qlora]'); model.dtype is then the "
                           "compute dtype (bfloat16 on GPUs)")

    def __post_init__(self) -> None:
        _choice("model.task", self.task, TASKS)
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.quantization", self.quantization, QUANTIZATIONS)
        _positive("model.num-hidden-layers", self.num_hidden_layers, zero_ok=True)
        _positive("model.num-labels", self.num_labels, zero_ok=True)
        if not self.name:
            raise ConfigError("model.name is empty; give 'minilm', 'smollm2', a path or a hub id")


@dataclass(frozen=True)
class LoraConfig:
    """``lora.*`` keys: the adapter every client trains (rank, alpha, targets, DoRA, rsLoRA)."""
    r: int = _f(8, "LoRA rank (default for every client)")
    alpha: float = _f(16.0, "lora_alpha; scaling is alpha/r (alpha/sqrt(r) with rsLoRA)")
    dropout: float = _f(0.05, "lora_dropout")
    target_modules: str = _f("query,value", "comma-separated module names to adapt, or "
                             "'all-linear'")
    bias: str = _f("none", "bias training: none, all, lora_only")
    modules_to_save: str = _f("", "comma-separated extra modules trained and sent in full "
                              "(the classification head is added for seq-cls)")
    use_rslora: bool = _f(False, "rank-stabilised scaling alpha/sqrt(r)")
    use_dora: bool = _f(False, "DoRA (weight-decomposed LoRA): each module's magnitude vector "
                        "travels as a head, averaged by examples; equal-rank linear rules, "
                        "float32 unquantized base only")
    init: str = _f("default", "LoRA init: default (kaiming-uniform A, B = 0), gaussian, or "
                   "the base-dependent pissa, pissa_niter_<k>, olora (peft's names: computed "
                   "once on the server, the residual base sent to every node)")
    rank_pattern: str = _f("", "per-module ranks, e.g. 'query=16,value=4' (peft's rank_pattern: "
                           "a key matches a module name ending in it, as a regex): the ranks of "
                           "a client at rank lora.r; a client of rank r gets ceil(p*r/lora.r)")
    alpha_pattern: str = _f("", "per-module lora_alpha, e.g. 'query=32' (peft's alpha_pattern); "
                            "the same for every client rank")

    def __post_init__(self) -> None:
        _positive("lora.r", self.r)
        _positive("lora.alpha", self.alpha)
        self.rank_pattern_items()
        self.alpha_pattern_items()
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1); got {self.dropout}")
        if not _csv(self.target_modules):
            raise ConfigError("lora.target-modules is empty; name modules like 'query,value'")
        _choice("lora.bias", self.bias, LORA_BIASES)
        if self.init not in LORA_INITS and not is_base_dependent(self.init):
            raise ConfigError(f"lora.init must be one of {', '.join(LORA_INITS)} or "
                              f"pissa_niter_<k> (k >= 1 subspace iterations); got {self.init!r}")

    @property
    def target_module_list(self) -> list[str] | str:
        """``target-modules`` as PEFT takes it: a list of names, or the string ``"all-linear"``."""
        names = list(_csv(self.target_modules))
        return "all-linear" if names == ["all-linear"] else names

    @property
    def modules_to_save_list(self) -> list[str]:
        """``modules-to-save`` as a list of module names (empty: none)."""
        return list(_csv(self.modules_to_save))

    def rank_pattern_items(self) -> tuple[tuple[str, int], ...]:
        """Parsed ``lora.rank-pattern``: ``(key, rank)`` pairs in the order written."""
        return tuple((k, int(v)) for k, v in _pattern("lora.rank-pattern", self.rank_pattern,
                                                      int))

    def alpha_pattern_items(self) -> tuple[tuple[str, float], ...]:
        """Parsed ``lora.alpha-pattern``: ``(key, alpha)`` pairs in the order written."""
        return _pattern("lora.alpha-pattern", self.alpha_pattern, float)



def _pattern(key: str, text: str, kind: type) -> tuple[tuple[str, Any], ...]:
    from fedlora.aggregation.patterns import parse_pattern

    try:
        return parse_pattern(text, kind)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


@dataclass(frozen=True)
class DataConfig:
    """``data.*`` keys: the corpus, how it is split over the clients, and tokenization."""
    source: str = _f("bbc-news", "bbc-news, chatterbot, or files (your own, see data.path)")
    path: str = _f("", "files source: a .jsonl/.json/.csv/.parquet file or a directory of them "
                   "({partition-id} is replaced; a node's data-path overrides it)")
    partitioner: str = _f("iid", "iid, dirichlet, pathological, or natural (topic = client)")
    dirichlet_alpha: float = _f(0.5, "concentration of the dirichlet partitioner")
    classes_per_partition: int = _f(2, "labels per client for the pathological partitioner")
    samples_per_client: int = _f(160, "cap on a client's training examples (0 = no cap)")
    eval_samples: int = _f(300, "cap on the held-out split the server evaluates (0 = all); a "
                           "data.heldout-path file is evaluated whole")
    heldout_path: str = _f("", "the server's held-out file or directory for central evaluation, "
                           "evaluated whole (every row); '' = the packaged corpus's held-out "
                           "split, or none for per-client files")
    test_fraction: float = _f(0.2, "held-out fraction of the corpus kept for evaluation")
    max_length: int = _f(48, "tokens per example (longer ones are truncated)")

    def __post_init__(self) -> None:
        _choice("data.source", self.source, DATA_SOURCES)
        _choice("data.partitioner", self.partitioner, PARTITIONERS)
        _positive("data.dirichlet-alpha", self.dirichlet_alpha)
        _positive("data.classes-per-partition", self.classes_per_partition)
        _positive("data.samples-per-client", self.samples_per_client, zero_ok=True)
        _positive("data.eval-samples", self.eval_samples, zero_ok=True)
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"data.test-fraction must be in (0, 1); got {self.test_fraction}")
        _positive("data.max-length", self.max_length)
        # data.source = files without data.path is valid: in deployment each SuperNode names its
        # file (node config data-path), which the ServerApp never sees; `fedlora run` and a node
        # with neither refuse it (run_setup.preflight, data.own_split).


@dataclass(frozen=True)
class TrainConfig:
    """``train.*`` keys: each client's local optimisation (steps, batch, optimizer, memory)."""
    local_steps: int = _f(10, "optimizer steps per client per round")
    batch_size: int = _f(16, "examples per micro-batch (per optimizer step with "
                         "grad-accum-steps = 1)")
    lr: float = _f(0.003, "AdamW learning rate of the adapter")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping (0 = off)")
    proximal_mu: float = _f(0.0, "FedProx: mu/2 * ||theta - theta_global||^2 on the adapter")
    num_threads: int = _f(0, "torch threads per client process (0 = torch default)")
    grad_accum_steps: int = _f(1, "micro-batches of batch-size examples whose gradients add up "
                               "to one optimizer step (one step sees grad-accum-steps x "
                               "batch-size examples; activations are held for one micro-batch)")
    gradient_checkpointing: str = _f("auto", "recompute activations in the backward pass "
                                     "instead of storing them: on, off, or auto (on with "
                                     "model.quantization, as in QLoRA; off otherwise)")
    optimizer: str = _f("adamw", "adapter optimizer: adamw (torch), or bitsandbytes' adamw_8bit "
                        "(8-bit optimizer state, CPU and CUDA), paged_adamw_8bit / "
                        "paged_adamw_32bit (state paged to CPU memory under GPU memory "
                        "pressure; CUDA only)")
    autocast: str = _f("none", "mixed-precision forward/backward of the training steps: none, "
                       "bf16 or fp16 (fp16 with dynamic loss scaling); adapter weights and "
                       "optimizer state stay float32")

    def __post_init__(self) -> None:
        _positive("train.grad-accum-steps", self.grad_accum_steps)
        _choice("train.gradient-checkpointing", self.gradient_checkpointing, CHECKPOINTINGS)
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _choice("train.autocast", self.autocast, AUTOCASTS)
        _positive("train.local-steps", self.local_steps)
        _positive("train.batch-size", self.batch_size)
        _positive("train.lr", self.lr)
        _positive("train.weight-decay", self.weight_decay, zero_ok=True)
        _positive("train.max-grad-norm", self.max_grad_norm, zero_ok=True)
        _positive("train.proximal-mu", self.proximal_mu, zero_ok=True)
        _positive("train.num-threads", self.num_threads, zero_ok=True)


@dataclass(frozen=True)
class EvalConfig:
    """``eval.*`` keys: the server's evaluation, logged samples and lm-eval tasks."""
    batch_size: int = _f(64, "examples per evaluation batch")
    samples: int = _f(3, "causal-lm: greedy answers to the first N held-out prompts, logged "
                         "per round to samples.jsonl (0 = none)")
    sample_tokens: int = _f(32, "causal-lm: most new tokens per logged sample answer")
    tasks: str = _f("", "causal-lm: comma-separated lm-eval tasks the server runs on the final "
                        "export, to eval/<task>.json (needs fedlora[eval]; e.g. "
                        "'fedlora-chatterbot-qa,fedlora-bbc-topic')")
    tasks_every: int = _f(0, "also run eval.tasks every N rounds on the global model, to "
                             "eval/round-<r>/<task>.json (0 = final export only)")
    tasks_limit: int = _f(0, "at most N examples per eval.tasks task (0 = all)")

    def __post_init__(self) -> None:
        _positive("eval.batch-size", self.batch_size)
        _positive("eval.samples", self.samples, zero_ok=True)
        _positive("eval.sample-tokens", self.sample_tokens)
        _positive("eval.tasks-every", self.tasks_every, zero_ok=True)
        _positive("eval.tasks-limit", self.tasks_limit, zero_ok=True)

    def task_list(self) -> list[str]:
        """``eval.tasks`` as a list of lm-eval task names (empty: none)."""
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


@dataclass(frozen=True)
class RunConfig:
    """The whole run: one section per concern."""

    fl: FederationConfig = field(default_factory=FederationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.model.task == "seq-cls" and self.data.source == "chatterbot":
            raise ConfigError(
                "model.task 'seq-cls' needs labelled data; the chatterbot corpus is Q/A pairs "
                "(use model.task = 'causal-lm', or data.source = 'bbc-news')"
            )
        if self.model.task == "causal-lm" and self.data.source == "bbc-news":
            raise ConfigError(
                "model.task 'causal-lm' needs instruction/response pairs; bbc-news is labelled "
                "text (use data.source = 'chatterbot' or your own files)"
            )
        if self.eval.task_list() and self.model.task != "causal-lm":
            raise ConfigError(f"eval.tasks {self.eval.tasks!r}: lm-eval tasks score a causal LM; "
                              f"this run is model.task = {self.model.task!r} (clear eval.tasks)")
        ranks = self.fl.ranks() or (self.lora.r,)
        if max(ranks) > self.fl.max_rank:
            raise ConfigError(f"lora.r {self.lora.r} exceeds max-rank {self.fl.max_rank}")
        if self.lora.rank_pattern or self.lora.alpha_pattern:
            self._check_patterns(max(ranks))
        if self.lora.use_dora:
            _check_dora(self)
        if is_base_dependent(self.lora.init):
            _check_base_init(self)
        attack_catalog.check(self)

    def _check_patterns(self, top: int) -> None:
        """Per-module ranks/alphas: within max-rank at the largest client rank, and not with
        the features whose uploads assume one rank and one scale for every module."""
        for key, p in self.lora.rank_pattern_items():
            scaled = -(-p * top // self.lora.r)
            if scaled > self.fl.max_rank:
                raise ConfigError(f"lora.rank-pattern {key}={p} gives a rank-{top} client rank "
                                  f"{scaled} (ceil({p}*{top}/lora.r={self.lora.r})), above "
                                  f"max-rank {self.fl.max_rank}; lower it or raise max-rank")
        for flag, on in (("secure-aggregation", self.fl.secure_aggregation),
                         ("hetlora-prune", self.fl.hetlora_prune)):
            if on:
                raise ConfigError(f"lora.rank-pattern / lora.alpha-pattern are not supported "
                                  f"with {flag} (its uploads share one rank and one scale "
                                  f"across modules); set {flag} = false or clear the patterns")

    def rank_for_partition(self, partition_id: int) -> int:
        """LoRA rank of a simulated client (``rank-by-partition`` cycles over partitions)."""
        ranks = self.fl.ranks()
        return ranks[partition_id % len(ranks)] if ranks else self.lora.r


# Top-level keys live in FederationConfig; every other section is a key prefix.
_SECTIONS: dict[str, str] = {"fl": "", "model": "model", "lora": "lora", "data": "data",
                             "train": "train", "eval": "eval"}


def _section_types() -> dict[str, type]:
    hints = get_type_hints(RunConfig)
    return {name: hints[name] for name in _SECTIONS}


def _key(prefix: str, field_name: str) -> str:
    kebab = field_name.replace("_", "-")
    return f"{prefix}.{kebab}" if prefix else kebab


def schema() -> dict[str, tuple[type, Any, str]]:
    """Every valid flat key → (type, default, help)."""
    out: dict[str, tuple[type, Any, str]] = {}
    for section, cls in _section_types().items():
        hints = get_type_hints(cls)
        for f in fields(cls):
            out[_key(_SECTIONS[section], f.name)] = (hints[f.name], f.default, f.metadata["help"])
    return out


def defaults() -> dict[str, Any]:
    """The flat default configuration (what ``[tool.flwr.app.config]`` must declare)."""
    return {key: default for key, (_, default, _) in schema().items()}


def dora_strategies() -> tuple[str, ...]:
    """The rules that accept ``lora.use-dora``: equal-rank, linear, base-preserving ones (the
    magnitude vector is a per-module head, averaged by examples like every head)."""
    from fedlora.aggregation import available_strategies, strategy_info

    return tuple(n for n in available_strategies() if (info := strategy_info(n)).linear
                 and info.equal_ranks and not info.modifies_base and not info.refactors)


def _check_dora(cfg: RunConfig) -> None:
    """Refuse the combinations whose DoRA aggregate would not be the model the clients train.

    DoRA (Liu et al. 2024, arXiv 2402.09353) computes ``m ⊙ (W0 + sBA) / ‖W0 + sBA‖`` per
    output row. Averaging ``m``, A and B separately is FedIT's approximation applied to one
    more factor; a rule that re-factorises or truncates ΔW (mixed ranks, fedsvd) or moves it
    into the base (flora, fedex) changes the norm that ``m`` was trained against, so those are
    refused. The server evaluates by merging ΔW into a float32 copy of the base; a half-
    precision or quantized base keeps ΔW in a side buffer that DoRA's norm does not see.
    """
    accepted = dora_strategies()
    if cfg.fl.strategy not in accepted:
        raise ConfigError(
            f"lora.use-dora: strategy {cfg.fl.strategy!r} re-factorises, truncates or merges "
            f"ΔW into the base, which changes the weight norm DoRA's magnitude vector was "
            f"trained against; use one of {', '.join(accepted)} or set lora.use-dora = false")
    if cfg.model.quantization != "none" or cfg.model.dtype != "float32":
        raise ConfigError(
            f"lora.use-dora needs a float32 unquantized base (got model.dtype = "
            f"{cfg.model.dtype!r}, model.quantization = {cfg.model.quantization!r}): the "
            f"server merges ΔW into the base weights to evaluate, and a half-precision or "
            f"quantized weight keeps it in a side buffer that DoRA's weight norm does not "
            f"see; set model.dtype = 'float32' and model.quantization = 'none', or "
            f"lora.use-dora = false")


BASE_INIT_MIXED_RANKS = ("hetlora", "flexlora")  # mixed-rank rules tested on a residual base


def _check_base_init(cfg: RunConfig) -> None:
    """Refuse what a base-dependent ``lora.init`` (PiSSA, OLoRA) cannot run exactly.

    Each node holds the residual of its own rank (``W - s·B0[:, :r]·A0[:r]``): a rule that
    restarts the adapter on a merged base (flora) would count a low-rank tier's untrained
    components twice, and a masked sum or a self-pruned rank cannot be completed with them.
    """
    init = f"lora.init = {cfg.lora.init}"
    if cfg.lora.use_dora or cfg.model.quantization != "none":
        raise ConfigError(f"{init} needs a plain LoRA adapter on an unquantized base (got "
                          f"lora.use-dora = {cfg.lora.use_dora}, model.quantization = "
                          f"{cfg.model.quantization!r}); set lora.init = default or drop those")
    if cfg.lora.rank_pattern or cfg.lora.alpha_pattern:
        raise ConfigError(f"{init} with lora.rank-pattern / lora.alpha-pattern: the residual "
                          f"base is defined for one rank per node; drop the patterns or set "
                          f"lora.init = default")
    if cfg.fl.hetlora_prune:
        raise ConfigError(f"{init} with hetlora-prune: a pruned node would drop principal "
                          f"components of its base; set hetlora-prune = false")
    if len(set(cfg.fl.ranks())) > 1 and cfg.fl.strategy not in BASE_INIT_MIXED_RANKS:
        raise ConfigError(f"{init} with mixed ranks runs with {', '.join(BASE_INIT_MIXED_RANKS)}"
                          f" (strategy {cfg.fl.strategy!r}); use one of them, one rank, or "
                          f"lora.init = default")
    if len(set(cfg.fl.ranks())) > 1 and cfg.fl.secure_aggregation:
        raise ConfigError(f"{init} with mixed ranks and secure-aggregation: the server "
                          f"completes each low-rank update with its frozen components, which a "
                          f"masked sum does not allow; use one rank or lora.init = default")


def _check_type(key: str, value: Any, expected: type) -> Any:
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif expected is str and isinstance(value, str):
        return value
    raise ConfigError(
        f"config key {key!r} expects {expected.__name__}; got {type(value).__name__} "
        f"{value!r}"
    )


def from_flat(flat: Mapping[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a flat Flower ``run_config``.

    Missing keys take their defaults; unknown keys and wrong types raise :class:`ConfigError`.
    """
    known = schema()
    unknown = sorted(set(flat) - set(known))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"unknown config key(s): {', '.join(hints)}. Valid keys: {', '.join(sorted(known))}"
        )
    values: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    for section, cls in _section_types().items():
        for f in fields(cls):
            key = _key(_SECTIONS[section], f.name)
            if key in flat:
                values[section][f.name] = _check_type(key, flat[key], known[key][0])
    sections = {name: cls(**values[name]) for name, cls in _section_types().items()}
    return RunConfig(**sections)


def to_flat(cfg: RunConfig) -> dict[str, Any]:
    """Inverse of :func:`from_flat` (used for ``config.json`` and run submission)."""
    out: dict[str, Any] = {}
    for section in _SECTIONS:
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            out[_key(_SECTIONS[section], name)] = value
    return out


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``-c "key=value key2='text'"`` overrides with TOML value syntax.

    Bare words that are not TOML values are taken as strings (``strategy=flexlora``).
    """
    import shlex
    import tomllib

    out: dict[str, Any] = {}
    for item in shlex.split(text):
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out
