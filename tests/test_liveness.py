"""The liveness wait before a round: who counts towards the quorum it waits for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedfsd import wire
from fedfsd.aggregator import liveness
from fedfsd.aggregator.liveness import alive_nodes


@pytest.fixture(autouse=True)
def _plain_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Flower Message needs a run's context; the fake grid reads only the destination."""
    monkeypatch.setattr(
        liveness,
        "_ping",
        lambda node, rnd, ttl: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node)),
    )


class _Grid:
    """Pings are answered in a fixed order, one batch of nodes per pull (a loaded box)."""

    def __init__(self, regions: dict[int, str], batches: list[list[int]]) -> None:
        self.regions, self.batches, self.ids = regions, batches, {}
        self.pulls = 0

    def push_messages(self, messages: list) -> list[str]:
        ids = [f"m{m.metadata.dst_node_id}" for m in messages]
        self.ids.update(zip(ids, (m.metadata.dst_node_id for m in messages), strict=True))
        return ids

    def pull_messages(self, ids: list[str]) -> list:
        batch = self.batches[self.pulls] if self.pulls < len(self.batches) else []
        self.pulls += 1
        return [self._reply(f"m{n}", n) for n in batch if f"m{n}" in ids]

    def _reply(self, mid: str, node: int) -> SimpleNamespace:
        region = {wire.REGION: {"name": self.regions[node]}}
        return SimpleNamespace(
            metadata=SimpleNamespace(reply_to_message_id=mid),
            has_error=lambda: False,
            content=SimpleNamespace(config_records=region),
        )


REGIONS = {1: "sim3", 2: "sim0", 3: "sim1", 4: "sim2"}
ORDER = [[1, 2, 3], [], [4]]  # the region that refused the run answers first, sim2 last


def test_a_region_that_refused_the_run_does_not_end_the_wait() -> None:
    grid = _Grid(REGIONS, ORDER)
    names: dict[int, str] = {}
    live, listed = alive_nodes(
        grid, lambda: [1, 2, 3, 4], 3, 30.0, 5, names, poll=0.0, not_counted={"sim3": "why"}
    )
    assert live == [1, 2, 3, 4] and listed == [1, 2, 3, 4]
    assert names == REGIONS


def test_without_refusals_the_wait_ends_at_the_quorum() -> None:
    grid = _Grid(REGIONS, ORDER)
    live, _ = alive_nodes(grid, lambda: [1, 2, 3, 4], 3, 30.0, 5, {}, poll=0.0)
    assert live == [1, 2, 3] and grid.pulls == 1


def test_the_wait_still_ends_at_its_timeout() -> None:
    grid = _Grid(REGIONS, [[1, 2, 3]])  # sim2 never answers
    live, _ = alive_nodes(
        grid, lambda: [1, 2, 3, 4], 3, 0.2, 5, {}, poll=0.01, not_counted={"sim3"}
    )
    assert live == [1, 2, 3]
