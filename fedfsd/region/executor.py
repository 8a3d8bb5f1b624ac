"""The region's own long-lived executor for ``flower-supernode --isolation process``.

Why: a stock SuperNode installs and runs whatever app bundle (FAB) the SuperLink pushes, and
starts a fresh ``flwr-clientapp`` process (plus a torch import) for every message. This executor
replaces Flower's SuperExec next to the fleet logs. It polls the SuperNode's local Runtime API for
ClientApp tasks, pulls the task input, checks ``sha256(fab.content)`` against the region policy's
``allowed_app_digests`` (empty = any digest) BEFORE pulling the message, pulls the message within
the policy's ``max_message_bytes`` (see `pull_message_bounded`), and then runs the ClientApp
imported ONCE from the locally installed package, never code from the bundle. Replies and the
updated context go back to the SuperNode; a heartbeat keeps the task alive while it trains.

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
# ... and when it refuses a message larger than its policy's max_message_bytes.
MESSAGE_TOO_LARGE_ERROR_CODE = 4131
DEFAULT_MAX_MESSAGE_BYTES = 8 << 20  # RegionPolicy.max_message_bytes' default
MAX_OBJECTS = 100_000  # objects in one message's tree (a model has a few hundred)


class MessageRefused(RuntimeError):
    """The task's message is refused before it is pulled whole (size, object ids)."""


CLIENT_APP_TASK_TYPE = "flwr-clientapp"


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


def _array_nbytes(body: bytes) -> int:
    """What an Array object says it inflates to (flwr 1.39: numpy dtype name and shape)."""
    import numpy as np

    meta = json.loads(body.decode("utf-8"))
    n = int(np.prod([int(d) for d in meta["shape"]], dtype=np.int64))
    if n < 0:
        raise MessageRefused("an array declares a negative size")
    return n * np.dtype(str(meta["dtype"])).itemsize


def pull_message_bounded(
    object_tree: Any,
    pull_object_fn: Any,
    confirm_fn: Any,
    max_bytes: int,
    *,
    initial_backoff: float = 0.05,
    backoff_cap: float = 0.5,
) -> tuple[Any, int]:
    """Pull and inflate a message's objects, refusing one larger than `max_bytes`.

    What is bounded (flwr 1.39 tells no object's size before its content is pulled):
    1. the number of objects in the tree (`MAX_OBJECTS`), before anything is pulled;
    2. every object except array chunks is pulled first (message, records, array headers);
       the bytes pulled so far are counted after each object and the pull stops once they
       pass `max_bytes` (so at most one object per concurrent pull beyond it);
    3. each array header's dtype x shape is summed BEFORE any chunk is pulled: a message that
       says it inflates beyond `max_bytes` is refused having pulled only headers;
    4. chunks are then pulled under the same running count, and the exact inflated size (each
       chunk's length times its references, which is how a few MB of repeated chunks become a
       GiB) is checked before anything is inflated.
    Every object's sha256 must equal its id; a malformed object is refused too. Not bounded
    here: what the SuperNode itself pulled from the SuperLink (its unique objects) and a single
    object's size before it arrives. Returns (message, inflated bytes); raises MessageRefused
    (a pull that times out raises Flower's ObjectPullError: a failure, not a refusal).
    """
    from flwr.supercore.inflatable.inflatable_object import UnexpectedObjectContentError

    try:
        return _pull_message_bounded(
            object_tree,
            pull_object_fn,
            confirm_fn,
            max_bytes,
            initial_backoff=initial_backoff,
            backoff_cap=backoff_cap,
        )
    except (
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        AttributeError,
        UnexpectedObjectContentError,
    ) as err:
        raise MessageRefused(f"malformed message object: {type(err).__name__}: {err}") from None


def _pull_message_bounded(
    object_tree: Any,
    pull_object_fn: Any,
    confirm_fn: Any,
    max_bytes: int,
    *,
    initial_backoff: float = 0.05,
    backoff_cap: float = 0.5,
) -> tuple[Any, int]:
    """`pull_message_bounded` without the mapping of malformed objects to a refusal."""
    from flwr.app import Message
    from flwr.supercore.inflatable.inflatable_object import (
        get_object_body,
        get_object_head_values_from_object_content,
        get_object_id,
        iterate_object_tree,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        inflate_object_from_contents,
        pull_objects,
    )

    nodes = list(iterate_object_tree(object_tree))
    if len(nodes) > MAX_OBJECTS:
        raise MessageRefused(f"message has {len(nodes)} objects (limit {MAX_OBJECTS})")
    pulled = [0]
    lock = threading.Lock()

    def counted(oid: str) -> bytes:
        content = pull_object_fn(oid)
        if get_object_id(content) != oid:
            raise MessageRefused(f"object {oid[:12]}... does not match its sha256")
        with lock:
            pulled[0] += len(content)
            if pulled[0] > max_bytes:
                raise MessageRefused(
                    f"message exceeds max_message_bytes={max_bytes} (pulled {pulled[0]} bytes)"
                )
        return content

    def pull(ids: list[str]) -> dict[str, bytes]:
        return pull_objects(ids, counted, initial_backoff=initial_backoff, backoff_cap=backoff_cap)

    contents: dict[str, bytes] = {}
    arrays: dict[str, list[int]] = {}  # Array id -> chunk index list
    chunk_ids: set[str] = set()
    declared = 0
    level = [object_tree]
    while level:
        got = pull(sorted({t.object_id for t in level} - set(contents)))
        contents.update(got)
        nxt = []
        for tree in level:
            content = contents[tree.object_id]
            obj_type, children, _ = get_object_head_values_from_object_content(content)
            if obj_type == "Array" and tree.object_id not in arrays:
                from flwr.app import Array

                body = get_object_body(content, Array)
                arrays[tree.object_id] = list(json.loads(body)["arraychunk_ids"])
                declared += _array_nbytes(body)
                chunk_ids.update(children)
                if declared > max_bytes:
                    raise MessageRefused(
                        f"message declares {declared}+ bytes of arrays, over "
                        f"max_message_bytes={max_bytes} (refused before pulling them)"
                    )
            elif obj_type != "Array":
                nxt.extend(tree.children)
        level = nxt
    contents.update(pull(sorted(chunk_ids - set(contents))))
    inflated = 0
    for aid, refs in arrays.items():
        children = get_object_head_values_from_object_content(contents[aid])[1]
        try:
            inflated += sum(len(contents[children[int(i)]]) for i in refs)
        except (IndexError, KeyError, TypeError, ValueError):
            raise MessageRefused("an array refers to chunks it does not list") from None
    if inflated > max_bytes:
        raise MessageRefused(
            f"message inflates to {inflated} bytes, over max_message_bytes={max_bytes}"
        )
    confirm_fn(object_tree.object_id)
    message = inflate_object_from_contents(
        object_tree.object_id, contents, keep_object_contents=False
    )
    if not isinstance(message, Message):
        raise MessageRefused(f"the task input is a {type(message).__name__}, not a Message")
    return message, max(inflated, pulled[0])


def drain_and_confirm(
    object_tree: Any,
    pull_object_fn: Any,
    confirm_fn: Any,
    *,
    initial_backoff: float = 0.05,
    backoff_cap: float = 0.5,
) -> None:
    """Let the SuperNode drop a refused message: wait until each of its objects is stored, one
    at a time, keeping none, then confirm.

    Why: flwr 1.39's SuperNode offers the task before it has stored the message's objects;
    confirming (which deletes the message) while it is still storing them makes its receive fail
    ("not pre-registered") and the refusal reply never reaches the aggregator; never confirming
    leaves the message in the SuperNode's memory. Memory here is one object at a time.
    """
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    def discard(oid: str) -> bytes:
        pull_object_fn(oid)
        return b""

    ids = list(dict.fromkeys(t.object_id for t in iterate_object_tree(object_tree)))
    pull_objects(
        ids,
        discard,
        max_concurrent_pulls=1,
        initial_backoff=initial_backoff,
        backoff_cap=backoff_cap,
    )
    confirm_fn(object_tree.object_id)


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

    def pull_task_head(self, client: Any) -> tuple[Any, Any, Any, Any, Any]:
        """Context, run, bundle, a content-less copy of the message and its object tree.

        The first half of flwr 1.39's `pull_task_input`: nothing of the message's content is
        pulled yet, so the bundle digest and the size bound decide before it is.
        """
        from flwr.app import Message, RecordDict
        from flwr.common.serde import (
            context_from_proto,
            fab_from_proto,
            metadata_from_proto,
            run_from_proto,
        )
        from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
            PullAppMessagesRequest,
            PullTaskInputRequest,
        )
        from flwr.supercore.task_identity import TaskIdentity

        res = client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        context = context_from_proto(res.context)
        run = run_from_proto(res.run)
        fab = fab_from_proto(res.fab)
        msgs = client.PullMessages(PullAppMessagesRequest())
        if not msgs.messages_list:
            raise RuntimeError("No messages received from Runtime API")
        tree = msgs.message_object_trees[0]
        head = Message(
            metadata=metadata_from_proto(msgs.messages_list[0].metadata), content=RecordDict()
        )
        head.metadata.__dict__["_message_id"] = tree.object_id
        return context, run, fab, head, tree

    def serve_task(self, token: str) -> dict[str, Any]:
        """Run one claimed task end to end; returns the decision record."""
        import httpx
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

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
            context, run, fab, message, tree = self.pull_task_head(client)
            digest = fab_digest(fab.content)
            record.update(
                run_id=run.run_id,
                fab_id=run.fab_id,
                fab_digest=digest,
                message_type=message.metadata.message_type,
            )
            node = Node(node_id=context.node_id)
            confirm = make_confirm_message_received_fn_protobuf(
                client.ConfirmMessageReceived, node, context.run_id
            )
            pull_object_fn = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)
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
                    message.metadata.__dict__["_message_id"] = tree.object_id
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
