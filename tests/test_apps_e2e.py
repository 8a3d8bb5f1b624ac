"""End to end in Flower's in-process simulation: real ServerApp, real region ClientApps.

4 virtual regions (2 honest, 1 tampering, 1 over budget); the aggregator is restarted with
resume twice, once after a crash that lost the round-4 checkpoint, and round 5 cannot meet its
quorum (see tests/apps/tampering_apps.py, make_crash_resume_server_app).
A simulation starts Ray and a torch import per worker (15 s idle, minutes on a loaded 2-core
box), so everything is checked in one simulation.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedfsd.deploy.processes import descendants, terminate

APPS = Path(__file__).resolve().parent / "apps"

pytestmark = pytest.mark.slow


def _run(cfg: dict, snapshot: Path, sim: dict, n: int) -> None:
    from flwr.simulation import run_simulation
    from tampering_apps import make_crash_resume_server_app, make_test_client_app

    # Flower runs the ServerApp in a non-daemon thread that outlives a crashed simulation
    # runtime (e.g. Ray failing to start on an overloaded box); `stop` lets it end at once.
    stop = threading.Event()
    try:
        run_simulation(
            server_app=make_crash_resume_server_app(cfg, str(snapshot), stop),
            client_app=make_test_client_app(sim),
            num_supernodes=n,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    finally:
        stop.set()


def _stop_ray(before: set[int]) -> None:
    """Shut Ray down and kill what the simulation started (processes not in `before`)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    terminate(descendants(os.getpid()) - before)


@pytest.fixture
def stops_ray() -> Iterator[None]:
    """Stop Ray and every process the simulation started, even if Ray failed to start."""
    before = descendants(os.getpid())
    try:
        yield
    finally:
        _stop_ray(before)


def _ray_failed_to_start(exc: BaseException) -> bool:
    while exc is not None:
        if "timed out during startup" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _ledger_releases(path: Path) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in lines if r.get("kind") == "release"]


def test_federation_rejects_bad_updates_refuses_over_budget_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stops_ray: None
) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    # Ray workers must import the test ClientApp module by name.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(APPS))
    for attempt in (1, 2):  # Ray's 30 s start-up limit can fail on an overloaded box: retry once
        base = tmp_path / f"attempt{attempt}"
        run_dir, ledgers, snap = base / "run", base / "ledgers", base / "after-round-4"
        cfg, sim = _configs(run_dir, ledgers)
        before = descendants(os.getpid())
        try:
            _run(cfg, snap, sim, 4)
            break
        except RuntimeError as e:
            if attempt == 2 or not _ray_failed_to_start(e):
                raise
            _stop_ray(before)
    _check(cfg, run_dir, ledgers, snap)


def _configs(run_dir: Path, ledgers: Path) -> tuple[dict, dict]:
    sim = {
        "sim-vehicles": 40,
        "sim-frames": 8,
        "sim-ledger-dir": str(ledgers),
        "sim-allowed-metrics": "loss,ade,fde",  # opted in: each a DP, ledgered release
    }
    cfg = {
        "num-server-rounds": 4,
        "local-steps": 2,
        "vehicles-per-step": 4,
        "frames-per-vehicle": 4,
        "noise-multiplier": 1.0,
        "clip-norm": 1.0,
        "lr": 0.1,
        "min-regions": 2,
        "round-timeout": 900.0,  # only an upper bound: a loaded CI box can take minutes
        "update-norm-bound": 5.0,
        "server-momentum": 0.5,
        "run-dir": str(run_dir),
        "run-id": "e2e-run",
    }
    return cfg, sim


def _check(cfg: dict, run_dir: Path, ledgers: Path, snap: Path) -> None:

    from tampering_apps import EXPECTED_REASON

    from fedfsd.aggregator.checkpoint import load_checkpoint, read_csv
    from fedfsd.aggregator.server_app import initial_weights
    from fedfsd.aggregator.settings import parse_settings

    rounds = [json.loads(x) for x in (snap / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    for r in rounds:
        assert r["status"] == "ok", r
        assert r["accepted"] == ["sim0", "sim1"], r
        assert r["rejected"] == ["sim2"], r
        assert r["refused"] == ["sim3"], r

    # Every tampered update was rejected with the right reason and logged; never aggregated.
    rejected = [json.loads(x) for x in (run_dir / "rejected.jsonl").read_text().splitlines()]
    log = (run_dir / "rounds.jsonl").read_text()  # on failure, says what each round saw
    assert [(r["round"], r["region"]) for r in rejected] == [
        (i, "sim2") for i in (1, 2, 3, 4, 5)
    ], log
    for r in rejected:
        assert EXPECTED_REASON[r["round"]] in r["reason"], r

    # The over-budget region never released anything: no ledger spend, no arrays accepted.
    assert not (ledgers / "e2e-run" / "sim3.jsonl").exists() or not _ledger_releases(
        ledgers / "e2e-run" / "sim3.jsonl"
    )

    # The model moved, checkpoints and metrics are there, ε grows per region.
    ckpt = load_checkpoint(snap)
    assert ckpt.round == 4 and ckpt.run_id == "e2e-run"
    init = initial_weights(parse_settings(cfg))
    assert any(not np.array_equal(init[k], ckpt.weights[k]) for k in init)
    assert all(np.all(np.isfinite(v)) for v in ckpt.weights.values())
    assert (snap / "global_model.npz").exists() and (snap / "metrics.png").exists()
    metrics = read_csv(snap / "metrics.csv")
    assert {(m["region"], m["metric"]) for m in metrics if m["round"] == "4"} >= {
        ("sim0", "loss"),
        ("sim1", "ade"),
        ("sim0", "train_loss"),
    }
    # The over-budget region released no update, so it scores nothing either.
    assert not any(m["region"] == "sim3" for m in metrics)
    eps = [e for e in read_csv(snap / "epsilon.csv") if e["region"] == "sim0"]
    assert [int(e["round"]) for e in eps] == [1, 2, 3, 4]
    assert all(
        float(b["epsilon"]) > float(a["epsilon"]) > 0
        for a, b in zip(eps[:-1], eps[1:], strict=True)
    )

    # After the crash, round 4 ran again: the regions returned their cached releases (no new
    # spend), the logs of the lost round were replaced, not duplicated, and the recomputed
    # global model is bit-identical. Round 5 missed its quorum of 3 and left the model as is.
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert rounds[3]["status"] == "ok"
    assert rounds[4]["status"] == "failed" and rounds[4]["accepted"] == ["sim0", "sim1"]
    # Round 6 wanted 5 nodes of 4: the bounded wait gave up, nothing was sent, the run ended.
    assert rounds[5]["status"] == "failed" and rounds[5]["nodes"] == 4
    assert rounds[5]["accepted"] == rounds[5]["refused"] == rounds[5]["rejected"] == []
    after = load_checkpoint(run_dir)
    assert after.round == 6 and after.run_id == "e2e-run"
    for k in ckpt.weights:
        np.testing.assert_array_equal(after.weights[k], ckpt.weights[k])
    releases = _ledger_releases(ledgers / "e2e-run" / "sim0.jsonl")
    assert [r["round"] for r in releases] == [1, 2, 3, 4, 5]  # no round spent twice
    assert "digest mismatch" in rejected[-1]["reason"]
    eps = [int(e["round"]) for e in read_csv(run_dir / "epsilon.csv") if e["region"] == "sim0"]
    assert eps == [1, 2, 3, 4, 5]

    # Every accepted manifest is a signed receipt (the resumed round 4 once, not twice), and each
    # region's ε report verifies against its ledger and those receipts; sim2's releases were all
    # rejected, which verify explains from rejected.jsonl.
    from typer.testing import CliRunner

    from fedfsd.aggregator.receipts import read_receipts
    from fedfsd.cli import app
    from fedfsd.privacy.report import build_report, to_json

    receipts = read_receipts(run_dir)
    assert [r["round"] for r in receipts if r["region"] == "sim0"] == [1, 2, 3, 4, 5]
    assert all(r["manifest"]["signature"] and r["public_key"] for r in receipts)
    for region in ("sim0", "sim1", "sim2"):
        led = ledgers / "e2e-run" / f"{region}.jsonl"
        report = run_dir.parent / f"epsilon-{region}.json"
        report.write_text(to_json(build_report(led)))
        args = ["privacy", "verify", str(report), "--ledger", str(led), "--receipts", str(run_dir)]
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 0 and "FAILED" not in out.output, out.output
