"""The aggregator's train messages expire shortly after their round stops waiting.

Why: Flower's default TTL is 12 h. A region that comes back after an outage would otherwise pull
every queued train message and spend privacy budget on rounds nobody waits for any more. The
expiry is judged here with the SuperLink's own rule (flwr's `message_ttl_has_expired`, which
drops expired messages before a node can pull them), and the region's reply to such a message
still satisfies the SuperLink's check that a reply does not outlive its instruction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType

from fedfsd.aggregator.server_app import TTL_MARGIN_S, _messages, initial_weights
from fedfsd.aggregator.settings import RunSettings
from fedfsd.flower.message_objects import TaskIdentity
from fedfsd.flower.message_ttl import DEFAULT_TTL, MESSAGE_TTL_TOLERANCE, message_ttl_has_expired
from fedfsd.region.client_app import make_client_app

SETTINGS = RunSettings(**{"local-steps": 2, "vehicles-per-step": 4, "frames-per-vehicle": 4})
SIM = {"partition-id": 0, "num-partitions": 1}


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return initial_weights(SETTINGS)


@pytest.fixture(autouse=True)
def inside_a_server_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity Flower sets in a ServerApp process (messages are stamped with it)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
@pytest.mark.parametrize("timeout", [5.0, 120.0, 3600.0])
def test_a_round_message_lives_through_its_round_and_not_much_longer(
    weights, kind: str, timeout: float
) -> None:
    cfg = {**SETTINGS.train_request(), "run-id": "r", "round": 3}
    msgs = _messages([11, 12], kind, weights, cfg, 3, timeout)
    assert [m.metadata.dst_node_id for m in msgs] == [11, 12]
    for m in msgs:
        md = m.metadata
        sent = md.created_at
        # Still deliverable at the last moment the round waits for a reply ...
        assert not message_ttl_has_expired(md, sent + timeout)
        # ... gone for a region that shows up after the round (the next one, or hours later).
        assert message_ttl_has_expired(md, sent + timeout + TTL_MARGIN_S + 1.0)
        assert md.ttl < DEFAULT_TTL


def test_the_region_reply_does_not_outlive_the_message(tmp_path: Path, weights) -> None:
    """A train message answered by the real ClientApp (simulation fleet): the reply's TTL ends
    no later than the instruction's, the condition under which the SuperLink stores a reply."""
    from flwr.app import Context, RecordDict

    cfg = {**SETTINGS.train_request(), "run-id": "run-x", "round": 1}
    (msg,) = _messages([7], MessageType.TRAIN, weights, cfg, 1, 60.0)
    app = make_client_app({"sim-vehicles": 40, "sim-frames": 6, "sim-ledger-dir": str(tmp_path)})
    ctx = Context(run_id=1, node_id=7, node_config=SIM, state=RecordDict(), run_config={})
    reply = app(msg, ctx)
    assert reply.content.array_records, "the region released an update"
    ins, res = msg.metadata, reply.metadata
    assert res.ttl > 0
    assert res.created_at + res.ttl <= ins.created_at + ins.ttl + MESSAGE_TTL_TOLERANCE
    assert not message_ttl_has_expired(res, res.created_at)
