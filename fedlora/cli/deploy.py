"""``fedlora certs`` and ``fedlora launch``: credentials, and runs on Flower's deployment engine.

:func:`add_commands` registers both on the ``fedlora`` parser (``fedlora/cli/main.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from fedlora.errors import FedLoraError
from fedlora.runtime.run_setup import WARM_TESTED_FLOWER


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise FedLoraError(f"{flag} takes comma-separated integers like 0,1; got {text!r}"
                           ) from None


def cmd_certs(args: argparse.Namespace) -> int:
    """`fedlora certs`: generate a CA, the SuperLink certificate (SANs from ``--hosts``) and
    ``--nodes`` SuperNode key pairs into ``--dir``, and print where each file went; 0.
    """
    from fedlora.runtime import certs

    hosts = [h for item in args.hosts or [] for h in item.split(",") if h.strip()]
    creds = certs.generate(args.dir, hosts=hosts, nodes=args.nodes, force=args.force)
    print(f"CA certificate      {creds.ca_cert}\n"
          f"CA key (keep safe)  {creds.ca_key}\n"
          f"SuperLink cert/key  {creds.server_cert} {creds.server_key}\n"
          f"SANs                {certs.san_text(certs.subject_alt_names(hosts))}")
    for key, pub in zip(creds.node_keys, creds.node_public_keys, strict=True):
        print(f"SuperNode key pair  {key} {pub}")
    for key, pub in zip(creds.signing_keys, creds.signing_public_keys, strict=True):
        print(f"Signing key pair    {key} {pub}")
    warning = certs.work_tree_warning(creds.directory)
    if warning:
        print(f"fedlora: warning: {warning}", file=sys.stderr)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    """`fedlora launch`: resolve the run config like `fedlora run`, start a SuperLink and one
    SuperNode per ``--nodes``/``--gpus`` on this host (:func:`fedlora.runtime.deploy.launch`),
    print each round, and return 0 once the run completed (``--resume``: relaunch a directory).
    """
    from rich.markup import escape

    from fedlora.runtime import deploy, run_setup

    console = run_setup.console()
    if args.resume:
        return _resume(args, console)
    gpus = _int_list(args.gpus, "--gpus") if args.gpus is not None else None
    if args.nodes is not None or gpus is not None:
        deploy.node_count(args.nodes, gpus)  # before the preset's num-clients is consulted
    layered = argparse.Namespace(preset=args.preset, config=args.config, c=args.c,
                                 rounds=args.rounds, out=args.out,
                                 num_clients=len(gpus) if gpus is not None else args.nodes)
    flat, nodes = run_setup.resolve(layered)
    out = Path(flat["output-dir"])
    ranks = _int_list(args.ranks, "--ranks") if args.ranks else None
    data_paths = None
    if args.data_path:
        data_paths = [args.data_path.replace("{partition-id}", str(i)) for i in range(nodes)]
        implied = {"data.source": "files"}
        if not flat["data.path"]:
            implied["data.path"] = args.data_path
        if any(flat[k] != v for k, v in implied.items()):
            flat.update(implied)
            console.print("  --data-path implies " + escape(
                " ".join(f"{k}={v}" for k, v in implied.items())))
    if args.auth and not args.tls:
        console.print("  --auth implies --tls (Flower authenticates SuperNodes over TLS only)")
    rounds = int(flat["num-server-rounds"])
    security = "TLS + SuperNode auth" if args.auth else "TLS" if args.tls or args.certs \
        else "insecure loopback"
    where = f"GPUs {','.join(map(str, gpus))}" if gpus is not None else "CPU"
    console.print(f"[bold]fedlora launch[/] {flat['strategy']} · {flat['model.name']} · "
                  f"{nodes} SuperNodes ({where}) · {security} · {rounds} rounds → "
                  + escape(f"{out} (process logs in {out / 'logs'})"))
    settings = {"nodes": None if gpus is not None else nodes, "gpus": gpus,
                "tls": True if args.tls or args.certs else None, "auth": args.auth,
                "certs_dir": args.certs, "data_paths": data_paths, "ranks": ranks,
                "warm": True if args.warm else False if args.cold else None,
                "procs_per_node": args.procs_per_node}
    return _run(flat, out, settings, args.port, console, rounds, record=True)


LAUNCH_FILE = "launch-settings.json"  # written by deploy.launch once its checks passed


def _resume(args: argparse.Namespace, console: Any) -> int:
    """``fedlora launch --resume OUT``: the same launch, with ``resume = true``."""
    from fedlora import config

    out = Path(args.resume).expanduser().resolve()
    saved, settings_file = out / "run-config.toml", out / LAUNCH_FILE
    if not saved.exists() or not settings_file.exists():
        raise FedLoraError(f"{out} is not the output directory of a `fedlora launch` (it lacks "
                           f"run-config.toml or {LAUNCH_FILE}); pass the --out of the launch")
    chosen = [flag for flag, value in (("--nodes", args.nodes), ("--gpus", args.gpus),
                                       ("--preset", args.preset), ("--config", args.config),
                                       ("-c", args.c), ("--out", args.out),
                                       ("--ranks", args.ranks), ("--data-path", args.data_path),
                                       ("--warm", args.warm), ("--cold", args.cold))
              if value]
    if chosen:
        raise FedLoraError(f"--resume relaunches with the run's own settings; drop {chosen} "
                           f"(only --rounds and --port may change)")
    flat = {**config.defaults(), **tomllib.loads(saved.read_text()), "resume": True}
    if args.rounds is not None:
        flat["num-server-rounds"] = args.rounds
    settings = json.loads(settings_file.read_text())
    console.print(f"[bold]fedlora launch[/] resuming {out} from its last checkpoint")
    return _run(flat, out, settings, args.port, console, int(flat["num-server-rounds"]))


def _run(flat: dict[str, Any], out: Path, settings: dict[str, Any], port: int | None,
         console: Any, rounds: int, record: bool = False) -> int:
    from rich.markup import escape

    from fedlora.runtime import deploy
    from fedlora.runtime.run_setup import round_parts

    started = time.perf_counter()

    def on_round(rec: dict[str, Any]) -> None:
        parts = round_parts(rec, rounds)
        if rec.get("round", 0) > 0:
            parts.append(f"replies={rec.get('num_accepted')}/{rec.get('num_sampled')}")
        if rec.get("rejected"):
            parts.append(escape(f"rejected={rec['rejected']}"))
        parts.append(f"[{time.perf_counter() - started:.0f}s]")
        console.print("  " + "  ".join(parts))

    def on_warning(message: str) -> None:
        console.print(f"  [yellow]warning:[/] {escape(message)}")

    try:
        result = deploy.launch(flat, out=out, port=port, on_round=on_round,
                               on_warning=on_warning, settings_record=settings if record else None,
                               **settings)
    except deploy.RunFailed as exc:
        console.print(f"[red]run failed:[/] {escape(str(exc))}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the SuperLink and every SuperNode were stopped[/]; "
                      f"continue with `fedlora launch --resume {out}`")
        return 130
    last = result.records[-1] if result.records else {}
    summary = {k: last.get(k) for k in ("round", "eval_accuracy", "eval_loss",
                                         "eval_perplexity") if last.get(k) is not None}
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    if result.lost_nodes:
        summary["lost_nodes"] = [n.node for n in result.lost_nodes]
    console.print("[green]done[/] " + escape(f"{summary} · adapter: {out / 'adapter'}"))
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``certs`` and ``launch`` on the ``fedlora`` sub-command parsers."""
    certs = subparsers.add_parser(
        "certs", help="create a CA, a SuperLink TLS certificate, SuperNode key pairs and "
                      "update-signing key pairs")
    certs.add_argument("dir", help="directory for the files (created private, mode 0700)")
    certs.add_argument("--hosts", nargs="+", metavar="HOST",
                       help="names/IPs SuperNodes use to reach the SuperLink (added to the "
                            "certificate's SANs; 127.0.0.1 and localhost always are)")
    certs.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs (default 2)")
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.set_defaults(func=cmd_certs)

    launch = subparsers.add_parser(
        "launch", help="run a job on Flower's deployment engine: a SuperLink and one "
                       "SuperNode process per node/GPU on this host")
    where = launch.add_mutually_exclusive_group()
    where.add_argument("--nodes", type=int, help="SuperNodes on CPU (default: the preset's "
                                                 "num-clients)")
    where.add_argument("--gpus", help="one SuperNode per GPU index, e.g. 0,1 "
                                      "(CUDA_VISIBLE_DEVICES of each)")
    launch.add_argument("--tls", action="store_true", help="TLS between SuperNodes, CLI and "
                                                           "SuperLink")
    launch.add_argument("--auth", action="store_true",
                        help="SuperNode authentication: register each node's key (implies --tls)")
    launch.add_argument("--certs", metavar="DIR",
                        help="credentials from `fedlora certs` (default: fresh ones in OUT/certs)")
    src = launch.add_mutually_exclusive_group()
    src.add_argument("--preset", help="one of simulations/configs/ (default bbc-minilm)")
    src.add_argument("--config", help="a TOML file of run-config keys")
    launch.add_argument("-c", action="append", metavar='"key=value ..."',
                        help="override config keys (repeatable); see `fedlora config`")
    launch.add_argument("--rounds", type=int, help="federated rounds")
    launch.add_argument("--out", help="output directory (default runs/<timestamp>)")
    launch.add_argument("--data-path", metavar="TEMPLATE",
                        help="each node's own data file ({partition-id} is replaced by 0..N-1); "
                             "implies data.source=files, and data.path=TEMPLATE unless set "
                             "(data.path is the server's held-out file for central evaluation)")
    launch.add_argument("--ranks", help="LoRA rank per node, e.g. 4,8 (one rank: all nodes)")
    launch.add_argument("--port", type=int, help="SuperLink port on 127.0.0.1 (default: free)")
    temperature = launch.add_mutually_exclusive_group()
    temperature.add_argument(
        "--warm", action="store_true",
        help="run each node's rounds in one long-lived `fedlora worker` process (imports and "
             "the base model are loaded once, not every round); the default on the Flower "
             "versions it was tested with ("
             + ", ".join(f"{v}.x" for v in WARM_TESTED_FLOWER) + ")")
    temperature.add_argument(
        "--cold", action="store_true",
        help="a fresh flwr-clientapp process per message (Flower's default; the fallback on "
             "untested Flower versions)")
    launch.add_argument("--procs-per-node", type=int, default=1, metavar="N",
                        help="train each node's rounds with N torch.distributed processes "
                             "(gloo on CPU; NCCL, one GPU each, on GPUs); rank 0 talks to "
                             "Flower")
    launch.add_argument("--resume", metavar="OUT",
                        help="relaunch the interrupted launch in OUT from its last checkpoint")
    launch.set_defaults(func=cmd_launch)

    worker = subparsers.add_parser(
        "worker", help="a SuperNode's long-lived ClientApp process (SuperNode started with "
                       "--isolation process; see docs/deployment.md, 'Warm clients')")
    worker.add_argument("--runtime-api-address", required=True, metavar="HOST:PORT",
                        help="the SuperNode's Runtime API (its --host:--port)")
    tls = worker.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true",
                     help="the SuperNode's Runtime API has no TLS (keep it on loopback)")
    tls.add_argument("--root-certificates", metavar="PEM",
                     help="CA of the SuperNode's Runtime API certificate (its --ssl-certfile)")
    worker.add_argument("--parent-pid", type=int, help="exit when this process exits")
    worker.add_argument("--poll-interval", type=float, default=0.1,
                        help="seconds between task polls while idle (default 0.1)")
    worker.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    """`fedlora worker`: serve a warm node's ClientApp messages on ``--runtime-api-address``
    until the SuperNode (or ``--parent-pid``) goes away (:func:`fedlora.runtime.warm.serve`).
    """
    from fedlora.runtime import warm

    try:
        warm.serve(args.runtime_api_address, args.root_certificates, args.parent_pid,
                   args.poll_interval)
    except FileNotFoundError as exc:
        raise FedLoraError(str(exc)) from None
    return 0
