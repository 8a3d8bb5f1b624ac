"""The region ClientApp called directly (no Ray): releases, refusals, evaluation, caching."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict

from fedfsd import wire
from fedfsd.aggregator.server_app import initial_weights
from fedfsd.aggregator.settings import RunSettings
from fedfsd.region.client_app import make_client_app, resolve_setup

SETTINGS = RunSettings(**{"local-steps": 2, "vehicles-per-step": 4, "frames-per-vehicle": 4})


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return initial_weights(SETTINGS)


def _msg(kind: str, w: dict, run_id: str = "run-1", rnd: int = 1, **cfg) -> Message:
    md = Metadata(
        run_id=1,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id=str(rnd),
        created_at=time.time(),
        ttl=600,
        message_type=kind,
    )
    config = {**SETTINGS.train_request(), "run-id": run_id, "round": rnd, **cfg}
    content = RecordDict(wire.packed_records(w, wire.CONFIG, config))
    return Message(metadata=md, content=content)


def _ctx(node_config: dict) -> Context:
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})


def _manifest(reply: Message) -> wire.UpdateManifest:
    return wire.manifest_from_bytes(reply.content.config_records[wire.MANIFEST][wire.MANIFEST_KEY])


def _releases(path: Path) -> list[dict]:
    if not path.exists():
        return []
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in recs if r.get("kind") == "release"]


SIM = {"partition-id": 1, "num-partitions": 2}


def test_train_releases_a_clipped_update_with_matching_manifest(tmp_path, weights) -> None:
    app = make_client_app(
        {
            "sim-vehicles": 40,
            "sim-frames": 6,
            "sim-ledger-dir": str(tmp_path),
            "sim-weighting": "bucket",
            "sim-update-norm-bound": 0.05,
        }
    )
    reply = app(_msg("train", weights), _ctx(SIM))
    assert set(reply.content.array_records) == {wire.ARRAYS}
    upd = wire.arrays_from(
        reply.content, wire.MANIFEST, expected={k: v.shape for k, v in weights.items()}
    )
    m = _manifest(reply)
    assert not m.refused_reason
    assert (m.region, m.run_id, m.round) == ("sim1", "run-1", 1)
    assert set(upd) == set(weights) and all(a.dtype == np.float32 for a in upd.values())
    assert m.sha256 == wire.array_digest(upd)
    assert wire.l2_norm(upd) <= 0.05 and m.update_norm == pytest.approx(wire.l2_norm(upd))
    assert 0 < m.epsilon <= m.epsilon_budget and m.steps == 2
    assert reply.content.metric_records[wire.METRICS][wire.NUM_EXAMPLES] == 32  # 40 → bucket 32

    ledger = tmp_path / "run-1" / "sim1.jsonl"
    assert len(_releases(ledger)) == 1
    # The same (run, round) again, e.g. after an aggregator restart: same release, no new spend.
    again = app(_msg("train", weights), _ctx(SIM))
    assert _manifest(again).sha256 == m.sha256
    assert len(_releases(ledger)) == 1


def test_over_budget_region_sends_no_arrays(tmp_path, weights) -> None:
    app = make_client_app(
        {
            "sim-vehicles": 40,
            "sim-frames": 6,
            "sim-ledger-dir": str(tmp_path),
            "sim-epsilon-budget": 1e-3,
        }
    )
    reply = app(_msg("train", weights), _ctx(SIM))
    assert not reply.content.array_records
    m = _manifest(reply)
    assert "budget" in m.refused_reason and m.sha256 == "" and m.round == 1
    assert reply.content.metric_records[wire.METRICS][wire.NUM_EXAMPLES] == 0
    assert _releases(tmp_path / "run-1" / "sim1.jsonl") == []


def test_bad_dataset_is_refused_without_leaking_paths(tmp_path, weights) -> None:
    (tmp_path / "data").mkdir()
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'region = "eu"\nepsilon_budget = 8.0\ndelta = 1e-6\nmin_noise_multiplier = 0.8\n'
        "max_clip_norm = 1.0\nupdate_norm_bound = 5.0\n"
    )
    node = {
        "region": "eu",
        "data-dir": str(tmp_path / "data"),
        "policy": str(policy),
        "ledger": str(tmp_path / "ledger.jsonl"),
    }
    app = make_client_app()
    reply = app(_msg("train", weights), _ctx(node))
    m = _manifest(reply)
    assert not reply.content.array_records
    assert m.refused_reason == "dataset invalid" and str(tmp_path) not in m.refused_reason
    ev = app(_msg("evaluate", weights), _ctx(node))
    assert ev.content.config_records[wire.REGION]["refused_reason"] == "dataset invalid"
    assert set(ev.content.metric_records[wire.METRICS]) == {wire.NUM_EXAMPLES}


@pytest.mark.parametrize(
    ("node", "cfg", "reason"),
    [
        ({}, {}, "region not configured"),
        ({"data-dir": "/nonexistent"}, {}, "region not configured"),
        (SIM, {"run-id": ""}, "bad train request"),
        (SIM, {"round": "three"}, "bad train request"),
        (SIM, {"round": 0}, "bad train request"),
        (SIM, {"local-steps": -3}, "bad train request"),
    ],
    ids=["no-node-config", "partial-node-config", "no-run-id", "str-round", "round-0", "bad-req"],
)
def test_misconfiguration_is_a_refusal_not_an_exception(tmp_path, weights, node, cfg, reason):
    app = make_client_app({"sim-ledger-dir": str(tmp_path), "sim-vehicles": 20})
    reply = app(_msg("train", weights, **cfg), _ctx(node))
    assert not reply.content.array_records
    assert _manifest(reply).refused_reason == reason


def test_evaluate_sends_only_the_metrics_the_policy_allows(tmp_path, weights) -> None:
    app = make_client_app(
        {
            "sim-vehicles": 30,
            "sim-frames": 6,
            "sim-ledger-dir": str(tmp_path),
            "sim-allowed-metrics": "ade,fde",
        }
    )
    app(_msg("train", weights), _ctx(SIM))  # evaluation is of a model received for training
    reply = app(_msg("evaluate", weights), _ctx(SIM))
    metrics = dict(reply.content.metric_records[wire.METRICS])
    assert set(metrics) == {"ade", "fde", wire.NUM_EXAMPLES}
    assert all(np.isfinite(v) and v >= 0 for v in metrics.values())
    assert reply.content.config_records[wire.REGION]["name"] == "sim1"
    assert not reply.content.array_records


def test_node_config_beats_simulation_keys(tmp_path) -> None:
    node = {"partition-id": 0, "data-dir": "/d", "policy": "/p.toml", "ledger": "/l.jsonl"}
    s = resolve_setup(node, {"sim-data-root": str(tmp_path)})
    assert s.data_dir == Path("/d") and s.policy_path == Path("/p.toml")
    for name in ("us", "eu", "cn"):
        (tmp_path / name).mkdir()
    s = resolve_setup({"partition-id": 4}, {"sim-data-root": str(tmp_path)})
    assert s.region == "eu" and s.data_dir == tmp_path / "eu" / "data"  # sorted: cn, eu, us
    assert s.ledger_path == tmp_path / "eu" / "ledger.jsonl"


def test_metrics_match_hand_computed_values() -> None:
    from fedfsd.data.feature_spec import LABEL_NAMES
    from fedfsd.region.evaluation import score_predictions

    y = np.zeros((2, len(LABEL_NAMES)), np.float32)
    pred = y.copy()
    col = {n: i for i, n in enumerate(LABEL_NAMES)}
    pred[:, col["dx_1s"]] = 3.0
    pred[:, col["dy_1s"]] = 4.0  # 5 m off at 1 s
    pred[0, col["dx_3s"]] = 6.0  # 6 m off at 3 s for one frame
    pred[:, col["accel"]] = [1.0, -3.0]
    scales = np.ones(len(LABEL_NAMES))
    m = score_predictions(pred, y, scales)
    assert m["ade"] == pytest.approx((5 + 0 + 6 + 5 + 0 + 0) / 6)
    assert m["fde"] == pytest.approx(3.0)
    assert m["accel_mae"] == pytest.approx(2.0)
    assert m["loss"] == pytest.approx(np.mean(pred.astype(np.float64) ** 2))
