"""One run's set-up, shared by ``fedlora run``, ``fedlora launch`` and ``fedlora experiment``.

The config layers (defaults ← preset ← ``--config`` ← ``-c`` ← flags, :func:`resolve`), the checks a
run makes before Flower starts (:func:`preflight`), the ``run-config.toml`` handed to Flower
(:func:`write_run_config`) and the progress line of one round (:func:`round_parts`). A library for
the command modules: it imports none of them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from fedlora import config
from fedlora.errors import FedLoraError

# Flower minor versions `fedlora worker` (warm clients) was tested with: `fedlora launch` runs
# warm by default on these (fedlora.runtime.deploy.warm_setting). Here, in a light module, so that
# building the CLI's parser imports nothing heavy.
WARM_TESTED_FLOWER = ("1.41", "1.42")

PRESET_DIR = Path(__file__).resolve().parents[2] / "simulations" / "configs"
DEFAULT_PRESET = "bbc-minilm"


def presets() -> list[str]:
    """The names of the shipped run-config presets (``simulations/configs/*.toml``), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested TOML table as flat dotted keys (``{"lora": {"r": 8}}`` -> ``{"lora.r": 8}``)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_toml(path: Path) -> dict[str, Any]:
    """The flat keys of the TOML file at ``path``; :class:`FedLoraError` if it is missing or
    invalid.
    """
    try:
        return flatten(tomllib.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise FedLoraError(f"config file {str(path)!r} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise FedLoraError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc


def preset_layer(preset: str | None = None, config_file: str | Path | None = None
                 ) -> dict[str, Any]:
    """The flat keys of a preset (by name) or of a TOML config file."""
    if config_file:
        return load_toml(Path(config_file))
    name = preset or DEFAULT_PRESET
    if name not in presets():
        raise FedLoraError(f"unknown preset {name!r}; available: {', '.join(presets())}")
    return load_toml(PRESET_DIR / f"{name}.toml")


def finalize(flat: dict[str, Any], clients: int, node_paths: list[str] | None = None
             ) -> dict[str, Any]:
    """Validate a complete flat config for ``clients`` simulated clients (before anything
    starts), print its warnings and cap the node minimums at the number of clients.

    ``node_paths``: each node's own data file when nodes get one (``fedlora launch
    --data-path``); otherwise ``data.path`` is each client's.
    """
    if clients < 1:
        raise FedLoraError(f"--num-clients must be >= 1; got {clients}")
    for text in preflight(config.from_flat(flat), clients, node_paths):
        print(f"fedlora: warning: {text}", file=sys.stderr)
    flat["num-clients"] = clients
    flat["min-available-nodes"] = min(int(flat["min-available-nodes"]), clients)
    flat["min-train-nodes"] = min(int(flat["min-train-nodes"]), clients)
    return flat


def resume_config(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """The interrupted run's own config (``OUT/run-config.toml``, ``OUT/launch.json``) with
    ``resume = true``; only ``--rounds`` (and -c round-timeout) may change."""
    out = Path(args.resume).expanduser().resolve()
    saved, launch = out / "run-config.toml", out / "launch.json"
    if not saved.exists() or not launch.exists():
        raise FedLoraError(f"{out} is not the output directory of a `fedlora run` (it lacks "
                           f"run-config.toml or launch.json); pass the --out of the run to resume")
    if args.preset or args.config or args.num_clients is not None or args.out:
        raise FedLoraError("--resume continues a run with its own configuration; drop --preset, "
                           "--config, --num-clients and --out (only --rounds may change)")
    flat = config.defaults()
    flat.update(tomllib.loads(saved.read_text()))
    for text in args.c or []:
        extra = config.parse_overrides(text)
        if set(extra) - {"round-timeout"}:
            raise FedLoraError(f"--resume accepts only -c round-timeout=...; got {sorted(extra)}")
        flat.update(extra)
    if args.rounds is not None:
        flat["num-server-rounds"] = args.rounds
    flat["resume"] = True
    flat["output-dir"] = str(out)
    clients = int(json.loads(launch.read_text())["num-clients"])
    flat["num-clients"] = clients
    return finalize(flat, clients), clients


def resolve(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Defaults ← preset ← --config ← -c overrides ← --rounds/--out. Returns (flat, clients)."""
    if getattr(args, "resume", None):
        return resume_config(args)
    flat = config.defaults()
    flat.update(preset_layer(args.preset, args.config))
    for text in args.c or []:
        flat.update(config.parse_overrides(text))
    if args.rounds is not None:
        flat["num-server-rounds"] = args.rounds
    if args.num_clients is not None:
        flat["num-clients"] = args.num_clients
    clients = flat["num-clients"]
    if not isinstance(clients, int) or isinstance(clients, bool):
        raise FedLoraError(f"num-clients must be an integer; got {clients!r}")
    out = Path(args.out or flat.get("output-dir") or
               Path("runs") / time.strftime("%Y%m%d-%H%M%S")).expanduser().resolve()
    flat["output-dir"] = str(out)
    if flat.get("strategy") == "fedsa" and not flat.get("personal-adapter-dir"):
        flat["personal-adapter-dir"] = str(out / "personal")  # B never reaches the server
    return finalize(flat, clients), clients


def resolve_placement(args: argparse.Namespace, out: Path) -> Any:
    """Ray resources per worker and the cluster address: the flags, else (with ``--resume``)
    those the interrupted run used, else one CPU, no GPU and a private Ray instance."""
    from fedlora.runtime.launcher import Placement

    saved: dict[str, Any] = {}
    if getattr(args, "resume", None):
        saved = json.loads((out / "launch.json").read_text())

    def pick(flag: Any, key: str, default: Any) -> Any:
        return flag if flag is not None else saved.get(key, default)

    return Placement(cpus=pick(args.cpus_per_client, "cpus-per-client", 1.0),
                     gpus=pick(args.gpus_per_client, "gpus-per-client", 0.0),
                     ray_address=pick(args.ray_address, "ray-address", ""))


def preflight(cfg: config.RunConfig, clients: int, node_paths: list[str] | None = None
              ) -> list[str]:
    """Checks a run can make before Flower starts: model, required keys, data files, ranks.

    Raises :class:`FedLoraError` for what would fail later (a missing file, column or key, a
    label out of range, one file shared by every client); returns warnings for what would run
    but not as the user likely meant (no evaluation at all, fewer examples than asked for).
    """
    from fedlora.aggregation import (
        available_strategies,
        mixed_rank_strategies,
        requires_equal_ranks,
    )
    from fedlora.learning import assets, builders

    if cfg.fl.strategy not in available_strategies():
        raise FedLoraError(f"unknown strategy {cfg.fl.strategy!r}; available: "
                           f"{', '.join(available_strategies())}")
    from fedlora.privacy.secure_wire import check_secure_aggregation

    check_secure_aggregation(cfg, clients)  # e.g. flora needs the individual factors
    from fedlora.privacy.dp import check_config

    check_config(cfg, clients)  # DP needs a mean of equal-shape updates
    if cfg.eval.task_list():
        from fedlora.learning import lmeval

        lmeval._require()  # eval.tasks: lm-eval must be there before the rounds, not after
    if cfg.model.name not in assets.MODEL_ALIASES:
        assets.resolve_model(cfg.model.name)
    ranks = sorted({cfg.rank_for_partition(i) for i in range(clients)})
    if len(ranks) > 1 and requires_equal_ranks(cfg.fl.strategy):
        raise FedLoraError(f"strategy {cfg.fl.strategy!r} needs equal LoRA ranks but "
                           f"rank-by-partition gives {ranks}; use one of "
                           f"{', '.join(mixed_rank_strategies())}")
    own = cfg.data.source == "files" or bool(node_paths)
    if own and cfg.model.task == "seq-cls":
        builders.num_labels(cfg)  # own files: model.num-labels is required
    warnings = (_check_own_files(cfg, clients, node_paths) if own
                else _corpus_warnings(cfg, clients))
    from fedlora.learning import data
    from fedlora.learning.evaluator import no_evaluation_reason

    spec = builders.data_spec(cfg)
    if cfg.data.heldout_path:
        rows = data.heldout(spec)
        if rows is not None and len(rows) < 20:
            warnings.append(f"data.heldout-path {cfg.data.heldout_path!r} holds {len(rows)} "
                            f"rows; accuracy on so few moves in steps of {1 / len(rows):.2f}")
    server_has_data = (bool(cfg.data.heldout_path) or not own
                       or data.PARTITION_TEMPLATE not in cfg.data.path)
    reason = no_evaluation_reason(cfg, server_has_data)
    if reason:
        warnings.append(reason)
    return warnings


MAX_CHECKED_FILES = 16  # own files read in full before the run (the others: existence only)


def _check_own_files(cfg: config.RunConfig, clients: int, node_paths: list[str] | None
                     ) -> list[str]:
    """Every client's file exists (the first few are read: columns, rows, labels), and
    several clients do not silently share one file."""
    from fedlora.learning import builders, data

    template = data.PARTITION_TEMPLATE
    if not node_paths and not cfg.data.path:
        raise FedLoraError(data.NO_DATA_PATH)
    if node_paths:
        paths, key = list(node_paths), "--data-path"
    else:
        paths, key = [cfg.data.path.replace(template, str(i)) for i in range(clients)], \
            "data.path"
    if clients > 1 and len(set(paths)) == 1:
        p = Path(paths[0])
        example = str(p.with_name(f"{p.stem}-{template}{p.suffix}"))
        raise FedLoraError(
            f"{key} = {paths[0]!r} has no {template}, so all {clients} clients would train on "
            f"the same file; put {template} where the client number goes (e.g. {key} = "
            f"{example!r}: client 0 reads {example.replace(template, '0')!r}, client 1 "
            f"{example.replace(template, '1')!r}, ...), or run one client")
    missing = sorted({p for p in paths if not Path(p).expanduser().exists()})
    if missing:
        shown = missing[:5] + ([f"... {len(missing) - 5} more"] if len(missing) > 5 else [])
        source = key if node_paths else f"{key} = {cfg.data.path!r}"
        raise FedLoraError(f"{len(missing)} of {clients} clients' data file(s) do not exist: "
                           f"{shown} (from {source}); create them or fix {key}")
    spec = builders.data_spec(cfg)
    warnings = []
    for i, path in enumerate(paths[:MAX_CHECKED_FILES]):
        rows = data.load_files(path, cfg.model.task, None, spec.num_labels, key)
        train = len(rows) - math.ceil(len(rows) * cfg.data.test_fraction) if len(rows) > 1 \
            else len(rows)
        if train < cfg.train.batch_size:
            warnings.append(
                f"client {i} ({path}) has {len(rows)} rows, {train} after holding out "
                f"data.test-fraction = {cfg.data.test_fraction}: fewer than one batch "
                f"(train.batch-size = {cfg.train.batch_size}); see 'Tuning for small sites' in "
                f"docs/peft-and-evaluation.md")
    return warnings


def _corpus_warnings(cfg: config.RunConfig, clients: int) -> list[str]:
    """A packaged corpus has a fixed number of rows: say when the clients get fewer than
    ``data.samples-per-client`` each, refuse when some would get none."""
    from fedlora.learning import builders, data

    spec = builders.data_spec(cfg)
    total = len(data.load_corpus(spec))
    train = total - math.ceil(total * spec.test_fraction)
    per_client = train // clients
    source = cfg.data.source
    if per_client < 1:
        raise FedLoraError(
            f"{clients} clients but {source} has {train:,} training rows ({total:,} minus "
            f"data.test-fraction = {spec.test_fraction} held out): some clients would get "
            f"none; use at most {train:,} clients (--num-clients / num-clients)")
    asked = spec.samples_per_client
    if asked and per_client < asked:
        return [f"{clients} clients x data.samples-per-client = {asked} asks for "
                f"{clients * asked:,} training rows, but {source} has {train:,} ({total:,} "
                f"minus the {spec.test_fraction:.0%} held out): each client gets about "
                f"{per_client}. Use at most {train // asked:,} clients for {asked} rows each, or "
                f"set data.samples-per-client = {per_client} to ask for what there is"]
    return []


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


PROGRESS_KEYS = ("train_loss", "eval_loss", "eval_accuracy", "eval_perplexity",
                 "fed_eval_accuracy", "agg_error_mean")


NOT_METRICS = ("eval_s", "fed_eval_clients")  # timings and counts, not evaluation results


def round_parts(rec: dict[str, Any], rounds: int) -> list[str]:
    """``round r/R`` and the headline metrics of one metrics record (progress lines); a record
    without any evaluation metric says ``no evaluation``."""
    parts = [f"round {rec['round']}/{rounds}"]
    parts += [f"{key}={rec[key]:.4f}" for key in PROGRESS_KEYS if rec.get(key) is not None]
    if rec.get("evaluation") == "none" or not any(
            key.startswith(("eval_", "fed_eval_")) and key not in NOT_METRICS for key in rec):
        parts.append("no evaluation")
    return parts


def console() -> Any:
    """The progress console (stderr). Lines are never wrapped: rich wraps at 80 columns when
    stderr is not a terminal (a log file, CI), which would cut run lines in two."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def write_run_config(flat: dict[str, Any], out: Path) -> Path:
    """The run config as a TOML file for ``flwr run --run-config``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run-config.toml"
    path.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in sorted(flat.items())))
    return path
