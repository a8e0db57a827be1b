"""``fedlora`` command line: run a federated job, list config keys and strategies."""

from __future__ import annotations

import argparse
import json
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


def finalize(flat: dict[str, Any], clients: int) -> dict[str, Any]:
    """Validate a complete flat config for ``clients`` simulated clients (before anything
    starts) and cap the node minimums at the number of clients."""
    if clients < 1:
        raise FedLoraError(f"--num-clients must be >= 1; got {clients}")
    preflight(config.from_flat(flat), clients)
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
    return finalize(flat, clients), clients


def resolve(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Defaults ← preset ← --config ← -c overrides ← --rounds/--out. Returns (flat, clients)."""
    if getattr(args, "resume", None):
        return resume_config(args)
    flat = config.defaults()
    layer = preset_layer(args.preset, args.config)
    clients = int(layer.pop("num-clients", 2))
    flat.update(layer)
    for text in args.c or []:
        flat.update(config.parse_overrides(text))
    if args.rounds is not None:
        flat["num-server-rounds"] = args.rounds
    if args.num_clients is not None:
        clients = args.num_clients
    out = Path(args.out or flat.get("output-dir") or
               Path("runs") / time.strftime("%Y%m%d-%H%M%S")).expanduser().resolve()
    flat["output-dir"] = str(out)
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


def preflight(cfg: config.RunConfig, clients: int) -> None:
    """Checks a simulation can make before Flower starts: model, data files, ranks."""
    from fedlora import assets
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
    if cfg.model.name not in assets.MODEL_ALIASES:
        assets.resolve_model(cfg.model.name)
    if cfg.data.source == "files":
        paths = {cfg.data.path.replace("{partition-id}", str(i)) for i in range(clients)}
        missing = sorted(p for p in paths if not Path(p).expanduser().exists())
        if missing:
            raise FedLoraError(f"data file(s) {missing} do not exist; check data.path")
    ranks = sorted({cfg.rank_for_partition(i) for i in range(clients)})
    if len(ranks) > 1 and requires_equal_ranks(cfg.fl.strategy):
        raise FedLoraError(f"strategy {cfg.fl.strategy!r} needs equal LoRA ranks but "
                           f"rank-by-partition gives {ranks}; use one of "
                           f"{', '.join(mixed_rank_strategies())}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


PROGRESS_KEYS = ("train_loss", "eval_loss", "eval_accuracy", "eval_perplexity",
                 "fed_eval_accuracy", "agg_error_mean")


def round_parts(rec: dict[str, Any], rounds: int) -> list[str]:
    """``round r/R`` and the headline metrics of one metrics record (progress lines)."""
    parts = [f"round {rec['round']}/{rounds}"]
    parts += [f"{key}={rec[key]:.4f}" for key in PROGRESS_KEYS if rec.get(key) is not None]
    return parts


def write_run_config(flat: dict[str, Any], out: Path) -> Path:
    """The run config as a TOML file for ``flwr run --run-config``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run-config.toml"
    path.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in sorted(flat.items())))
    return path


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedlora.launcher import RunFailed, run_simulation

    console = Console(stderr=True)
    flat, clients = resolve(args)
    out = Path(flat["output-dir"])
    placement = resolve_placement(args, out)
    run_config = write_run_config(flat, out)
    (out / "launch.json").write_text(json.dumps({
        "num-clients": clients, "cpus-per-client": placement.cpus,
        "gpus-per-client": placement.gpus, "ray-address": placement.ray_address}))
    home = Path(args.flwr_home).resolve() if args.flwr_home else out / ".flwr"
    rounds = int(flat["num-server-rounds"])
    where = f"Ray cluster {placement.ray_address}" if placement.ray_address else "local Ray"
    console.print(f"[bold]fedlora[/] {flat['strategy']} · {flat['model.name']} · {clients} "
                  f"clients · {rounds} rounds · {where}, {placement.cpus} CPU / "
                  f"{placement.gpus} GPU per worker → {out}"
                  + (" · [yellow]resuming from its last checkpoint[/]" if flat["resume"] else ""))
    started = time.perf_counter()

    def on_round(rec: dict[str, Any]) -> None:
        parts = round_parts(rec, rounds)
        if rec.get("rejected"):
            parts.append(f"rejected={rec['rejected']}")
        parts.append(f"[{time.perf_counter() - started:.0f}s]")
        console.print("  " + "  ".join(parts))

    try:
        console.print("  starting Flower simulation (SuperLink, Ray workers, models)…")
        records = run_simulation(run_config, out, clients, placement, home, on_round=on_round)
    except RunFailed as exc:
        console.print(f"[red]run failed:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the SuperLink and its simulation were stopped[/]; "
                      f"continue from the last checkpoint with `fedlora run --resume {out}`")
        return 130
    last = records[-1] if records else {}
    summary = {k: last.get(k) for k in ("round", "eval_accuracy", "eval_loss",
                                         "eval_perplexity") if last.get(k) is not None}
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    console.print(f"[green]done[/] {summary} · adapter: {out / 'adapter'}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from fedlora import experiment, report

    console = Console(stderr=True)
    spec = experiment.load_spec(args.spec)
    out = Path(args.out or Path("runs") / f"experiment-{experiment.slug(spec.name)}"
               ).expanduser().resolve()
    runner = experiment.Runner(spec, out, resume=args.resume)
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

    for name in available_strategies():
        info = strategy_info(name)
        print(f"{name:10} mixed-ranks={'no ' if info.equal_ranks else 'yes'} "
              f"exact={'yes' if info.exact else 'no '} modifies-base="
              f"{'yes' if info.modifies_base else 'no'}")
    return 0


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
    run.set_defaults(func=cmd_run)
    exp = sub.add_parser("experiment", help="run a sweep spec: cells of real simulations, "
                         "baselines, then runs.csv, summary.md and plots")
    exp.add_argument("spec", help="experiment spec TOML (see simulations/experiments/)")
    exp.add_argument("--out", help="output directory (default runs/experiment-<name>)")
    exp.add_argument("--resume", action="store_true",
                     help="continue in --out: skip finished cells, rerun failed ones")
    exp.set_defaults(func=cmd_experiment)
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
