"""``fedlora`` command line: run a federated job, list config keys and strategies."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fedlora import config
from fedlora.cli import deploy as deploy_cli
from fedlora.errors import FedLoraError
from fedlora.experiments.sweep import ENGINES
from fedlora.runtime import run_setup
from fedlora.runtime.run_setup import (
    DEFAULT_PRESET,
    resolve,
    resolve_placement,
    round_parts,
    write_run_config,
)


def cmd_run(args: argparse.Namespace) -> int:
    """`fedlora run`: resolve the config (preset, ``--config``, ``-c``), run it on Flower's
    simulation engine, print each round, log to the ``--tracker`` trackers; 0 on completion.
    """
    from rich.markup import escape

    from fedlora.runtime.launcher import RunFailed, run_simulation

    console = run_setup.console()
    flat, clients = resolve(args)
    out = Path(flat["output-dir"])
    placement = resolve_placement(args, out)
    run_config = write_run_config(flat, out)
    (out / "launch.json").write_text(json.dumps({
        "num-clients": clients, "cpus-per-client": placement.cpus,
        "gpus-per-client": placement.gpus, "ray-address": placement.ray_address}))
    home = Path(args.flwr_home).resolve() if args.flwr_home else out / ".flwr"
    rounds = int(flat["num-server-rounds"])
    from fedlora.experiments import trackers

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
    """`fedlora experiment`: run every cell of a sweep spec (``--seeds``, ``--resume``) with a
    progress bar, rewrite the report after each cell, and print where it is; 0 when all ran.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from fedlora.experiments import report
    from fedlora.experiments import runner as experiment_runner
    from fedlora.experiments import sweep as experiment

    console = run_setup.console()
    spec = experiment.load_spec(args.spec)
    if args.seeds is not None:
        experiment.with_seeds(spec, args.seeds)
    if args.engine:
        spec.engine = args.engine
    out = Path(args.out or Path("runs") / f"experiment-{experiment.slug(spec.name)}"
               ).expanduser().resolve()
    from fedlora.experiments import trackers

    runner = experiment_runner.Runner(spec, out, resume=args.resume,
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
    """`fedlora report`: rewrite ``summary.md``, ``report.html`` and ``runs.csv`` of a sweep output
    directory from what it holds now (``--reference``: compare against that rule).
    """
    from fedlora.experiments import report
    from fedlora.experiments import sweep as experiment

    out = Path(args.out).expanduser().resolve()
    spec = experiment.load_output_spec(out)
    if args.reference:
        experiment.set_reference(spec, args.reference)
    result = report.write(spec, out)
    print(f"{out / 'summary.md'} · {out / 'report.html'} · {out / 'runs.csv'} "
          f"({result['rows']} rows, {result['series']} runs)")
    return 0


def read_metrics_safe(directory: Path) -> list[dict[str, Any]]:
    """The records of ``directory/metrics.jsonl``, or ``[]`` while it is missing or half-written."""
    from fedlora.federation.outputs import read_metrics

    try:
        return read_metrics(directory)
    except (OSError, ValueError):
        return []


def cmd_config(args: argparse.Namespace) -> int:
    """`fedlora config`: print every run-config key with its type, default and help."""
    for key, (typ, default, help_text) in config.schema().items():
        print(f"{key:32} {typ.__name__:6} {default!r:22} {help_text}")
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    """`fedlora strategies`: print each aggregation rule with whether it takes mixed ranks, is
    exact, modifies the base, and runs under secure aggregation and DP.
    """
    from fedlora.aggregation import available_strategies, strategy_info
    from fedlora.privacy.dp import DP_STRATEGIES
    from fedlora.privacy.secagg import secagg_compatible

    for name in available_strategies():
        info = strategy_info(name)
        print(f"{name:10} mixed-ranks={'no ' if info.equal_ranks else 'yes'} "
              f"exact={'yes' if info.exact else 'no '} modifies-base="
              f"{'yes' if info.modifies_base else 'no '} secure-aggregation="
              f"{'yes' if secagg_compatible(name)[0] else 'no '} dp="
              f"{'yes' if name in DP_STRATEGIES else 'no'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`fedlora export`: merge a run's global adapter into its base model and save it to
    ``--merged`` in ``--dtype`` (:func:`fedlora.learning.export.export_merged`).
    """
    from fedlora.learning.export import export_merged

    out = export_merged(args.run_dir, args.merged, args.dtype)
    print(f"merged model: {out} (load it with AutoModelFor....from_pretrained({str(out)!r}))")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """`fedlora eval`: score a run directory or adapter on lm-eval ``--tasks`` and write
    ``<task>.json`` to ``--out`` (default ``RUN/eval``); ``--list-tasks`` lists the shipped ones.
    """
    from fedlora.learning import lmeval

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
    """Add ``--tracker`` (repeatable: mlflow, tensorboard) and ``--tracking-dir`` to ``parser``."""
    parser.add_argument("--tracker", choices=["mlflow", "tensorboard"], action="append",
                        help="also log the config, every metrics record as it arrives and the "
                             "adapter to an MLflow file store or TensorBoard event files "
                             "(repeatable; needs fedlora[mlflow] / fedlora[tensorboard]; a "
                             "failing tracker warns once and the run goes on)")
    parser.add_argument("--tracking-dir", metavar="DIR",
                        help="where trackers write: DIR/mlflow, DIR/tensorboard (default "
                             "OUT/mlruns, OUT/tensorboard)")


def cmd_attacks(args: argparse.Namespace) -> int:
    """`fedlora attacks`: print the simulated attacks and what each one does."""
    from fedlora.experiments import attack_catalog

    for line in attack_catalog.describe():
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``fedlora`` argument parser: every subcommand with its options and handler (``func``)."""
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
    exp = sub.add_parser("experiment", help="run a sweep spec: cells of real federated runs, "
                         "baselines, then runs.csv, summary.md and plots")
    exp.add_argument("spec", help="experiment spec TOML (see simulations/experiments/)")
    exp.add_argument("--out", help="output directory (default runs/experiment-<name>)")
    exp.add_argument("--resume", action="store_true",
                     help="continue in --out: skip finished cells, rerun failed ones")
    exp.add_argument("--seeds", type=int, metavar="N",
                     help="run N seeds instead of the spec's (its own first, then the next "
                          "unused integers)")
    exp.add_argument("--engine", choices=ENGINES,
                     help="where each cell runs (default: the spec's `engine`, else inprocess): "
                          "inprocess = the real ServerApp and ClientApp in this process, "
                          "simulation = Flower's simulation engine (Ray), one SuperLink per sweep")
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
    """Run the ``fedlora`` command line on ``argv``; its exit status (2 after a
    :class:`FedLoraError`, whose message goes to stderr without a traceback).
    """
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except FedLoraError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
