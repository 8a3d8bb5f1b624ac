"""`evaluate-every`: the aggregator scores the global model after every k-th round and the last.

The Grid here is a small in-memory stand-in that answers each pushed message at once (Flower's
real grids need a SuperLink); everything else is the real round loop of `run_federation`.
"""

from __future__ import annotations

import csv
import itertools
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from fedfsd import wire
from fedfsd.aggregator.server_app import run_federation
from fedfsd.aggregator.settings import SettingsError, parse_settings
from fedfsd.flower.message_objects import TaskIdentity


class AnsweringGrid:
    """Two nodes; a train message gets an empty reply, an evaluate message an FDE score."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self._replies: list[Message] = []
        self.pushed: list[tuple[str, str]] = []  # (message type, group id = round)

    def get_node_ids(self) -> Iterable[int]:
        return [11, 12]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            mid = f"m{next(self._ids)}"
            ids.append(mid)
            self.pushed.append((m.metadata.message_type, m.metadata.group_id))
            content = RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 0})})
            if m.metadata.message_type == MessageType.EVALUATE:
                content = RecordDict(
                    {
                        wire.METRICS: MetricRecord({"fde": 2.5, wire.NUM_EXAMPLES: 1}),
                        wire.REGION: ConfigRecord({"name": f"r{m.metadata.dst_node_id}"}),
                    }
                )
            md = Metadata(
                run_id=1,
                message_id=f"reply-{mid}",
                src_node_id=m.metadata.dst_node_id,
                dst_node_id=0,
                reply_to_message_id=mid,
                group_id=m.metadata.group_id,
                created_at=time.time(),
                ttl=60,
                message_type=m.metadata.message_type,
            )
            self._replies.append(Message(metadata=md, content=content))
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        wanted = set(ids)
        got = [r for r in self._replies if r.metadata.reply_to_message_id in wanted]
        self._replies = [r for r in self._replies if r not in got]
        return got


def _fde_rounds(run_dir: Path) -> list[int]:
    with (run_dir / "metrics.csv").open(newline="") as fh:
        return sorted({int(r["round"]) for r in csv.DictReader(fh) if r["metric"] == "fde"})


@pytest.mark.parametrize(
    ("rounds", "every", "expected"),
    [(5, 1, [1, 2, 3, 4, 5]), (5, 2, [2, 4, 5]), (4, 10, [4])],
)
def test_evaluate_every_k_rounds_and_after_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rounds: int, every: int, expected: list[int]
) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what Flower sets inside a ServerApp
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    grid = AnsweringGrid()
    s = parse_settings(
        {
            "num-server-rounds": rounds,
            "evaluate-every": every,
            "min-regions": 1,
            "round-timeout": 5.0,
            "run-id": "ev",
            "local-steps": 1,
        }
    )
    run_federation(grid, s, tmp_path)  # type: ignore[arg-type]
    evaluated = sorted({int(g) for t, g in grid.pushed if t == MessageType.EVALUATE})
    assert evaluated == expected
    assert _fde_rounds(tmp_path) == expected
    trained = sorted({int(g) for t, g in grid.pushed if t == MessageType.TRAIN})
    assert trained == list(range(1, rounds + 1))  # every round still trains


def test_evaluate_every_must_be_positive() -> None:
    with pytest.raises(SettingsError, match="evaluate-every"):
        parse_settings({"evaluate-every": 0})
