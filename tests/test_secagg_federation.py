"""End-to-end: one secure-aggregation round over the real TLS federation (SuperLink, SuperNodes,
region executors), driven by the ServerApp and the regions' ClientApp (issue 15).

Three regions with tiny generated fleets and `trust_model = "distributed"`,
`min_honest_regions = 2`. Each region runs the real ClientApp through a test app module
(tests/apps/secagg_hooks_app.py) that installs the secure release's test hook: the region saves
the integer vector it masks (inside the region), so the test can check the global model against
prior − lr × Σ z_r / (s × R × vehicles per step). The aggregator's receipts, epsilon.csv rows and
`fedfsd privacy verify --receipts` are checked on the same runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from private_dirs import private_dir

from fedfsd.data.testing import generate_fleets
from fedfsd.deploy.federation import LocalFederation, RegionSpec

pytestmark = [pytest.mark.secagg, pytest.mark.slow]

REGIONS = ("eu", "jp", "us")
VPS = 4
DROP_RUN = "drop-us-after-masking"
RUN = {
    "num-server-rounds": 1,
    "local-steps": 1,
    "vehicles-per-step": VPS,
    "frames-per-vehicle": 4,
    "noise-multiplier": 1.0,
    "clip-norm": 1.0,
    "server-lr": 0.5,
    "min-regions": 3,
    "round-timeout": 120.0,
    "node-wait": 120.0,
    "evaluate-timeout": 60.0,
    "secure-aggregation": True,
}


def _policy(region: str) -> str:
    return (
        f'region = "{region}"\nepsilon_budget = 50.0\ndelta = 1e-3\nmin_noise_multiplier = 1.0\n'
        "max_clip_norm = 1.0\nupdate_norm_bound = 5.0\n"
        'trust_model = "distributed"\nmin_honest_regions = 2\n'
    )


@pytest.fixture(scope="module")
def root(request: pytest.FixtureRequest):
    with private_dir(request, "fedfsd-secagg-") as path:
        yield path


@pytest.fixture(scope="module")
def fed(root: Path):
    generate_fleets(root, REGIONS, vehicles=12, episodes=2, seeds=range(1, len(REGIONS) + 1))
    deploy = root / "deploy"
    app_dir = root / "app"  # the test ClientApp with the hook, and its settings
    app_dir.mkdir()
    shutil.copy2(Path(__file__).parent / "apps" / "secagg_hooks_app.py", app_dir)
    hooks = {"record_dir": str(root / "fed-in"), "exit_on_unmask": {"us": DROP_RUN}}
    (app_dir / "secagg_hooks.json").write_text(json.dumps(hooks))  # us dies in the 2nd test
    regions = {}
    for r in REGIONS:
        pol = root / f"{r}-policy.toml"
        pol.write_text(_policy(r))
        regions[r] = RegionSpec(
            root / "data" / r,
            pol,
            root / "ledgers" / r / "ledger.jsonl",
            clientapp="secagg_hooks_app:app",
            app_path=app_dir,
            node_config={"peer-keys": str(deploy / "region-keys.json")},  # written by the fed
        )
    with LocalFederation(deploy, regions, tls=True) as f:
        f.wait_connected(list(REGIONS), timeout=120)
        yield f


def _check_step(root: Path, run_dir: Path, cfg: dict, tr: dict) -> None:
    """The global model moved by exactly −lr × Σ z_r / (s × R × vehicles per step)."""
    from fedfsd.aggregator.server_app import initial_weights
    from fedfsd.aggregator.settings import RunSettings
    from fedfsd.secagg.round_spec import flatten

    fed_in = {r: np.load(root / "fed-in" / r / f"{r}-{tr['run_id']}-r1.npy") for r in REGIONS}
    prior = initial_weights(RunSettings.model_validate(cfg))
    final = dict(np.load(run_dir / "global_model.npz"))
    assert sorted(final) == sorted(prior)
    total = sum(z.astype(np.float64) for z in fed_in.values())
    expected = flatten(prior) - 0.5 * total / (tr["scale"] * len(REGIONS) * VPS)
    got = flatten(final)
    assert not np.allclose(got, flatten(prior))  # the model changed
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)  # float32 storage


def _check_receipts(fed: LocalFederation, root: Path, run_dir: Path, tr: dict) -> None:
    """A receipt and an epsilon.csv row per summed region, from its signed bound check, and
    each region's report verifies against its ledger and these receipts."""
    from typer.testing import CliRunner

    from fedfsd.aggregator import checkpoint as ck
    from fedfsd.aggregator.receipts import read_receipts
    from fedfsd.cli import app
    from fedfsd.privacy.report import build_report, to_json

    receipts = read_receipts(run_dir)
    assert sorted(r["region"] for r in receipts) == tr["summed"] == tr["receipts"]
    rows = ck.read_csv(run_dir / ck.EPSILON_CSV)
    assert sorted(r["region"] for r in rows) == tr["summed"]
    for rec in receipts:
        m = rec["manifest"]
        assert rec["key_source"] == "registered" and m["trust_model"] == "distributed"
        assert m["update_norm"] <= m["update_norm_bound"] and m["masked_sha256"]
        row = next(x for x in rows if x["region"] == rec["region"])
        assert row["trust_model"] == "distributed"
        assert float(row["epsilon_own_noise"]) == m["epsilon_own_noise"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(summary["regions"]) == tr["summed"]
    for r in tr["summed"]:
        ledger = fed.regions[r].ledger_path
        report = run_dir / f"epsilon-{r}.json"
        report.write_text(to_json(build_report(ledger, run_id=tr["run_id"])))
        args = ["privacy", "verify", str(report), "--ledger", str(ledger)]
        res = CliRunner().invoke(app, [*args, "--receipts", str(run_dir)])
        assert res.exit_code == 0, res.output


def _transcript(run_dir: Path) -> dict:
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rounds] == ["ok"], rounds
    lines = (run_dir / "secagg_transcript.jsonl").read_text().splitlines()
    tr = json.loads(lines[-1])
    assert tr["applied"] and tr["status"] == "completed", tr
    assert tr["sum_norm"] <= tr["sum_norm_bound"]
    return tr


# Slow (about 3 min on 2 cores): three fleets generated, a TLS federation started, and a run.
def test_one_secure_round_over_tls(fed: LocalFederation, root: Path) -> None:
    from typer.testing import CliRunner

    from fedfsd.cli import app
    from fedfsd.privacy.ledger import Ledger

    run_dir = root / "agg"
    cfg = {**RUN, "run-dir": str(run_dir)}
    fed.run(cfg, timeout=400)
    tr = _transcript(run_dir)
    for key in ("advertised", "masked_input", "unmask_responders", "summed"):
        assert tr[key] == list(REGIONS), (key, tr)
    _check_step(root, run_dir, cfg, tr)
    _check_receipts(fed, root, run_dir, tr)

    for r in REGIONS:
        ledger = fed.regions[r].ledger_path
        rec = Ledger(ledger).releases()[-1]
        assert rec["trust_model"] == "distributed" and rec["run_id"] == tr["run_id"]
        assert 0 < rec["epsilon_distributed"] < rec["epsilon_own_noise"] < 50
        res = CliRunner().invoke(app, ["privacy", "verify", "--ledger", str(ledger)])
        assert res.exit_code == 0, res.output
        # the round's secrets were deleted after unmasking
        assert not list(Path(ledger).parent.glob(".*.secagg-*.state"))


def test_region_killed_after_masking_is_recovered(fed: LocalFederation, root: Path) -> None:
    run_dir = root / "agg-drop"
    # round-timeout bounds the wait for the dead region's unmask reply, evaluate-timeout the
    # wait for its (never coming) evaluation reply. Slow: about 2 min, mostly those waits.
    cfg = {
        **RUN,
        "run-dir": str(run_dir),
        "run-id": DROP_RUN,
        "round-timeout": 60.0,
        "evaluate-timeout": 5.0,
    }
    fed.run(cfg, timeout=400)
    tr = _transcript(run_dir)
    assert tr["masked_input"] == tr["summed"] == list(REGIONS), tr
    assert tr["unmask_responders"] == ["eu", "jp"], tr
    assert tr["recovered_after_masking"] == ["us"], tr
    _check_step(root, run_dir, cfg, tr)  # us's vector is in the sum, its masks removed
    _check_receipts(fed, root, run_dir, tr)  # us sent a valid signed check before it died
