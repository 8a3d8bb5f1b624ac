"""A client of a SuperNode's local Runtime API (flwr 1.39), for fedfsd's region executor.

Why: the region runs only its own installed ClientApp, so it replaces Flower's SuperExec with a
long-lived executor (`fedfsd.region.executor`) that claims ClientApp tasks, pulls their input,
and pushes replies and the updated context back. Flower exposes none of that publicly: the
Runtime API client, its protobufs, interceptors, serde, heartbeat and push helpers are
non-public flwr 1.39 modules (flwr is pinned `<1.40`), wrapped here one call each.
"""

from __future__ import annotations

from typing import Any

CLIENT_APP_TASK_TYPE = "flwr-clientapp"


def client_app_raised_code() -> int:
    """Flower's error code for "the ClientApp raised" (flwr.common.constant.ErrorCode)."""
    from flwr.common.constant import ErrorCode

    return int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)


def make_client(
    address: str, *, insecure: bool, root_certificates: str | None, token: str | None
) -> Any:
    """A RuntimeHttpClient of the SuperNode at `address`; with `token`, bound to that task."""
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
        server_address=address,
        insecure=insecure,
        root_certificates=None if insecure else root_certificates,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def acquire_task(client: Any) -> str | None:
    """Claim the oldest pending ClientApp task; return its token or None."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[CLIENT_APP_TASK_TYPE]))
    if res.HasField("task") and res.token:
        return str(res.token)
    return None


def pull_task_head(client: Any) -> tuple[Any, Any, Any, Any, Any]:
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
    head = Message(  # type: ignore[call-overload]  # flwr-internal constructor
        metadata=metadata_from_proto(msgs.messages_list[0].metadata), content=RecordDict()
    )
    set_message_id(head, tree.object_id)
    return context, run, fab, head, tree


def set_message_id(message: Any, message_id: str) -> None:
    """Give `message` the id the SuperNode knows it by (Flower's Metadata has no setter)."""
    message.metadata.__dict__["_message_id"] = message_id


def object_fns(client: Any, node_id: int, run_id: int) -> tuple[Any, Any]:
    """(pull_object_fn(object_id) -> bytes, confirm_fn(object_id)) against this task's run."""
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )

    node = Node(node_id=node_id)
    confirm = make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, run_id)
    return make_pull_object_fn_protobuf(client.PullObject, node, run_id), confirm


def start_heartbeat(client: Any) -> Any:
    """Start the task heartbeat; returns the sender (call `.stop()`).

    Flower's own heartbeat fn raises SIGINT on a rejected beat, which would kill a long-lived
    process; here a rejected beat just ends this task's heartbeats."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611
    from flwr.supercore.heartbeat import HeartbeatSender

    def heartbeat() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.HTTPError:
            return False
        return True

    sender = HeartbeatSender(heartbeat)
    sender.start()
    return sender


def push_reply(client: Any, reply: Any, context: Any) -> None:
    """Push the reply message to the SuperNode (Flower's `push_message`)."""
    from flwr.supernode.runtime.run_clientapp import push_message

    push_message(client, reply, context)


def finish_task(client: Any, context: Any, completed: bool, details: str) -> None:
    """Push the task's final status and updated context (Flower's `push_task_output`)."""
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime.run_clientapp import push_task_output

    status = SubStatus.COMPLETED if completed else SubStatus.FAILED
    push_task_output(client, context, status, details)
