"""Typed run configuration, built once from Flower's flat ``run_config``.

Flower hands apps a flat mapping such as ``{"lora.r": 8, "strategy": "fedit"}``. Every key
belongs to a dataclass field: top-level keys to :class:`FederationConfig`, ``model.*`` to
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

from fedlora.errors import ConfigError
from fedlora.experiments import attack_catalog

TASKS = ("seq-cls", "causal-lm")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "int8")
DATA_SOURCES = ("bbc-news", "chatterbot", "files")
PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")
LORA_BIASES = ("none", "all", "lora_only")
LORA_INITS = ("default", "gaussian")
SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
WIRE_DTYPES = ("float32", "float16", "bfloat16")  # see fedlora.federation.transport
SAMPLINGS = ("uniform", "data-size")
# fedlora.learning.training
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
AUTOCASTS = ("none", "bf16", "fp16")
CHECKPOINTINGS = ("auto", "on", "off")


def _f(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best in the tables below
    return field(default=default, metadata={"help": help})


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{key} must be {bound}; got {value!r}")


@dataclass(frozen=True)
class FederationConfig:
    num_server_rounds: int = _f(3, "federated rounds")
    num_clients: int = _f(2, "simulated clients `fedlora run` starts (--num-clients overrides "
                          "it); under `flwr run .` the federation's options.num-supernodes "
                          "decides instead")
    seed: int = _f(0, "seed of adapter init, data splits, client sampling and local training")
    output_dir: str = _f("", "where the ServerApp writes config.json, metrics.jsonl, adapter/ "
                         "('' = ~/fedlora-runs/<timestamp> on the machine the ServerApp runs "
                         "on; `fedlora run` and `fedlora launch` set it to their --out)")
    strategy: str = _f("fedit", "aggregation rule (see `fedlora strategies`)")
    server_optimizer: str = _f("none", "server optimizer on the pseudo-gradient: "
                               + ", ".join(SERVER_OPTIMIZERS))
    server_lr: float = _f(0.0, "server learning rate (0 = the optimizer's default: fedavgm 1.0, "
                          "fedadam 0.03, fedyogi 0.01, fedadagrad 0.1)")
    server_momentum: float = _f(0.0, "FedAvgM momentum")
    server_beta_1: float = _f(0.9, "FedAdam/FedYogi first-moment decay")
    server_beta_2: float = _f(0.99, "FedAdam/FedYogi second-moment decay")
    server_tau: float = _f(0.001, "adaptivity of FedAdam/FedYogi/FedAdagrad")
    fraction_train: float = _f(1.0, "fraction of available nodes sampled for training each round")
    num_train_nodes: int = _f(0, "nodes sampled for training each round (0 = fraction-train of "
                              "the available nodes); at least min-train-nodes")
    sampling: str = _f("uniform", "how the nodes of a round are drawn (seeded, without "
                       "replacement): uniform, or data-size (probability proportional to a "
                       "node's training examples, which each node reports once at start-up)")
    fraction_evaluate: float = _f(0.0, "fraction of nodes evaluating the global adapter on their "
                                  "own held-out data each round (0 = central evaluation only)")
    min_available_nodes: int = _f(2, "nodes to wait for before the first round")
    min_train_nodes: int = _f(2, "minimum nodes sampled per round")
    round_timeout: float = _f(3600.0, "seconds to wait for the replies of one round")
    rank_by_partition: str = _f("", "LoRA rank per partition id in simulation, e.g. '4,8,16' "
                                "('' = lora.r for all; deployment nodes set lora-rank)")
    max_rank: int = _f(64, "largest LoRA rank the server accepts from a client")
    hetlora_weight_by_examples: bool = _f(False, "hetlora: multiply norm weights by examples")
    hetlora_prune: bool = _f(False, "hetlora: local rank self-pruning (Cho et al. 2024): each "
                             "client penalises its tail components and drops them once their "
                             "norm falls (false = every client trains its full rank)")
    hetlora_prune_gamma: float = _f(0.99, "hetlora-prune: decay factor γ; the tail is "
                                    "components floor(γ r)..r-1, a prune leaves floor(γ r)")
    hetlora_prune_lambda: float = _f(1e-3, "hetlora-prune: weight λ of the tail-norm "
                                     "regulariser in the local loss")
    personal_adapter_dir: str = _f("", "fedsa: each node saves its personal adapter (global "
                                   "A + its own B, PEFT format) at the end of the run in "
                                   "<dir>/<partition-id>/; a node config personal-adapter-dir "
                                   "overrides it ('' = off; `fedlora run` sets OUT/personal)")
    flexlora_split: str = _f("balanced", "flexlora: how Σ is split between the factors: "
                             "'balanced' (Σ^½ each) or 'init-a' (A rows at PEFT-init norm)")
    rolora_first_phase: str = _f("b", "rolora: factor trained in round 1 ('b' or 'a')")
    lora_fair_lambda: float = _f(0.01, "lora-fair: weight of the penalty on the server's "
                                 "correction of B (0 = the least-squares correction)")
    robust_reducer: str = _f("median", "robust: coordinate-wise median, trimmed-mean or mean "
                             "of the clients' ΔW")
    robust_trim: float = _f(0.1, "robust: fraction trimmed at each end by trimmed-mean "
                            "(at least one per end when > 0; needs min-accepted >= 3)")
    robust_clip_multiplier: float = _f(0.0, "robust: clip each client's change this round "
                                       "to this × the median change norm (0 = no clipping)")
    min_accepted: int = _f(1, "accepted replies a round needs; with fewer the round is "
                           "abandoned and the previous global adapter kept")
    min_accepted_fraction: float = _f(0.0, "the same as a fraction of the sampled nodes")
    max_failed_rounds: int = _f(3, "abandoned rounds in a row that end the run with an error")
    max_examples: int = _f(10_000_000, "largest example count a reply may declare (its weight)")
    max_weight_fraction: float = _f(1.0, "largest share of a round's total weight one reply "
                                    "may carry; larger weights are capped (1 = no cap; plain "
                                    "rounds)")
    max_update_norm: float = _f(1000.0, "a reply whose factors moved farther than this "
                                "(Frobenius norm over all modules) is rejected (0 = no limit)")
    clip_update_norm: float = _f(0.0, "scale each reply's factor update down to this norm "
                                 "before aggregation (0 = no clipping)")
    clip_quantile: float = _f(0.0, "adaptive clipping: the bound tracks this quantile of the "
                              "update norms, starting at clip-update-norm (or 1.0); 0 = off")
    clip_learning_rate: float = _f(0.2, "adaptive clipping: step of the geometric bound update")
    checkpoint_every: int = _f(1, "write a server checkpoint every N rounds (0 = never)")
    checkpoint_keep: int = _f(2, "checkpoints kept (older ones are deleted)")
    resume: bool = _f(False, "continue from the newest intact checkpoint in output-dir")
    secure_aggregation: bool = _f(False, "the server learns only the weighted sum of the "
                                  "clients' factors (SecAgg+ message rounds; fedit, ffa, fedsa, "
                                  "rolora, hetlora, fedsvd); max-update-norm cannot be "
                                  "checked, clip-update-norm is applied by each client")
    secagg_threshold: int = _f(0, "secure aggregation: shares needed to rebuild a client's "
                               "secrets (0 = a strict majority of its share group, which "
                               "tolerates the most dropouts)")
    secagg_neighbours: int = _f(0, "secure aggregation: neighbours each client masks with "
                                "(0 = the smallest k, and threshold, that Bell et al. 2020's "
                                "bounds give for secagg-gamma and secagg-delta; >= n-1 = every "
                                "other client)")
    secagg_gamma: float = _f(1 / 3, "secure aggregation: fraction of clients assumed to collude "
                             "with the server, in [0, 1); sizes neighbours and threshold so "
                             "that P(an honest client is exposed) <= 2^-40 (logged at start-up)")
    secagg_delta: float = _f(0.1, "secure aggregation: fraction of clients assumed to drop out "
                             "in a round, in [0, 1); sizes neighbours and threshold so that "
                             "P(the round fails) <= 2^-30 (logged at start-up)")
    secagg_clip_range: float = _f(8.0, "secure aggregation: every uploaded coordinate (factor "
                                  "or head value, before its weight is applied) is clipped to "
                                  "[-c, c]; the fixed-point step is c * secagg-max-weight / "
                                  "floor((2^31-1)/n)")
    secagg_max_weight: int = _f(10_000, "secure aggregation: largest num-examples a client may "
                                "declare (its weight); a larger one is rejected. The "
                                "fixed-point step grows with it")
    wire_dtype: str = _f("float32", "dtype of the LoRA factors and heads on the wire, server to "
                         "client and back: float32, float16 or bfloat16 (half the bytes); the "
                         "server aggregates in float32")
    sign_updates: bool = _f(False, "each client signs its update (Ed25519 over run, round, node, "
                            "a nonce and the reply's hash); the server verifies it before "
                            "decoding and rejects tampered, replayed and duplicate replies")
    signing_keys: str = _f("", "sign-updates: server-side directory of the registered public "
                           "keys (signing-*.pub from `fedlora certs`); '' = trust each node's "
                           "key on first use, announced in the capability query")
    dp_mode: str = _f("off", "client-level differential privacy: off, central (clients clip, the "
                      "server adds noise), local (clients clip and add noise) or distributed "
                      "(with secure aggregation: each client adds its share of the noise "
                      "inside the secure sum); fedit, ffa (recommended), fedsa, rolora, fedsvd")
    dp_clip_norm: float = _f(1.0, "DP: L2 bound of each client's update (sent - received)")
    dp_noise_multiplier: float = _f(1.0, "DP: noise std / clip norm (on the sum, or per client "
                                    "in local mode)")
    dp_delta: float = _f(1e-5, "DP: the delta for which epsilon is reported per round")
    dp_min_contributors: int = _f(0, "dp-mode = 'distributed': the fewest updates a secure sum "
                                  "may have; each client adds noise of std sigma*C/sqrt(m) and "
                                  "the server does not unmask a sum of fewer (0 = the clients "
                                  "sampled per round: no dropout tolerated)")
    attack: str = _f("", "simulation only: the attack the attacking clients run ('' = none; "
                     "see `fedlora attacks`)")
    attackers: str = _f("", "simulation only: the attacking clients, a count ('2' = partitions "
                        "0 and 1) or partition ids with a comma ('3,7', or '5,' for one)")
    attack_scale: float = _f(100.0, "the size of the scale and noise attacks: Δ is multiplied by "
                             "it (scale), or the noise's std is it × the RMS of Δ (noise)")

    def __post_init__(self) -> None:
        _positive("num-server-rounds", self.num_server_rounds)
        _positive("min-accepted", self.min_accepted)
        if not 0 <= self.min_accepted_fraction <= 1:
            raise ConfigError(f"min-accepted-fraction must be in [0, 1]; got "
                              f"{self.min_accepted_fraction}")
        _positive("max-failed-rounds", self.max_failed_rounds)
        _positive("max-examples", self.max_examples)
        _positive("max-update-norm", self.max_update_norm, zero_ok=True)
        if not 0 < self.max_weight_fraction <= 1:
            raise ConfigError(f"max-weight-fraction must be in (0, 1] (1 = no cap); got "
                              f"{self.max_weight_fraction}")
        if self.max_weight_fraction < 1 and self.secure_aggregation:
            raise ConfigError("max-weight-fraction caps weights the server sees; under "
                              "secure-aggregation each weight is inside the masked sum: use "
                              "max-examples there, or max-weight-fraction = 1")
        _positive("clip-update-norm", self.clip_update_norm, zero_ok=True)
        if not 0 <= self.clip_quantile < 1:
            raise ConfigError(f"clip-quantile must be in [0, 1) (0 = off); got "
                              f"{self.clip_quantile}")
        _positive("clip-learning-rate", self.clip_learning_rate)
        _positive("checkpoint-every", self.checkpoint_every, zero_ok=True)
        _positive("checkpoint-keep", self.checkpoint_keep)
        _choice("server-optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        _choice("rolora-first-phase", self.rolora_first_phase, ("a", "b"))
        _positive("lora-fair-lambda", self.lora_fair_lambda, zero_ok=True)
        self._check_hetlora_prune()
        _choice("flexlora-split", self.flexlora_split, ("balanced", "init-a"))
        _choice("robust-reducer", self.robust_reducer, ("median", "trimmed-mean", "mean"))
        if not 0 <= self.robust_trim < 0.5:
            raise ConfigError(f"robust-trim must be in [0, 0.5); got {self.robust_trim}")
        _positive("robust-clip-multiplier", self.robust_clip_multiplier, zero_ok=True)
        if (self.strategy == "robust" and self.robust_reducer == "trimmed-mean"
                and self.robust_trim > 0 and self.min_accepted < 3):
            raise ConfigError(f"robust-reducer 'trimmed-mean' with robust-trim "
                              f"{self.robust_trim} drops at least one update per side and "
                              f"needs 3 of them; set min-accepted = 3 (it is "
                              f"{self.min_accepted}), robust-trim = 0 (the mean) or "
                              "robust-reducer = 'median'")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train must be in (0, 1]; got {self.fraction_train}")
        _positive("num-train-nodes", self.num_train_nodes, zero_ok=True)
        _positive("num-clients", self.num_clients)
        _choice("sampling", self.sampling, SAMPLINGS)
        if self.sampling == "data-size" and self.dp_mode in ("central", "distributed"):
            raise ConfigError(f"dp-mode = {self.dp_mode!r} reports epsilon amplified by uniform "
                              "sampling; with sampling = 'data-size' that analysis does not "
                              "hold. Use sampling = 'uniform' or dp-mode = 'local'")
        _positive("dp-min-contributors", self.dp_min_contributors, zero_ok=True)
        if not 0 <= self.fraction_evaluate <= 1:
            raise ConfigError(f"fraction-evaluate must be in [0, 1]; got {self.fraction_evaluate}")
        _positive("server-lr", self.server_lr, zero_ok=True)
        _positive("min-available-nodes", self.min_available_nodes)
        _positive("min-train-nodes", self.min_train_nodes)
        _positive("round-timeout", self.round_timeout)
        _positive("max-rank", self.max_rank)
        self.ranks()  # validates the mapping
        if self.secagg_threshold == 1 or self.secagg_threshold < 0:
            raise ConfigError(f"secagg-threshold must be 0 (a strict majority of each share "
                              f"group) or an int >= 2; got {self.secagg_threshold}")
        _positive("secagg-neighbours", self.secagg_neighbours, zero_ok=True)
        for key, value in (("secagg-gamma", self.secagg_gamma),
                           ("secagg-delta", self.secagg_delta)):
            if not 0 <= value < 1:
                raise ConfigError(f"{key} must be a fraction in [0, 1) (of the clients assumed "
                                  f"to {'collude' if key == 'secagg-gamma' else 'drop out'}); "
                                  f"got {value}")
        if not 0 < self.secagg_clip_range < float("inf"):
            raise ConfigError(f"secagg-clip-range must be a finite number > 0 (the largest "
                              f"magnitude of an uploaded coordinate); got "
                              f"{self.secagg_clip_range}")
        _positive("secagg-max-weight", self.secagg_max_weight)
        _choice("wire-dtype", self.wire_dtype, WIRE_DTYPES)
        if self.wire_dtype != "float32" and self.dp_mode != "off":
            raise ConfigError(f"dp-mode {self.dp_mode!r} needs wire-dtype = 'float32': rounding "
                              f"a clipped update to {self.wire_dtype} can move it past "
                              f"dp-clip-norm, the bound its noise is calibrated to")
        if self.signing_keys and not self.sign_updates:
            raise ConfigError("signing-keys is set but sign-updates is false; set "
                              "sign-updates = true to verify signed updates, or drop "
                              "signing-keys")
        self.dp_spec()  # validates the DP keys

    def _check_hetlora_prune(self) -> None:
        if not 0 < self.hetlora_prune_gamma < 1:
            raise ConfigError(f"hetlora-prune-gamma must be in (0, 1) (the paper uses 0.99); "
                              f"got {self.hetlora_prune_gamma}")
        _positive("hetlora-prune-lambda", self.hetlora_prune_lambda, zero_ok=True)
        if not self.hetlora_prune:
            return
        if self.strategy != "hetlora":
            raise ConfigError(f"hetlora-prune is HetLoRA's client-side rank pruning; strategy "
                              f"is {self.strategy!r}: set strategy = 'hetlora' or "
                              "hetlora-prune = false")
        if self.secure_aggregation or self.dp_mode != "off":
            raise ConfigError("hetlora-prune changes a client's upload shape, which a masked "
                              "sum cannot show and DP's sensitivity does not cover; set "
                              "hetlora-prune = false, or secure-aggregation = false and "
                              "dp-mode = 'off'")

    def clients_per_round(self, available: int) -> int:
        """How many of ``available`` nodes a round samples: ``num-train-nodes`` (or
        ``fraction-train`` of them), at least ``min-train-nodes``, at most all of them."""
        k = self.num_train_nodes or int(round(available * self.fraction_train))
        return max(1, min(max(k, self.min_train_nodes), available))

    def dp_spec(self) -> Any:
        from fedlora.privacy.dp import DPSpec

        return DPSpec(self.dp_mode, self.dp_clip_norm, self.dp_noise_multiplier, self.dp_delta)

    def ranks(self) -> tuple[int, ...]:
        """Parsed ``rank-by-partition`` (empty when every client uses ``lora.r``)."""
        try:
            ranks = tuple(int(r) for r in _csv(self.rank_by_partition))
        except ValueError as exc:
            raise ConfigError(
                f"rank-by-partition must be comma-separated integers like '4,8,16'; "
                f"got {self.rank_by_partition!r}"
            ) from exc
        for r in ranks:
            if not 0 < r <= self.max_rank:
                raise ConfigError(
                    f"rank-by-partition has rank {r}; ranks must be in 1..max-rank "
                    f"({self.max_rank})"
                )
        return ranks


@dataclass(frozen=True)
class ModelConfig:
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
    init: str = _f("default", "init of lora_A: default (kaiming-uniform) or gaussian")
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
        _choice("lora.init", self.init, LORA_INITS)

    @property
    def target_module_list(self) -> list[str] | str:
        names = list(_csv(self.target_modules))
        return "all-linear" if names == ["all-linear"] else names

    @property
    def modules_to_save_list(self) -> list[str]:
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
        if self.source == "files" and not self.path:
            raise ConfigError(
                "data.source = 'files' needs data.path (or a node's data-path); "
                "point it at a .jsonl/.csv/.parquet file"
            )


@dataclass(frozen=True)
class TrainConfig:
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
