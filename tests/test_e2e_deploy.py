"""End-to-end: real SuperLink + SuperNodes + region executors on loopback, gRPC with TLS and
SuperNode authentication, the real fedfsd apps on tiny generated fleets.

One federation is shared by the module (start-up costs tens of seconds on 2 cores); the tests
run in file order and each leaves it usable for the next.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from private_dirs import private_dir

from fedfsd.data.testing import generate_fleets
from fedfsd.deploy.appbundle import app_digest
from fedfsd.deploy.federation import LocalFederation, RegionSpec
from fedfsd.deploy.processes import wait_until
from fedfsd.region.executor import FAB_REFUSED_ERROR_CODE

pytestmark = pytest.mark.slow

APPS = Path(__file__).parent / "apps"
REGIONS = ("eu", "us")
# Tiny DP rounds: the point is the plumbing, not the model.
RUN = {
    "local-steps": 2,
    "vehicles-per-step": 4,
    "frames-per-vehicle": 4,
    "round-timeout": 90.0,
    # The aggregator pings the regions before each round and waits at most this long for a
    # quorum to answer (it moves on as soon as one does). The resume test's failures under load
    # were not slow reconnection: an executor kept retrying for ≈ 4 minutes to pull a message
    # whose objects died with the killed SuperLink; such a pull now gives up after
    # bounded_pull.OBJECT_WAIT_S.
    "node-wait": 180.0,
    "evaluate-timeout": 90.0,
}


def _policy(region: str, digests: list[str]) -> str:
    return (
        f'region = "{region}"\nepsilon_budget = 50.0\ndelta = 1e-3\nmin_noise_multiplier = 0.8\n'
        "max_clip_norm = 1.0\nupdate_norm_bound = 5.0\nmax_vehicles_per_step = 8\n"
        'allowed_metrics = ["loss", "ade"]\n'
        f"allowed_app_digests = {json.dumps(digests)}\n"
    )


@pytest.fixture(scope="module")
def root(request: pytest.FixtureRequest):
    with private_dir(request, "fedfsd-e2e-") as path:
        yield path


@pytest.fixture
def tmp_path(root: Path, request: pytest.FixtureRequest) -> Path:
    """Per-test directory inside the module's private root (shadows pytest's tmp_path)."""
    path = root / "tests" / request.node.name
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def fed(root: Path):
    digest = app_digest()  # the packaged, code-free fedfsd bundle is the only one allowed
    regions: dict[str, RegionSpec] = {}
    generate_fleets(root, REGIONS, vehicles=16, episodes=3)  # tiny simulator fleets
    for region in REGIONS:
        data = root / "data" / region
        pol = root / f"{region}-policy.toml"
        pol.write_text(_policy(region, [digest]))
        regions[region] = RegionSpec(data, pol, root / f"{region}-ledger.jsonl")
    # A region whose key the aggregator never registered.
    regions["rogue"] = RegionSpec(
        root / "data" / "eu", regions["eu"].policy_path, root / "rogue-ledger.jsonl"
    )
    with LocalFederation(root / "deploy", regions, tls=True, unregistered={"rogue"}) as fed:
        fed.wait_connected(list(REGIONS), timeout=120)
        yield fed


def _ledger_rounds(path: Path) -> list[tuple[str, int]]:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["run_id"], r["round"]) for r in recs if r.get("kind") == "release"]


def _rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tls_and_node_auth_are_on(fed: LocalFederation) -> None:
    argv = fed.superlink_argv()
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert set(fed.node_ids) == set(REGIONS)  # rogue was never registered
    for region in REGIONS:
        assert "--root-certificates" in fed.supernode_argv(region)


def test_unregistered_region_is_refused(fed: LocalFederation) -> None:
    log = fed.wait_refused("rogue", timeout=120)
    assert "Failed to activate SuperNode" in log or "Exit Code: 305" in log
    assert not fed.supernode_connected("rogue")


def test_foreign_bundle_is_refused_and_its_code_never_runs(
    fed: LocalFederation, tmp_path: Path
) -> None:
    marker, result = tmp_path / "pwned.txt", tmp_path / "result.json"
    fed.run(
        {"marker-path": str(marker), "result-path": str(result), "min-regions": 2},
        timeout=240,
        app_dir=APPS / "foreign_app",
    )
    out = json.loads(result.read_text())
    assert out["nodes"] == 2 and len(out["replies"]) == 2
    for reply in out["replies"]:
        assert reply["error"].startswith(f"{FAB_REFUSED_ERROR_CODE}:")
        assert "allowed_app_digests" in reply["error"]
    assert not marker.exists()
    for region in REGIONS:
        decisions = (fed.region_dir(region) / "decisions.jsonl").read_text().splitlines()
        assert json.loads(decisions[-1])["decision"] == "refused"


def test_two_rounds_over_tls_then_resume_after_aggregator_crash(
    fed: LocalFederation, tmp_path: Path
) -> None:
    from fedfsd.aggregator.server_app import initial_weights
    from fedfsd.aggregator.settings import RunSettings

    run_dir = tmp_path / "agg"
    cfg = {**RUN, "num-server-rounds": 2, "run-dir": str(run_dir)}
    fed.start_run(cfg)
    wait_until(lambda: len(_rounds(run_dir)) >= 1, 300, "round 1 checkpoint")
    fed.kill_superlink()  # the aggregator crashes after round 1
    fed.restart_superlink()
    fed.run({**cfg, "resume": True}, timeout=420)

    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(sorted(r["accepted"]) == list(REGIONS) for r in rounds)
    final = np.load(run_dir / "global_model.npz")
    init = list(initial_weights(RunSettings.model_validate(cfg)).values())
    got = [final[k] for k in final.files]  # state_dict order (names may be prefixed)
    assert [a.shape for a in got] == [a.shape for a in init]
    assert any(not np.allclose(a, b) for a, b in zip(got, init, strict=True))  # model changed
    for region in REGIONS:
        ledger = fed.regions[region].ledger_path
        released = _ledger_rounds(Path(ledger))
        run_ids = {run for run, _ in released}
        assert len(run_ids) == 1  # the resumed run kept its fedfsd run id
        assert sorted(rnd for _, rnd in released) == [1, 2]  # each round spent once
        last = json.loads(Path(ledger).read_text().splitlines()[-1])
        assert last["epsilon_prv"] > 0 and last["private"] is True

    # The reviewer's path on this real TLS federation: reports from the region ledgers verify
    # independently (Opacus + dp-accounting), and the global summary too.
    from fedfsd.privacy.report import load_json, write_reports
    from fedfsd.privacy.report_checks import verify_files

    written = write_reports(
        [fed.regions[r].ledger_path for r in REGIONS], tmp_path / "reports", formats=("json",)
    )
    results = verify_files(written)
    assert len(results) == len(REGIONS) + 1
    assert all(v.ok for v in results), [v.problems for v in results]

    # ... and each region's report against its ledger and the aggregator's signed receipts.
    from fedfsd.aggregator.receipts import read_receipts
    from fedfsd.privacy.verify_ledger import verify_with_ledger

    receipts = read_receipts(run_dir)
    assert sorted((r["round"], r["region"]) for r in receipts) == sorted(
        (i, r) for i in (1, 2) for r in REGIONS
    )
    assert {r["key_source"] for r in receipts} == {"registered"}
    for region in REGIONS:
        rep = load_json(tmp_path / "reports" / f"epsilon-{region}.json")
        v = verify_with_ledger(rep, fed.regions[region].ledger_path, run_dir)
        assert v.ok, v.problems


def test_killed_region_does_not_stall_the_run(fed: LocalFederation, tmp_path: Path) -> None:
    run_dir = tmp_path / "agg"
    fed.kill_region("us")
    cfg = {
        **RUN,
        "num-server-rounds": 1,
        "min-regions": 1,
        # Bounds the wait for the dead region's reply; generous so that the live region's DP
        # round fits even on a heavily loaded 2-core machine.
        "round-timeout": 90.0,
        # The live region must answer the liveness ping in this time (the dead one costs the
        # round timeout); the first message of a run is the slowest.
        "node-wait": 60.0,
        "evaluate-timeout": 10.0,
        "run-dir": str(run_dir),
    }
    fed.run(cfg, timeout=240)  # raises if the run does not finish
    (only,) = _rounds(run_dir)
    assert only["accepted"] == ["eu"]  # the round went on with the live region (last test)
