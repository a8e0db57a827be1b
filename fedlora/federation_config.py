"""The top-level run-config keys: :class:`FederationConfig` (rounds, sampling, the rule and its
options, robustness limits, secure aggregation, DP, signing, attacks).

Re-exported by :mod:`fedlora.config`, which owns the flat-key schema and the other sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlora.config_fields import check_choice as _choice
from fedlora.config_fields import check_positive as _positive
from fedlora.config_fields import csv_items as _csv
from fedlora.config_fields import help_field as _f
from fedlora.errors import ConfigError

SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
WIRE_DTYPES = ("float32", "float16", "bfloat16")  # see fedlora.federation.transport
SAMPLINGS = ("uniform", "data-size")


@dataclass(frozen=True)
class FederationConfig:
    """Top-level keys: rounds, sampling, the aggregation rule and its options, robustness
    limits, checkpoints, secure aggregation, DP, signed updates and simulated attacks.
    """
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
                             "'balanced' (Σ^½ each), 'init-a' (A rows at PEFT-init norm) or "
                             "'paper' (the authors' code: orthonormal A, Σ in B)")
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
        _choice("flexlora-split", self.flexlora_split, ("balanced", "init-a", "paper"))
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
        """The DP keys as a :class:`fedlora.privacy.dp.DPSpec` (which validates them)."""
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
