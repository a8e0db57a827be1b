"""A long-lived ClientApp process for a SuperNode (``fedlora worker``).

Flower 1.41's SuperNode hands every message to a fresh ``flwr-clientapp`` process, so each
round re-imports torch, transformers and peft and loads the frozen base model again (on the
default preset about 3 s of imports, 4 s of peft/transformers model code and 4 s of data
preparation, every message — see ``benchmarks/RESULTS.md``). Started with
``--isolation process``, a SuperNode instead waits for an external executor to claim its tasks.
``fedlora worker`` is that executor: it claims the node's ClientApp tasks from the SuperNode's
Runtime API and runs each one *in its own process*, the way ``flwr-clientapp`` would —
pull the message, context and FAB, load the app, handle the message, push the reply and the
updated context — so imports, :data:`fedlora.learning.client_round.MODELS` (the frozen base, on the
GPU when
there is one) and the tokenized partition survive from one round to the next. The app's
per-node state still lives in ``context.state``, exactly as with ``flwr-clientapp``.

One task runs at a time, as a SuperNode sends one message at a time. A new FAB (another run, or
changed app code) is installed once, and the previous app's modules are dropped from
``sys.modules`` so its code is never reused by mistake. The ``fedlora`` library itself is the
one installed on the node (as in every deployment: the SuperNode imports it from its
environment).

The functions used here (``pull_task_input``, ``push_message``, ``push_task_output``,
``RuntimeHttpClient``) are Flower's own, from ``flwr.supernode.runtime.run_clientapp``;
pyproject pins the Flower range they were read from.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_dir
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

log = logging.getLogger("fedlora.worker")


@dataclass
class TaskTiming:
    """Seconds spent on one task (reported in the worker's log)."""

    pull_s: float = 0.0
    install_s: float = 0.0
    handle_s: float = 0.0
    push_s: float = 0.0


@dataclass
class Worker:
    """Claims this SuperNode's ClientApp tasks and runs them in this process."""

    runtime_api_address: str
    root_certificates: bytes | None = None
    poll_interval: float = 0.1
    installed: dict[str, Path] = field(default_factory=dict)
    current_app_dir: Path | None = None
    tasks_done: int = 0

    def _client(self, token: str | None = None) -> RuntimeHttpClient:
        interceptors = [RuntimeVersionHttpInterceptor(
            component_name="flwr-clientapp" if token else "SuperExec")]
        if token:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address,
            insecure=self.root_certificates is None,
            root_certificates=self.root_certificates,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def serve(self, max_tasks: int | None = None) -> None:
        """Claim and run tasks until stopped (or ``max_tasks`` are done)."""
        claims = self._client()
        try:
            while max_tasks is None or self.tasks_done < max_tasks:
                res = claims.AcquireTask(AcquireTaskRequest(
                    supported_task_types=[TaskType.CLIENT_APP.value], agentapp_fab_hashes=[]))
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                else:
                    time.sleep(self.poll_interval)
        finally:
            claims.close()

    def _app_dir(self, run, fab) -> Path:
        """Install a FAB once; forget the modules of the app it replaces."""
        if fab.hash_str not in self.installed:
            install_from_fab(fab.content, skip_prompt=True)
            self.installed[fab.hash_str] = get_project_dir(run.fab_id, run.fab_version,
                                                           fab.hash_str)
        app_dir = self.installed[fab.hash_str]
        if self.current_app_dir is not None and self.current_app_dir != app_dir:
            forget_modules_under(self.current_app_dir)
        self.current_app_dir = app_dir
        return app_dir

    def run_task(self, token: str) -> TaskTiming:
        """One message, as ``flwr-clientapp`` would handle it, without leaving the process."""
        timing = TaskTiming()
        client = self._client(token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            start = time.perf_counter()
            message, context, run, fab = pull_task_input(client)
            timing.pull_s = time.perf_counter() - start

            start = time.perf_counter()
            self._app_dir(run, fab)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            app: ClientApp = load(run.fab_id, run.fab_version, fab.hash_str)
            timing.install_s = time.perf_counter() - start

            start = time.perf_counter()
            reply = app(message=message, context=context)
            timing.handle_s = time.perf_counter() - start
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 — reported to the server as the reply
            code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(exc, LoadClientAppError)
                    else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
            details = f"{type(exc)}:<'{exc}'>"
            log.exception("ClientApp raised an exception")
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            start = time.perf_counter()
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # noqa: BLE001 — the SuperNode times the task out
                log.exception("could not push the reply to the SuperNode")
            push_task_output(client, context, sub_status, details)
            timing.push_s = time.perf_counter() - start
            heartbeat.stop()
            client.close()
        self.tasks_done += 1
        log.info("task %d (%s): pull %.2fs, app %.2fs, handle %.2fs, push %.2fs",
                 self.tasks_done, sub_status, timing.pull_s, timing.install_s,
                 timing.handle_s, timing.push_s)
        return timing


def forget_modules_under(directory: Path) -> None:
    """Drop modules imported from ``directory`` (an app that is no longer current)."""
    root = str(Path(directory).resolve())
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and str(Path(file).resolve()).startswith(root + os.sep):
            del sys.modules[name]
    if root in sys.path:
        sys.path.remove(root)


def configure_logging() -> None:
    """One timestamped line per log record. Flower's ``flwr`` logger has its own console handler
    and also propagates to the root logger, so each of its lines came out twice; its handler
    goes, and the root handler prints them (with their debug lines, as before)."""
    from flwr.common.logger import ConsoleHandler

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    flwr_log = logging.getLogger("flwr")
    for handler in [h for h in flwr_log.handlers if isinstance(h, ConsoleHandler)]:
        flwr_log.removeHandler(handler)


def serve(runtime_api_address: str, root_certificates: str | None = None,
          parent_pid: int | None = None, poll_interval: float = 0.1) -> None:
    """``fedlora worker``: run until stopped (SIGTERM, Ctrl-C, or the parent's exit)."""
    certificates = None
    if root_certificates:
        path = Path(root_certificates)
        if not path.is_file():
            raise FileNotFoundError(f"--root-certificates {path}: no such file")
        certificates = path.read_bytes()
    if parent_pid:
        start_parent_process_monitor(parent_pid)
    configure_logging()
    log.info("fedlora worker serving %s (pid %d)", runtime_api_address, os.getpid())
    try:
        Worker(runtime_api_address, certificates, poll_interval).serve()
    except KeyboardInterrupt:
        log.info("fedlora worker stopped")
