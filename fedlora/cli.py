"""``fedlora`` command line: run a federated job, list config keys and strategies."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from fedlora import config, deploy_cli
from fedlora.errors import FedLoraError

PRESET_DIR = Path(__file__).resolve().parent.parent / "simulations" / "configs"
DEFAULT_PRESET = "bbc-minilm"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_toml(path: Path) -> dict[str, Any]:
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
    from fedlora.launcher import Placement

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
    from fedlora import assets, builders
    from fedlora.aggregation import (
        available_strategies,
        mixed_rank_strategies,
        requires_equal_ranks,
    )

    if cfg.fl.strategy not in available_strategies():
        raise FedLoraError(f"unknown strategy {cfg.fl.strategy!r}; available: "
                           f"{', '.join(available_strategies())}")
    from fedlora.secure_wire import check_secure_aggregation

    check_secure_aggregation(cfg, clients)  # e.g. flora needs the individual factors
    from fedlora.privacy import check_config

    check_config(cfg, clients)  # DP needs a mean of equal-shape updates
    if cfg.eval.task_list():
        from fedlora import lmeval

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
    from fedlora import data
    from fedlora.evaluator import no_evaluation_reason

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
    from fedlora import builders, data

    template = data.PARTITION_TEMPLATE
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
                f"(train.batch-size = {cfg.train.batch_size}); see the README's 'Tuning for "
                f"small sites'")
    return warnings


def _corpus_warnings(cfg: config.RunConfig, clients: int) -> list[str]:
    """A packaged corpus has a fixed number of rows: say when the clients get fewer than
    ``data.samples-per-client`` each, refuse when some would get none."""
    from fedlora import builders, data

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


def _console() -> Any:
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


def cmd_run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from fedlora.launcher import RunFailed, run_simulation

    console = _console()
    flat, clients = resolve(args)
    out = Path(flat["output-dir"])
    placement = resolve_placement(args, out)
    run_config = write_run_config(flat, out)
    (out / "launch.json").write_text(json.dumps({
        "num-clients": clients, "cpus-per-client": placement.cpus,
        "gpus-per-client": placement.gpus, "ray-address": placement.ray_address}))
    home = Path(args.flwr_home).resolve() if args.flwr_home else out / ".flwr"
    rounds = int(flat["num-server-rounds"])
    from fedlora import trackers

    tracked = trackers.make(args.tracker, out, f"fedlora-run-{out.name}", args.tracking_dir)
    tracked.start(out.name, flat, {"kind": "run", "strategy": str(flat["strategy"])})
    where = f"Ray cluster {placement.ray_address}" if placement.ray_address else "local Ray"
    console.print(f"[bold]fedlora[/] {flat['strategy']} · {flat['model.name']} · {clients} "
                  f"clients · {rounds} rounds · {where}, {placement.cpus} CPU / "
                  f"{placement.gpus} GPU per worker → " + escape(str(out))
                  + (" · [yellow]resuming from its last checkpoint[/]" if flat["resume"]
                     else ""))
    started = time.perf_counter()

    def on_round(rec: dict[str, Any]) -> None:
        tracked.log(rec)
        parts = round_parts(rec, rounds)
        if rec.get("rejected"):
            parts.append(f"rejected={rec['rejected']}")
        parts.append(f"[{time.perf_counter() - started:.0f}s]")
        console.print("  " + "  ".join(parts))

    try:
        console.print("  starting Flower simulation (SuperLink, Ray workers, models)…")
        records = run_simulation(run_config, out, clients, placement, home, on_round=on_round)
    except RunFailed as exc:
        tracked.end("failed")
        tracked.close()
        console.print(f"[red]run failed:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        tracked.end("failed")
        tracked.close()
        console.print("[yellow]interrupted: the SuperLink and its simulation were stopped[/]; "
                  f"continue from the last checkpoint with `fedlora run --resume {out}`")
        return 130
    last = records[-1] if records else {}
    summary = {k: last.get(k) for k in ("round", "eval_accuracy", "eval_loss",
                                         "eval_perplexity") if last.get(k) is not None}
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    tracked.artifact(out / "adapter")
    tracked.end("done")
    tracked.close()
    console.print(f"[green]done[/] {summary} · adapter: " + escape(
        f"{out / 'adapter'} (load it with fedlora.load_model({str(out)!r}))"))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from fedlora import experiment, report

    console = _console()
    spec = experiment.load_spec(args.spec)
    if args.seeds is not None:
        experiment.with_seeds(spec, args.seeds)
    out = Path(args.out or Path("runs") / f"experiment-{experiment.slug(spec.name)}"
               ).expanduser().resolve()
    from fedlora import trackers

    runner = experiment.Runner(spec, out, resume=args.resume,
                               trackers=trackers.make(args.tracker, out, spec.name,
                                                      args.tracking_dir))
    cells = spec.cells()
    rounds_per_cell = {c.id: int(spec.flat_config(c.setting, c.strategy, c.seed, out)[0]
                                 ["num-server-rounds"]) for c in cells}
    console.print(f"[bold]fedlora experiment[/] {spec.name}: {len(spec.strategies)} strategies × "
                  f"{len(spec.settings)} settings × seeds {spec.seeds} = {len(cells)} cells"
                  f" (+ baselines: {', '.join(spec.baselines) or 'none'}) → {out}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        cells_task = bar.add_task("cells", total=len(cells))
        rounds_task = bar.add_task("rounds", total=sum(rounds_per_cell.values()))
        current = {"cell": ""}

        def on_event(event: str, info: dict[str, Any]) -> None:
            if event == "start":
                pending = {c.id for c in info["cells"]}
                finished = [c for c in cells if c.id not in pending]
                bar.update(cells_task, completed=len(finished))
                bar.update(rounds_task, completed=sum(rounds_per_cell[c.id] for c in finished))
            elif event == "baselines":
                bar.update(cells_task, description=f"baselines · {info['setting']} · "
                                                   f"seed {info['seed']}")
            elif event == "cell-start":
                current["cell"] = info["cell"].id
                bar.update(cells_task, description=f"cell {info['cell'].id}")
            elif event in ("round", "baseline-round") and info["record"].get("round", 0) > 0:
                rec = info["record"]
                value = rec.get(spec.metric)
                shown = f"{value:.4f}" if isinstance(value, float) else value
                who = current["cell"] if event == "round" else f"baseline {info['kind']}"
                bar.console.print(f"  {who}  round {rec['round']}  {spec.metric}={shown}")
                if event == "round":
                    bar.advance(rounds_task)
            elif event == "cell-end":
                status = info["status"]
                done_rounds = len(read_metrics_safe(out / "cells" / info["cell"].id)) - 1
                missing = rounds_per_cell[info["cell"].id] - max(done_rounds, 0)
                if missing > 0:
                    bar.advance(rounds_task, missing)
                bar.advance(cells_task)
                if status["status"] == "failed":
                    first = status["error"].strip().splitlines()[0]
                    bar.console.print(f"  [red]cell {status['cell']} failed[/]: {first}")
                else:
                    bar.console.print(f"  [green]cell {status['cell']} done[/] in "
                                      f"{status['wall_s']:.0f}s")

        runner.progress = on_event
        try:
            results = runner.run()
        except KeyboardInterrupt:
            report.write(spec, out)
            console.print(f"[yellow]interrupted[/]: finished cells are kept; continue with "
                          f"`fedlora experiment {args.spec} --out {out} --resume`")
            return 130
    failed = [r for r in results if r.get("status") == "failed"]
    console.print(f"[green]report[/]: {out / 'summary.md'} · {out / 'runs.csv'} · plots in {out}"
                  + (f" · [red]{len(failed)} failed cell(s)[/]" if failed else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedlora import experiment, report

    out = Path(args.out).expanduser().resolve()
    spec = experiment.load_output_spec(out)
    if args.reference:
        experiment.set_reference(spec, args.reference)
    result = report.write(spec, out)
    print(f"{out / 'summary.md'} · {out / 'report.html'} · {out / 'runs.csv'} "
          f"({result['rows']} rows, {result['series']} runs)")
    return 0


def read_metrics_safe(directory: Path) -> list[dict[str, Any]]:
    from fedlora.outputs import read_metrics

    try:
        return read_metrics(directory)
    except (OSError, ValueError):
        return []


def cmd_config(args: argparse.Namespace) -> int:
    for key, (typ, default, help_text) in config.schema().items():
        print(f"{key:32} {typ.__name__:6} {default!r:22} {help_text}")
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    from fedlora.aggregation import available_strategies, strategy_info
    from fedlora.privacy import DP_STRATEGIES
    from fedlora.secagg import secagg_compatible

    for name in available_strategies():
        info = strategy_info(name)
        print(f"{name:10} mixed-ranks={'no ' if info.equal_ranks else 'yes'} "
              f"exact={'yes' if info.exact else 'no '} modifies-base="
              f"{'yes' if info.modifies_base else 'no '} secure-aggregation="
              f"{'yes' if secagg_compatible(name)[0] else 'no '} dp="
              f"{'yes' if name in DP_STRATEGIES else 'no'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedlora.export import export_merged

    out = export_merged(args.run_dir, args.merged, args.dtype)
    print(f"merged model: {out} (load it with AutoModelFor....from_pretrained({str(out)!r}))")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fedlora import lmeval

    if args.list_tasks:
        for name in lmeval.shipped_tasks():
            print(name)
        print("(and lm-eval's hub tasks, e.g. mmlu, gsm8k, where the hub is reachable)")
        return 0
    if not args.path or not args.tasks:
        raise FedLoraError("fedlora eval needs RUN_DIR_OR_ADAPTER and --tasks T1,T2 (see "
                           "--list-tasks)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model, tokenizer, tokenizer_dir = lmeval.load(args.path)
    results = lmeval.evaluate(model, tokenizer, tokenizer_dir, tasks, args.limit,
                              args.num_fewshot, args.batch_size)
    p = Path(args.path).expanduser().resolve()
    out = Path(args.out).expanduser().resolve() if args.out else (
        (p.parent if p.name == "adapter" else p) / "eval")
    lmeval.write(results, out, {"model": str(p), "limit": args.limit,
                                "num_fewshot": args.num_fewshot})
    print(lmeval.table(results))
    print(f"results: {out}/<task>.json")
    return 0


def add_tracker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracker", choices=["mlflow", "tensorboard"], action="append",
                        help="also log the config, every metrics record as it arrives and the "
                             "adapter to an MLflow file store or TensorBoard event files "
                             "(repeatable; needs fedlora[mlflow] / fedlora[tensorboard]; a "
                             "failing tracker warns once and the run goes on)")
    parser.add_argument("--tracking-dir", metavar="DIR",
                        help="where trackers write: DIR/mlflow, DIR/tensorboard (default "
                             "OUT/mlruns, OUT/tensorboard)")


def cmd_attacks(args: argparse.Namespace) -> int:
    from fedlora import attacks

    for line in attacks.describe():
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    deploy_cli.add_commands(sub)  # `fedlora certs`, `fedlora launch` (deployment engine)
    run = sub.add_parser("run", help="run a federated LoRA job on Flower's simulation engine")
    src = run.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"one of simulations/configs/ (default {DEFAULT_PRESET})")
    src.add_argument("--config", help="a TOML file of run-config keys")
    run.add_argument("-c", action="append", metavar='"key=value ..."',
                     help="override config keys (repeatable); see `fedlora config`")
    run.add_argument("--out", help="output directory (default runs/<timestamp>)")
    run.add_argument("--num-clients", type=int, help="simulated clients (SuperNodes)")
    run.add_argument("--rounds", type=int, help="federated rounds")
    run.add_argument("--cpus-per-client", type=int,
                     help="CPUs each Ray worker reserves (default 1; workers per machine = "
                          "its CPUs / this; one worker serves many clients in turn)")
    run.add_argument("--gpus-per-client", type=float,
                     help="GPUs each Ray worker reserves (default 0; fractions share a GPU: "
                          "0.25 = four workers per GPU)")
    run.add_argument("--ray-address", help="run the workers on this Ray cluster (HOST:PORT "
                     "of `ray start --head`; default: a private Ray on this machine)")
    run.add_argument("--flwr-home", help="FLWR_HOME for this run (default OUT/.flwr)")
    run.add_argument("--resume", metavar="OUT",
                     help="continue the interrupted run in OUT from its newest intact checkpoint")
    add_tracker_args(run)
    run.set_defaults(func=cmd_run)
    exp = sub.add_parser("experiment", help="run a sweep spec: cells of real simulations, "
                         "baselines, then runs.csv, summary.md and plots")
    exp.add_argument("spec", help="experiment spec TOML (see simulations/experiments/)")
    exp.add_argument("--out", help="output directory (default runs/experiment-<name>)")
    exp.add_argument("--resume", action="store_true",
                     help="continue in --out: skip finished cells, rerun failed ones")
    exp.add_argument("--seeds", type=int, metavar="N",
                     help="run N seeds instead of the spec's (its own first, then the next "
                          "unused integers)")
    add_tracker_args(exp)
    exp.set_defaults(func=cmd_experiment)
    rep = sub.add_parser("report", help="rebuild an experiment's runs.csv, summary.md, plots "
                         "and report.html from its output directory")
    rep.add_argument("out", help="the experiment's output directory (holds spec.toml)")
    rep.add_argument("--reference", help="compare the rules with this strategy label instead "
                     "of the spec's reference")
    rep.set_defaults(func=cmd_report)
    exp_m = sub.add_parser("export", help="merge a run's adapter into its base and save a plain "
                           "transformers model with its tokenizer")
    exp_m.add_argument("run_dir", metavar="RUN_DIR", help="the run's --out (or its adapter/)")
    exp_m.add_argument("--merged", metavar="OUT", required=True,
                       help="new directory for the merged model")
    exp_m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="weights' dtype (default: the run's model.dtype; a QLoRA base is "
                            "dequantized into it)")
    exp_m.set_defaults(func=cmd_export)
    ev = sub.add_parser("eval", help="run lm-evaluation-harness tasks on a run's model "
                        "(needs fedlora[eval])")
    ev.add_argument("path", nargs="?", metavar="RUN_DIR_OR_ADAPTER",
                    help="a run's --out, its adapter/, or a `fedlora export --merged` directory")
    ev.add_argument("--tasks", help="comma-separated lm-eval tasks (fedlora-bbc-topic, "
                    "fedlora-chatterbot-qa, or hub tasks such as mmlu)")
    ev.add_argument("--limit", type=int, help="at most N examples per task")
    ev.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples")
    ev.add_argument("--batch-size", type=int, default=8, help="requests per forward")
    ev.add_argument("--out", help="where <task>.json go (default RUN_DIR/eval)")
    ev.add_argument("--list-tasks", action="store_true", help="name the shipped tasks")
    ev.set_defaults(func=cmd_eval)
    sub.add_parser("config", help="list every config key").set_defaults(func=cmd_config)
    sub.add_parser("strategies", help="list aggregation rules").set_defaults(func=cmd_strategies)
    sub.add_parser("attacks", help="list the simulated attacks (config keys attack, attackers, "
                   "attack-scale)").set_defaults(func=cmd_attacks)
    return parser


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # run the same cleanup as Ctrl-C (stop the SuperLink we started)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except FedLoraError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
