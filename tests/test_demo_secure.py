"""`fedfsd demo --secure-aggregation` end to end on a tiny fleet, through the real CLI.

The same demo as tests/test_demo_e2e.py (TLS federation, one SuperNode per region, baselines,
scoring, reports verified), but every region's policy is `trust_model = "distributed"` and the
one round is a secure DP-FedSGD step: three regions mask, the aggregator unmasks only the sum.
100 vehicles per region (m = 32 per step), one round, 20 non-private steps: the smallest run that
still masks and unmasks three regions' noisy sums.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from demo_runs import run_demo

pytestmark = [pytest.mark.slow, pytest.mark.secagg]

REGIONS = ("cn", "eu", "us")


@pytest.fixture(scope="module")
def secure_demo(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess, Path]:
    return run_demo(
        tmp_path_factory.mktemp("demo-secure"),
        "--secure-aggregation",
        "--vehicles",
        "100",
        "--rounds",
        "1",
        "--local-steps",
        "20",
    )


# Slow (the module: 361 s on the shared 2-core machine at load 12-16): three fleets generated, a
# TLS federation started, one secure round, baselines, scoring and reports.
def test_secure_demo_records_both_epsilons_and_the_trust_model(secure_demo) -> None:
    from fedfsd.aggregator.secure_round import default_threshold

    proc, run_dir = secure_demo
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trust_model"] == "distributed"
    assert summary["min_honest_regions"] == default_threshold(len(REGIONS)) == 2
    assert summary["secagg_threshold"] == 2
    assert summary["reports_verified_with_ledgers_and_receipts"] is True
    for r in REGIONS:
        e_d = summary["epsilon_distributed_per_region"][r]
        e_o = summary["epsilon_own_noise_per_region"][r]
        assert math.isfinite(e_d) and math.isfinite(e_o), (r, e_d, e_o)
        assert 0 < e_d <= e_o, (r, e_d, e_o)
        assert 0 < summary["epsilon_per_region"][r] <= summary["epsilon_budget"]
        policy = (run_dir / "regions" / r / "policy.toml").read_text()
        assert 'trust_model = "distributed"' in policy and "min_honest_regions = 2" in policy
    assert summary["plan"]["trust_model"] == "distributed"
    assert summary["plan"]["steps_per_round"] == 1
    text = " ".join(proc.stdout.split())
    assert "trust model distributed" in text
    assert "ε distributed" in text and "ε own noise alone" in text


def test_secure_demo_ledgers_verify_and_transcript_names_all_regions(secure_demo) -> None:
    from typer.testing import CliRunner

    from fedfsd.cli import app
    from fedfsd.privacy.ledger import Ledger

    proc, run_dir = secure_demo
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for r in REGIONS:
        ledger = run_dir / "regions" / r / "ledger.jsonl"
        rel = Ledger(ledger).releases()
        assert rel and rel[-1]["trust_model"] == "distributed"
        res = CliRunner().invoke(app, ["privacy", "verify", "--ledger", str(ledger)])
        assert res.exit_code == 0, res.output
    lines = (run_dir / "aggregator" / "secagg_transcript.jsonl").read_text().splitlines()
    tr = json.loads(lines[-1])
    assert tr["applied"] and tr["status"] == "completed", tr
    for key in ("advertised", "masked_input", "unmask_responders", "summed"):
        assert tr[key] == list(REGIONS), (key, tr)


def test_secure_demo_moved_the_global_model(secure_demo) -> None:
    from fedfsd.aggregator.server_app import initial_weights
    from fedfsd.aggregator.settings import RunSettings

    proc, run_dir = secure_demo
    assert proc.returncode == 0
    cfg = json.loads((run_dir / "demo-config.json").read_text())
    prior = initial_weights(RunSettings.model_validate({"model": cfg["model"]}))
    final = dict(np.load(run_dir / "aggregator" / "global_model.npz"))
    assert sorted(final) == sorted(prior)
    assert any(not np.allclose(final[k], prior[k]) for k in prior)
    pooled = json.loads((run_dir / "summary.json").read_text())["pooled_test"]
    assert pooled["federated"]["fde"] != pooled["constant-velocity prior"]["fde"]


def test_secure_only_flags_need_secure_aggregation(tmp_path: Path) -> None:
    """--min-honest without --secure-aggregation: one clear line and exit 2, nothing written."""
    from typer.testing import CliRunner

    from fedfsd.cli import app

    out = tmp_path / "runs"
    res = CliRunner().invoke(app, ["demo", "--min-honest", "2", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "only apply with --secure-aggregation" in res.output
    res = CliRunner().invoke(
        app, ["demo", "--secure-aggregation", "--min-honest", "4", "--out", str(out)]
    )
    assert res.exit_code == 2, res.output
    assert "must be in 2..3" in res.output
    assert not out.exists()
