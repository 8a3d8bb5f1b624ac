"""How the aggregator sorts one train reply: accepted, rejected, refused or error."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedfsd import wire
from fedfsd.aggregator.server_app import RoundOutcome, judge_train_reply
from fedfsd.aggregator.update_checks import Expectation

GLOBAL = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
EXP = Expectation.from_weights(GLOBAL, norm_bound=1.0, run_id="r", round_idx=2)


def _md(node: int) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="2",
        created_at=time.time(),
        ttl=60,
        message_type="train",
    )


def _reply(node: int, region: str = "eu", n: float = 1, arrays: bool = True, **m) -> Message:
    upd = {"w": np.full((2, 2), 0.1, np.float32), "b": np.zeros(2, np.float32)}
    fields = {"region": region, "run_id": "r", "round": 2, "sha256": wire.array_digest(upd), **m}
    man = {wire.MANIFEST_KEY: wire.UpdateManifest(schema=2, **fields).SerializeToString()}
    records = {wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: n, "loss": 0.5})}
    if arrays:
        records.update(wire.packed_records(upd, wire.MANIFEST, man))
    else:
        records[wire.MANIFEST] = ConfigRecord(man)
    return Message(metadata=_md(node), content=RecordDict(records))


def _judge(*replies: Message, regions: dict | None = None) -> RoundOutcome:
    out, regions = RoundOutcome(), {} if regions is None else regions
    for r in replies:
        judge_train_reply(r, EXP, regions, out)
    return out


def test_honest_reply_is_accepted_with_its_weight_metrics_and_epsilon() -> None:
    out = _judge(_reply(1, n=64, epsilon=1.5))
    assert [(r, w) for r, _, w in out.accepted] == [("eu", 64.0)]
    assert out.epsilon_rows == [(2, "eu", 1.5, 0.0, 0.0, 0.0)]
    assert out.metrics_rows == [(2, "eu", "train_loss", 0.5)]


@pytest.mark.parametrize("n", [3, 0, -4, 1e12, float("nan"), 2.5])
def test_weights_other_than_one_or_a_power_of_two_bucket_are_rejected(n) -> None:
    out = _judge(_reply(1, n=n))
    assert not out.accepted and "num-examples" in out.rejected[0][1]


def test_refusal_without_arrays_is_a_refusal_and_with_arrays_a_rejection() -> None:
    out = _judge(_reply(1, arrays=False, refused_reason="budget", epsilon=7.9))
    assert out.refused == [("eu", "budget")] and not out.rejected
    assert out.epsilon_rows[0][2] == 7.9
    out = _judge(_reply(1, refused_reason="budget"))
    assert out.rejected and not out.refused and not out.accepted


def test_a_node_cannot_switch_region_or_send_twice_for_one_region() -> None:
    out = _judge(_reply(1, "eu"), _reply(2, "eu"))
    assert [r for r, _, _ in out.accepted] == ["eu"]
    assert out.rejected == [("eu", "a second update for this region in this round")]
    out = _judge(_reply(1, "us"), regions={1: "eu"})
    assert not out.accepted and "claims region 'us'" in out.rejected[0][1]


def test_error_reply_and_missing_manifest() -> None:
    err = Message(Error(code=1, reason="node gone"), reply_to=_reply(3))
    out = _judge(err)
    assert out.errors and not out.accepted
    bare = Message(
        metadata=_md(4),
        content=RecordDict(
            {
                wire.ARRAYS: wire.pack_arrays(GLOBAL)[0],
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1}),
            }
        ),
    )
    out = _judge(bare)
    assert out.rejected == [("node-4", "missing manifest")]
