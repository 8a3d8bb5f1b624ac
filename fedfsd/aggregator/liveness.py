"""Which connected regions answer right now: checked before a round's train messages go out.

Why: the SuperLink lists a killed SuperNode as connected until its heartbeats lapse (about a
minute). A round sent then reaches the survivors, who train and spend ε, and fails on quorum
anyway, discarding what they released. A cheap query message first (no weights, nothing the
region spends budget on) tells which nodes answer; below quorum the round fails without sending
a train message.

Any reply counts as alive, an error reply too (a ClientApp without a query handler, a region
refusing the bundle): the node is there and serving its queue. The wait ends as soon as a quorum
has answered: the round then goes to every connected region, so a region on a slow link that has
not answered yet still trains (a dead one costs only the round's timeout, as before).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedfsd import wire

TTL_MARGIN_S = 5.0


def _ping(node: int, rnd: int, ttl: float) -> Message:
    content = RecordDict({wire.CONFIG: ConfigRecord({"ping": 1, "round": rnd})})
    return Message(
        content=content,
        dst_node_id=node,
        message_type=MessageType.QUERY,
        group_id=f"ping-{rnd}",
        ttl=ttl,
    )


def _region_of(reply: Message) -> str | None:
    if reply.has_error():
        return None
    info = reply.content.config_records.get(wire.REGION)
    name = info.get("name") if info else None
    return str(name) if name else None


def alive_nodes(
    grid: Grid,
    list_nodes: Callable[[], Iterable[int]],
    min_nodes: int,
    timeout: float,
    rnd: int,
    node_regions: dict[int, str],
    stop: threading.Event | None = None,
    poll: float = 0.25,
    not_counted: Collection[str] = (),
) -> tuple[list[int], list[int]]:
    """(answering nodes, listed nodes) as soon as `min_nodes` answer, or what answered by `timeout`.

    Pings the listed nodes (again, when new ones appear) and waits for their replies; names
    learnt from replies go into `node_regions`. Regions in `not_counted` (those that refused the
    whole run) are returned when they answer but do not count towards `min_nodes`: the round
    cannot use them, so a quick answer from one must not end the wait before a region that can.
    """
    deadline = time.monotonic() + timeout
    answered: set[int] = set()
    pending: dict[str, int] = {}  # message id -> node
    asked: set[int] = set()
    listed: list[int] = []
    while True:
        listed = sorted(list_nodes())
        new = [n for n in listed if n not in asked]
        if new:
            ttl = max(1.0, deadline - time.monotonic()) + TTL_MARGIN_S
            ids = grid.push_messages([_ping(n, rnd, ttl) for n in new])
            pending.update(dict(zip(ids, new, strict=True)))
            asked.update(new)
        if pending:
            for reply in grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                answered.add(node)
                if name := _region_of(reply):
                    node_regions[node] = name
        live = sorted(n for n in answered if n in listed)
        now = time.monotonic()
        if sum(node_regions.get(n) not in not_counted for n in live) >= min_nodes:
            return live, listed
        if now >= deadline:
            return live, listed
        if stop is not None and stop.wait(poll):
            return live, listed
        if stop is None:
            time.sleep(poll)
