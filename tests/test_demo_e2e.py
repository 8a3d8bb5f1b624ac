"""`fedfsd demo` end to end on a tiny fleet, through the real CLI and processes.

The demo is the README's first command: this runs the same code path (data generation, planner,
TLS federation with one SuperNode per region, region baselines, scoring, reports verified against
ledgers and receipts) with 300 vehicles per region, one round and a small step budget, and checks
the files and names the README and the issue promise.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from demo_runs import run_demo

pytestmark = pytest.mark.slow

REGIONS = ("cn", "eu", "us")
METRIC_KEYS = {"loss", "ade", "fde", "accel_mae", *(f"fde_{r}" for r in REGIONS)}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    return run_demo(
        tmp_path_factory.mktemp("demo"), "--vehicles", "300", "--rounds", "1", "--local-steps", "20"
    )


def test_demo_exits_zero_and_writes_summary(demo_run) -> None:
    proc, run_dir = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    pooled = summary["pooled_test"]
    expected = {
        "federated",
        "constant-velocity prior",
        *(f"local-only (no DP) {r}" for r in REGIONS),
        *(f"personalised {r}" for r in REGIONS),
    }
    assert set(pooled) == expected
    for name, scores in pooled.items():
        assert set(scores) == METRIC_KEYS, name
        assert all(v > 0 for v in scores.values()), name
    assert summary["reports_verified_with_ledgers_and_receipts"] is True
    assert set(summary["best_on_own_region"]) == set(REGIONS)
    for r in REGIONS:
        eps = summary["epsilon_per_region"][r]
        assert 0 < eps <= summary["epsilon_budget"]
    assert set(summary["seconds"]) >= {"data", "plan", "federation", "region_baselines", "total"}


def test_demo_prints_which_model_wins_where(demo_run) -> None:
    proc, run_dir = demo_run
    assert proc.returncode == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    for r in REGIONS:
        best = summary["best_on_own_region"][r]
        assert f"{r}: best on its own test episodes is {best}" in " ".join(proc.stdout.split())


def test_demo_writes_the_run_files(demo_run) -> None:
    _, run_dir = demo_run
    agg = run_dir / "aggregator"
    for name in ("global_model.npz", "metrics.csv", "epsilon.csv", "rejected.jsonl"):
        assert (agg / name).exists(), name
    for r in REGIONS:
        assert (run_dir / "reports" / f"epsilon-{r}.json").exists()
        ledger = (run_dir / "regions" / r / "ledger.jsonl").read_text().splitlines()
        assert any('"kind": "release"' in line for line in ledger)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["epsilon_prv"] <= 8.0


def test_demo_refuses_a_fleet_the_planner_cannot_plan(tmp_path: Path) -> None:
    """Too few vehicles for any DP step: one clear line and exit 2, no traceback."""
    from typer.testing import CliRunner

    from fedfsd.cli import app
    from fedfsd.data.generate import generate_dataset

    data = tmp_path / "data"
    for r in REGIONS:  # a valid cache of a tiny fleet, so no time goes to generation
        out = data / f"{r}-v30-fleet-s7"
        generate_dataset(r, 30, None, 7, out, progress=False, fleet_scale=True)
    res = CliRunner().invoke(
        app,
        ["demo", "--vehicles", "30", "--out", str(tmp_path / "runs"), "--data-cache", str(data)],
    )
    assert res.exit_code == 2, res.output
    assert "not even one step fits" in res.output
    assert "Traceback" not in res.output
