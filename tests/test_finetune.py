"""`fedfsd region finetune`: non-DP personalisation selected on validation episodes, recorded in
the region's ledger as not released, and refused by the egress path."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from finetune_fixtures import tiny_dataset
from flwr.app import Context, Message, Metadata, RecordDict
from typer.testing import CliRunner

from fedfsd import wire
from fedfsd.cli import app
from fedfsd.config import RegionPolicy, TrainRequest
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.data.vehicles import load_vehicle_frames
from fedfsd.modelhub.files import load_weights, weights_sha256
from fedfsd.models import build_model, get_weights
from fedfsd.privacy.ledger import Ledger
from fedfsd.privacy.local_round import run_local_round
from fedfsd.privacy.report import build_report
from fedfsd.region.client_app import RegionDeps, default_deps, make_client_app
from fedfsd.region.egress import EgressRefused, guard_update, refuse_personalised
from fedfsd.region.evaluation import evaluate_weights
from fedfsd.region.finetune import describe, finetune_model, record_personalised

REQ = TrainRequest(local_steps=4, vehicles_per_step=8, frames_per_vehicle=4, lr=0.05)


def _split(frames, every: int = 4):
    """Train / validation frames of one synthetic fleet, split by whole episodes."""
    eps = np.unique(frames.episodes)
    val = eps[::every]
    return frames.select_episodes(np.setdiff1d(eps, val)), frames.select_episodes(val)


@pytest.fixture(scope="module")
def synthetic():
    frames = make_synthetic_frames(80, 40, seed=3, region="eu")
    train, val = _split(frames)
    start = get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))
    return train, val, start


def test_finetune_improves_validation_and_returns_the_selected_checkpoint(synthetic) -> None:
    train, val, start = synthetic
    res = finetune_model(
        train, val, start, "mlp", max_steps=200, eval_every=40, lr=0.1, vehicles_per_step=16, seed=0
    )
    fdes = {s: m["fde"] for s, m in res.curve}
    assert (
        res.val_fde_before == fdes[0] == pytest.approx(evaluate_weights(val, start, "mlp")["fde"])
    )
    assert res.val_fde_after < 0.5 * res.val_fde_before  # a learnable signal: real gain
    assert res.steps == min(fdes, key=fdes.get) and res.steps > 0
    # The returned weights ARE the selected checkpoint, scored again from scratch.
    assert evaluate_weights(val, res.weights, "mlp")["fde"] == pytest.approx(res.val_fde_after)
    assert res.base_model_sha256 == weights_sha256(start) != res.weights_sha256


def test_a_diverging_finetune_keeps_the_received_model(synthetic) -> None:
    train, val, start = synthetic
    res = finetune_model(
        train, val, start, "mlp", max_steps=30, eval_every=10, lr=50.0, vehicles_per_step=16, seed=0
    )
    assert res.steps == 0 and not res.improved  # candidate 0 won: never worse on validation
    assert res.val_fde_after == res.val_fde_before
    assert all(np.array_equal(res.weights[k], start[k]) for k in start)
    assert all(m["fde"] > res.val_fde_before or not np.isfinite(m["fde"]) for _, m in res.curve[1:])


def test_patience_stops_early(synthetic) -> None:
    train, val, start = synthetic
    res = finetune_model(
        train, val, start, "mlp", max_steps=500, eval_every=5, lr=50.0, vehicles_per_step=16,
        patience=2, seed=0,
    )  # fmt: skip
    assert res.stopped_early and res.steps_run == 10 and res.steps == 0


def test_train_and_validation_must_be_one_fleet(synthetic) -> None:
    train, _, start = synthetic
    other = make_synthetic_frames(10, 10, seed=9, region="eu")
    with pytest.raises(ValueError, match="different regions or fleets"):
        finetune_model(train, other, start, "mlp", max_steps=1)


def _policy(region: str) -> RegionPolicy:
    return RegionPolicy(
        region=region,
        epsilon_budget=50.0,
        delta=1e-3,
        min_noise_multiplier=1.0,
        max_clip_norm=1.0,
        update_norm_bound=5.0,
        max_local_steps=4,
        max_vehicles_per_step=8,
        max_frames_per_vehicle=4,
        allowed_metrics=["loss"],
    )


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real tiny eu-like region after one DP round: dataset, policy, ledger, global model."""
    root = tmp_path_factory.mktemp("region")
    data = tiny_dataset(root, "eu", seed=5)
    train = load_vehicle_frames(data, split="train")
    policy = _policy(train.region)
    (root / "policy.toml").write_text(tomli_w.dumps(policy.model_dump(exclude_none=True)) + "\n")
    ledger = root / "ledger.jsonl"
    start = get_weights(build_model("mlp", train.features.shape[1], train.labels.shape[1]))
    res = run_local_round(train, policy, ledger, start, REQ, "run-1", 1, "mlp", seed=1)
    glob = root / "global.npz"
    np.savez(glob, **res.new_weights)
    return {"root": root, "data": data, "ledger": ledger, "global": glob, "policy": policy}


def _finetune_cli(region: dict, out: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list]:
    import fedfsd.data.vehicles as vehicles

    splits: list[str] = []
    real = vehicles.load_vehicle_frames

    def spy(path, split="train"):  # records which splits were read; the real loader does the rest
        splits.append(split)
        return real(path, split=split)

    monkeypatch.setattr(vehicles, "load_vehicle_frames", spy)
    args = ["region", "finetune", "--data", str(region["data"]), "--model", str(region["global"])]
    args += ["--ledger", str(region["ledger"]), "--out", str(out), "--max-steps", "150"]
    args += ["--eval-every", "25", "--vehicles-per-step", "8", "--seed", "0", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), splits


def test_cli_finetune_writes_model_sidecar_and_ledger_line_without_spending(
    region, tmp_path, monkeypatch
) -> None:
    led = Ledger(region["ledger"])
    before = (led.releases(), led.history(), led.epsilon())
    out = tmp_path / "personal.npz"
    doc, splits = _finetune_cli(region, out, monkeypatch)

    assert sorted(splits) == ["train", "val"]  # the test split is never read
    weights = load_weights(out)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["weights_sha256"] == weights_sha256(weights) == doc["weights_sha256"]
    assert side["base_model_sha256"] == weights_sha256(load_weights(region["global"]))
    assert side["released"] is False and side["private"] is False
    assert side["fleet_id"] == load_vehicle_frames(region["data"], "val").fleet_id
    assert side["val_fde_after"] <= side["val_fde_before"]
    val = load_vehicle_frames(region["data"], "val")
    assert evaluate_weights(val, weights, "mlp")["fde"] == pytest.approx(side["val_fde_after"])

    led = Ledger(region["ledger"])
    lines = [r for r in led.records() if r["kind"] == "personalised"]
    assert lines[-1]["weights_sha256"] == side["weights_sha256"]
    assert lines[-1]["released"] is False and lines[-1]["path"] == str(out.resolve())
    # ε, the accountant history and the releases ignore the personalised line.
    assert (led.releases(), led.history(), led.epsilon()) == before
    rep = build_report(region["ledger"])
    assert rep.accounting.epsilon == pytest.approx(before[2])
    said = [s for s in rep.scope.not_covered if "personalised" in s]
    assert said and "WITHOUT differential privacy" in said[0] and "not released" in said[0]


def test_cli_refuses_a_missing_ledger(region, tmp_path) -> None:
    args = ["region", "finetune", "--data", str(region["data"]), "--model", str(region["global"])]
    args += ["--ledger", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "p.npz")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code != 0 and "no such ledger" in r.output
    assert not (tmp_path / "p.npz").exists()


def _train_msg(weights: dict, rnd: int) -> Message:
    md = Metadata(
        run_id=1,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id=str(rnd),
        created_at=time.time(),
        ttl=600,
        message_type="train",
    )
    cfg = {
        "local-steps": 4,
        "lr": 0.05,
        "noise-multiplier": 1.0,
        "clip-norm": 1.0,
        "vehicles-per-step": 8,
        "frames-per-vehicle": 4,
        "model": "mlp",
        "run-id": "run-2",
        "round": rnd,
    }
    content = RecordDict(wire.packed_records(weights, wire.CONFIG, cfg))
    return Message(metadata=md, content=content)


def test_release_path_refuses_the_personalised_model_and_passes_a_dp_round(
    region, tmp_path, monkeypatch
) -> None:
    out = tmp_path / "personal.npz"
    doc, _ = _finetune_cli(region, out, monkeypatch)
    assert doc["steps"] > 0  # the finetune moved the model (else nothing would need refusing)
    personal, received = load_weights(out), load_weights(region["global"])
    node = {
        "region": "eu",
        "data-dir": str(region["data"]),
        "policy": str(region["root"] / "policy.toml"),
        "ledger": str(region["ledger"]),
    }
    ctx = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})
    real = default_deps()

    def leaks_personal(*args, **kw):  # a faulty training path that hands back the personal model
        res = real.local_round(*args, **kw)
        res.new_weights = {k: v.copy() for k, v in personal.items()}
        return res

    bad = make_client_app(deps=RegionDeps(real.load_frames, real.load_policy, leaks_personal))
    reply = bad(_train_msg(received, 1), ctx)
    m = wire.manifest_from_bytes(reply.content.config_records[wire.MANIFEST][wire.MANIFEST_KEY])
    assert not reply.content.array_records and m.sha256 == ""
    assert m.refused_reason.startswith("egress refused") and "personalised" in m.refused_reason

    good = make_client_app(deps=real)
    reply = good(_train_msg(received, 2), ctx)
    m = wire.manifest_from_bytes(reply.content.config_records[wire.MANIFEST][wire.MANIFEST_KEY])
    assert not m.refused_reason and set(reply.content.array_records) == {wire.ARRAYS}


def test_guard_refuses_weights_update_and_reconstruction(tmp_path, synthetic) -> None:
    train, val, start = synthetic
    ledger = tmp_path / "l.jsonl"
    Ledger(ledger).create(
        region="eu", fleet_id=train.fleet_id, vehicles=train.n_vehicles, delta=1e-3,
        epsilon_budget=8.0, private=True, created="2026-01-01T00:00:00+00:00",
    )  # fmt: skip
    res = finetune_model(train, val, start, "mlp", max_steps=40, eval_every=20, seed=0)
    assert res.improved
    other = {k: v + np.float32(1e-3) for k, v in start.items()}
    refuse_personalised(ledger, start, res.weights)  # nothing recorded yet: passes
    record_personalised(ledger, describe(res, train, val), tmp_path / "p.npz")

    with pytest.raises(EgressRefused, match="p.npz"):
        refuse_personalised(ledger, start, res.weights, guard_update(start, res.weights, 1e9))
    # The personalised update applied to a received model equal to its base: refused by digest.
    moved = {k: start[k] + (res.weights[k] - start[k]) for k in start}
    with pytest.raises(EgressRefused):
        refuse_personalised(ledger, start, moved, guard_update(start, moved, 1e9))
    # Any other model passes.
    refuse_personalised(ledger, start, other, guard_update(start, other, 1e9))
    assert Ledger(ledger).releases() == [] and Ledger(ledger).history() == []
