"""Pull a message's objects from a SuperNode under a byte bound, in flwr 1.39's object format.

Why: the region executor must refuse an oversized or malformed message before it is inflated
(`RegionPolicy.max_message_bytes`), and Flower tells no object's size before its content is
pulled. Reading Flower's object tree, object heads and Array bodies uses non-public flwr 1.39
modules (`flwr.supercore.inflatable`), so it lives here; `fedfsd.region.executor` decides what
to do with the result.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from fedfsd.errors import PrivacyRefusal

MAX_OBJECTS = 100_000  # objects in one message's tree (a model has a few hundred)


class MessageRefused(PrivacyRefusal, RuntimeError):
    """The task's message is refused before it is pulled whole (size, object ids)."""


def _array_nbytes(body: bytes) -> int:
    """What an Array object says it inflates to (flwr 1.39: numpy dtype name and shape)."""
    import numpy as np

    meta = json.loads(body.decode("utf-8"))
    n = int(np.prod([int(d) for d in meta["shape"]], dtype=np.int64))
    if n < 0:
        raise MessageRefused("an array declares a negative size")
    return n * np.dtype(str(meta["dtype"])).itemsize


# How long an object of a delivered message may stay unavailable before the pull gives up.
# Flower's default (500 tries, ≈ 250 s at our 0.5 s backoff cap) kept an executor stuck on a
# message whose objects died with a killed SuperLink for 4 minutes, so the resumed run's first
# round found no region answering (tests/test_e2e_deploy.py's resume test, logs kept 2026-11-30).
# The ServerApp pushes a message's objects right after the message, from the same host, so a
# live object is available within seconds; a slow link slows transfers, not availability.
OBJECT_WAIT_S = 30.0


def pull_message_bounded(
    object_tree: Any,
    pull_object_fn: Any,
    confirm_fn: Any,
    max_bytes: int,
    *,
    initial_backoff: float = 0.05,
    backoff_cap: float = 0.5,
    object_wait: float = OBJECT_WAIT_S,
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
    (a pull that times out, or an object still unavailable after `object_wait` seconds, raises
    Flower's ObjectPullError: a failure, not a refusal).
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
            object_wait=object_wait,
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
    object_wait: float = OBJECT_WAIT_S,
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
        return pull_objects(
            ids,
            counted,
            max_time=object_wait,
            initial_backoff=initial_backoff,
            backoff_cap=backoff_cap,
        )

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
