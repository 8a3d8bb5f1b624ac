"""The region's own long-lived executor for ``flower-supernode --isolation process``.

Why: a stock SuperNode installs and runs whatever app bundle (FAB) the SuperLink pushes, and
starts a fresh ``flwr-clientapp`` process (plus a torch import) for every message. This executor
replaces Flower's SuperExec next to the fleet logs. It polls the SuperNode's local Runtime API for
ClientApp tasks, pulls the task input, checks ``sha256(fab.content)`` against the region policy's
``allowed_app_digests`` (empty = any digest) BEFORE pulling the message, pulls the message within
the policy's ``max_message_bytes`` (see `pull_message_bounded`), and then runs the ClientApp
imported ONCE from the locally installed package, never code from the bundle. Replies and the
updated context go back to the SuperNode; a heartbeat keeps the task alive while it trains.

Every use of non-public flwr 1.39 internals (the Runtime API client, the object format) is in
``fedfsd.flower.runtime_api`` and ``fedfsd.flower.bounded_pull``; this module decides.
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

from fedfsd.flower import runtime_api
from fedfsd.flower.bounded_pull import MessageRefused, drain_and_confirm, pull_message_bounded
from fedfsd.flower.pull_backoff import EXECUTOR_SITE, fast_object_pulls

log = logging.getLogger("fedfsd.executor")

DEFAULT_CLIENTAPP = "fedfsd.region.client_app:app"
# Error code in the reply when the region refuses an app bundle (not one of Flower's codes).
FAB_REFUSED_ERROR_CODE = 4031
# ... and when it refuses a message larger than its policy's max_message_bytes.
MESSAGE_TOO_LARGE_ERROR_CODE = 4131
DEFAULT_MAX_MESSAGE_BYTES = 8 << 20  # RegionPolicy.max_message_bytes' default


def refusal_of(reply: Any) -> str | None:
    """Why the ClientApp's reply refuses its task (fedfsd.region.replyinfo), or None."""
    from fedfsd.region.replyinfo import refusal_of as _refusal_of

    return _refusal_of(reply)


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
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


class RegionExecutor:
    """Poll the SuperNode's Runtime API and serve ClientApp tasks with the local ClientApp."""

    def __init__(self, settings: ExecutorSettings, client_app: Any | None = None) -> None:
        self.settings = settings
        self.client_app = client_app or load_clientapp(settings.clientapp, settings.app_path)
        self.allowed = {d.lower() for d in settings.allowed_app_digests}
        self.handled = 0
        self._stop = threading.Event()
        self._poll_client = self._make_client(token=None)
        # The SuperNode offers a task before its objects are stored: without this, pulling the
        # task input waits out Flower's 1 s + 2 s back-off (see fedfsd.flower.pull_backoff).
        for site in fast_object_pulls((EXECUTOR_SITE,)):
            log.warning("object-pull back-off patch skipped: %s", site)

    # -- the SuperNode's Runtime API (fedfsd.flower.runtime_api) ------------------------------
    def _make_client(self, token: str | None) -> Any:
        return runtime_api.make_client(
            self.settings.runtime_api_address,
            insecure=self.settings.insecure,
            root_certificates=self.settings.root_certificates,
            token=token,
        )

    def acquire(self) -> str | None:
        """Claim the oldest pending ClientApp task; return its token or None."""
        return runtime_api.acquire_task(self._poll_client)

    def pull_task_head(self, client: Any) -> tuple[Any, Any, Any, Any, Any]:
        """Context, run, bundle, a content-less copy of the message and its object tree."""
        return runtime_api.pull_task_head(client)

    def serve_task(self, token: str) -> dict[str, Any]:
        """Run one claimed task end to end; returns the decision record."""
        from flwr.app import Error, Message

        client = self._make_client(token)
        sender = runtime_api.start_heartbeat(client)
        started = time.monotonic()
        record: dict[str, Any] = {"time": time.time()}
        context = None
        completed, details = False, "fedfsd executor: task failed"
        try:
            context, run, fab, message, tree = self.pull_task_head(client)
            digest = fab_digest(fab.content)
            record.update(
                run_id=run.run_id,
                fab_id=run.fab_id,
                fab_digest=digest,
                message_type=message.metadata.message_type,
            )
            pull_object_fn, confirm = runtime_api.object_fns(
                client, context.node_id, context.run_id
            )
            refusal: tuple[int, str] | None = None
            if self.allowed and digest not in self.allowed:
                refusal = (
                    FAB_REFUSED_ERROR_CODE,
                    f"fedfsd region refused app bundle sha256={digest}: not in the region "
                    "policy's allowed_app_digests",
                )
            else:
                try:
                    message, record["message_bytes"] = pull_message_bounded(
                        tree,
                        pull_object_fn,
                        confirm,
                        self.settings.max_message_bytes,
                    )
                    runtime_api.set_message_id(message, tree.object_id)
                except MessageRefused as err:
                    refusal = (MESSAGE_TOO_LARGE_ERROR_CODE, f"fedfsd region refused: {err}")
            record["pull_s"] = round(time.monotonic() - started, 4)
            if refusal is not None:
                code, reason = refusal
                with contextlib.suppress(Exception):  # let the SuperNode drop its copy
                    drain_and_confirm(tree, pull_object_fn, confirm)
                log.warning(reason)
                record.update(decision="refused", reason=reason)
                reply = Message(Error(code=code, reason=reason), reply_to=message)
                details = reason
            else:
                record["decision"] = "accepted"
                app_started = time.monotonic()
                try:
                    reply = self.client_app(message=message, context=context)
                    record["app_s"] = round(time.monotonic() - app_started, 4)
                    if (why := refusal_of(reply)) is not None:  # the app refused the task
                        record.update(decision="refused", reason=why)
                    completed, details = True, ""
                except Exception as ex:  # the ClientApp's failure is reported, not fatal
                    log.exception("ClientApp raised")
                    reason = f"{type(ex).__name__}: {ex}"
                    record.update(decision="error", reason=reason)
                    reply = Message(
                        Error(code=runtime_api.client_app_raised_code(), reason=reason),
                        reply_to=message,
                    )
                    details = reason
            push_started = time.monotonic()
            runtime_api.push_reply(client, reply, context)
            record["push_s"] = round(time.monotonic() - push_started, 4)
        finally:
            with contextlib.suppress(Exception):
                runtime_api.finish_task(client, context, completed, details)
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
            if record.get("decision") == "refused":  # bundle, size, budget, pre-flight, policy
                from fedfsd.audit import SECURITY_LOG, log_event

                log_event(
                    Path(self.settings.decisions_path).with_name(SECURITY_LOG),
                    "region",
                    "task_refused",
                    **{k: record.get(k) for k in ("run_id", "message_type", "fab_digest")},
                    reason=record.get("reason", ""),
                )

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


def max_message_bytes_from_policy(policy_path: str | None) -> int:
    """The policy's bound on one message (DEFAULT_MAX_MESSAGE_BYTES without a policy)."""
    if not policy_path:
        return DEFAULT_MAX_MESSAGE_BYTES
    from fedfsd.config import load_policy

    return int(getattr(load_policy(policy_path), "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES))


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


# Imported by the first train task anyway. torch, Opacus (its accountants pull in scipy) and
# torch._dynamo (imported by the first torch.optim optimiser) take several CPU-seconds; loading
# them before the executor says it is ready (while the SuperNode connects and the run starts)
# takes that time off the first round, and the memory they take is there before any task.
_WARM_MODULES = (
    "torch",
    "torch._dynamo",
    "opacus",
    "fedfsd.privacy.local_round",
    "torch.distributed",  # forked training workers (`region start --workers N`) inherit it
    "fedfsd.privacy.distributed",
    "fedfsd.data.vehicles",
    "fedfsd.region.client_app",
)


def _warm_imports() -> None:
    """Import the training stack now (a failure here only costs the head start)."""
    import importlib

    for name in _WARM_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - the task will report a real import error
            log.debug("warm import of %s failed: %r", name, err)


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
            max_message_bytes=max_message_bytes_from_policy(args.policy),
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
    _warm_imports()
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
