"""Flower 1.39's message internals that studies and tests need (non-public `flwr.supercore`).

Why: a Message travels as a tree of content-addressed objects (`flwr.supercore.inflatable`);
measuring its wire size, storing it as a SuperNode does, or stamping a Message outside a
running Flower task (`TaskIdentity`, which Flower sets inside a ServerApp or ClientApp process)
reaches into modules Flower does not publish. They are re-exported from here so that a Flower
upgrade touches one package.
"""

from __future__ import annotations

from typing import Any

from flwr.proto.message_pb2 import ObjectTree  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "InMemoryObjectStore",
    "ObjectPullError",
    "ObjectTree",
    "ObjectUnavailableError",
    "TaskIdentity",
    "deflated_size",
    "get_all_nested_objects",
    "get_object_tree",
]


def deflated_size(message: Any) -> int:
    """Bytes of all objects `message` deflates into (what crosses the wire, before gRPC)."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(message).values())
