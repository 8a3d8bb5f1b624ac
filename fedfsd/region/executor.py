"""The region's own long-lived executor for ``flower-supernode --isolation process``.

Why: a stock SuperNode installs and runs whatever app bundle (FAB) the SuperLink pushes, and
starts a fresh ``flwr-clientapp`` process (plus a torch import) for every message. This executor
replaces Flower's SuperExec next to the fleet logs. It polls the SuperNode's local Runtime API for
ClientApp tasks, pulls the task input, checks ``sha256(fab.content)`` against the region policy's
``allowed_app_digests`` (empty = any digest), and then runs the ClientApp imported ONCE from the
locally installed package, never code from the bundle. Replies and the updated context go back
to the SuperNode; a heartbeat keeps the task alive while it trains.

NOTE: this module uses non-public flwr 1.39 internals (``flwr.supernode.runtime.run_clientapp``,
``flwr.supercore.runtime.RuntimeHttpClient``, the Runtime protobufs and interceptors). flwr is
pinned to ``>=1.39,<1.40`` for that reason; keep every such import in this one module and cover
it with tests (tests/test_executor*.py, tests/test_e2e*.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fedfsd.executor")

DEFAULT_CLIENTAPP = "fedfsd.region.client_app:app"
# Error code in the reply when the region refuses an app bundle (not one of Flower's codes).
FAB_REFUSED_ERROR_CODE = 4031
CLIENT_APP_TASK_TYPE = "flwr-clientapp"


def fab_digest(content: bytes) -> str:
    """sha256 hex digest of an app bundle's bytes (what ``allowed_app_digests`` lists)."""
    return hashlib.sha256(content).hexdigest()


def load_clientapp(ref: str, app_path: str | Path | None = None) -> Any:
    """Import ``module:attr`` once from the locally installed code (``app_path`` is prepended
    to sys.path, for a region-local test app). Raises ValueError on a malformed reference."""
    from flwr.clientapp import ClientApp

    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"ClientApp reference must look like 'module:attr', got {ref!r}")
    if app_path is not None:
        sys.path.insert(0, str(Path(app_path).resolve()))
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, ClientApp):
        raise ValueError(f"{ref} is a {type(obj).__name__}, not a flwr ClientApp")
    return obj


@dataclass
class ExecutorSettings:
    """What the region operator configures (never the aggregator)."""

    runtime_api_address: str
    clientapp: str = DEFAULT_CLIENTAPP
    app_path: str | None = None
    allowed_app_digests: tuple[str, ...] = ()
    poll_interval: float = 0.05
    insecure: bool = True  # the SuperNode's Runtime API is on loopback
    root_certificates: str | None = None
    decisions_path: str | None = None  # JSONL of accept/refuse decisions, for audits and tests


class RegionExecutor:
    """Poll the SuperNode's Runtime API and serve ClientApp tasks with the local ClientApp."""

    def __init__(self, settings: ExecutorSettings, client_app: Any | None = None) -> None:
        self.settings = settings
        self.client_app = client_app or load_clientapp(settings.clientapp, settings.app_path)
        self.allowed = {d.lower() for d in settings.allowed_app_digests}
        self.handled = 0
        self._stop = threading.Event()
        self._poll_client = self._make_client(token=None)
        from fedfsd.deploy.latency import fast_object_pulls

        # The SuperNode offers a task before its objects are stored: without this, pulling the
        # task input waits out Flower's 1 s + 2 s back-off (see fedfsd.deploy.latency).
        for site in fast_object_pulls(("flwr.supernode.runtime.run_clientapp",)):
            log.warning("object-pull back-off patch skipped: %s", site)

    # -- flwr 1.39 internals ------------------------------------------------------------------
    def _make_client(self, token: str | None) -> Any:
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.settings.runtime_api_address,
            insecure=self.settings.insecure,
            root_certificates=None if self.settings.insecure else self.settings.root_certificates,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def acquire(self) -> str | None:
        """Claim the oldest pending ClientApp task; return its token or None."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

        res = self._poll_client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[CLIENT_APP_TASK_TYPE])
        )
        if res.HasField("task") and res.token:
            return str(res.token)
        return None

    def serve_task(self, token: str) -> dict[str, Any]:
        """Run one claimed task end to end; returns the decision record."""
        import httpx
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        client = self._make_client(token)

        def heartbeat() -> bool:
            # Flower's own heartbeat fn raises SIGINT on a rejected beat, which would kill this
            # long-lived process; here a rejected beat just ends this task's heartbeats.
            try:
                client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except httpx.HTTPError:
                return False
            return True

        sender = HeartbeatSender(heartbeat)
        sender.start()
        started = time.monotonic()
        record: dict[str, Any] = {"time": time.time()}
        context = None
        sub_status, details = SubStatus.FAILED, "fedfsd executor: task failed"
        try:
            message, context, run, fab = pull_task_input(client)
            record["pull_s"] = round(time.monotonic() - started, 4)
            digest = fab_digest(fab.content)
            record.update(
                run_id=run.run_id,
                fab_id=run.fab_id,
                fab_digest=digest,
                message_type=message.metadata.message_type,
            )
            if self.allowed and digest not in self.allowed:
                reason = (
                    f"fedfsd region refused app bundle sha256={digest}: not in the region "
                    "policy's allowed_app_digests"
                )
                log.warning(reason)
                record.update(decision="refused", reason=reason)
                reply = Message(Error(code=FAB_REFUSED_ERROR_CODE, reason=reason), reply_to=message)
                details = reason
            else:
                record["decision"] = "accepted"
                app_started = time.monotonic()
                try:
                    reply = self.client_app(message=message, context=context)
                    record["app_s"] = round(time.monotonic() - app_started, 4)
                    sub_status, details = SubStatus.COMPLETED, ""
                except Exception as ex:  # the ClientApp's failure is reported, not fatal
                    log.exception("ClientApp raised")
                    reason = f"{type(ex).__name__}: {ex}"
                    record.update(decision="error", reason=reason)
                    reply = Message(
                        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                        reply_to=message,
                    )
                    details = reason
            push_started = time.monotonic()
            push_message(client, reply, context)
            record["push_s"] = round(time.monotonic() - push_started, 4)
        finally:
            with contextlib.suppress(Exception):
                push_task_output(client, context, sub_status, details)
            with contextlib.suppress(Exception):
                sender.stop()
            with contextlib.suppress(Exception):
                client.close()
        self.handled += 1
        record["seconds"] = round(time.monotonic() - started, 3)
        self._record(record)
        return record

    # -- loop -----------------------------------------------------------------------------------
    def _record(self, record: dict[str, Any]) -> None:
        log.info("task %s", json.dumps(record, sort_keys=True))
        if self.settings.decisions_path:
            with open(self.settings.decisions_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")

    def poll_once(self) -> bool:
        """Serve at most one task; True if one was served."""
        token = self.acquire()
        if token is None:
            return False
        try:
            self.serve_task(token)
        except Exception:
            log.exception("task failed")
        return True

    def stop(self) -> None:
        self._stop.set()

    def run_forever(self) -> None:
        """Poll until stop(); connection errors (SuperNode restarting) are retried."""
        import httpx

        while not self._stop.is_set():
            try:
                if self.poll_once():
                    continue
            except httpx.HTTPError as err:
                log.debug("Runtime API not reachable: %s", err)
                self._stop.wait(0.5)
                continue
            self._stop.wait(self.settings.poll_interval)
        with contextlib.suppress(Exception):
            self._poll_client.close()


def allowed_digests_from_policy(policy_path: str | None) -> tuple[str, ...]:
    """The policy's allow-list (validated by fedfsd.config)."""
    if not policy_path:
        return ()
    from fedfsd.config import load_policy

    return tuple(load_policy(policy_path).allowed_app_digests)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fedfsd.region.executor",
        description="fedfsd's region executor: runs only the locally installed ClientApp.",
    )
    p.add_argument("--runtime-api-address", required=True, help="SuperNode Runtime API host:port")
    p.add_argument("--policy", help="region policy TOML (allowed_app_digests)")
    p.add_argument("--clientapp", default=DEFAULT_CLIENTAPP, help="module:attr of the ClientApp")
    p.add_argument("--app-path", help="directory prepended to sys.path (region-local app)")
    p.add_argument("--decisions", help="append accept/refuse decisions to this JSONL file")
    p.add_argument("--poll-interval", type=float, default=0.05)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the executor process (started by `fedfsd region start`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    args = _parse_args(argv)
    try:
        settings = ExecutorSettings(
            runtime_api_address=args.runtime_api_address,
            clientapp=args.clientapp,
            app_path=args.app_path,
            allowed_app_digests=allowed_digests_from_policy(args.policy),
            poll_interval=args.poll_interval,
            decisions_path=args.decisions,
        )
        executor = RegionExecutor(settings)
    except Exception as err:  # bad policy / bad app reference: one line, non-zero exit
        print(f"fedfsd executor: {err}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: executor.stop())
    signal.signal(signal.SIGINT, lambda *_: executor.stop())
    from fedfsd.deploy.watchdog import start_parent_watchdog

    start_parent_watchdog()  # stop with the fedfsd process that started us
    log.info(
        "executor ready: clientapp=%s allow-list=%s runtime=%s",
        settings.clientapp,
        list(settings.allowed_app_digests) or "any digest (local code only)",
        settings.runtime_api_address,
    )
    executor.run_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
