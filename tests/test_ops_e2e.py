"""Operating a federation through the real `fedfsd aggregator run/status` CLI (issue 14).

A real SuperLink (with fedfsd's ServerApp allow-list), two SuperNodes + executors (TLS, node
auth) on loopback, tiny generated fleets. In file order: status with no aggregator; a run whose
plan no region can afford (refused up front, nothing spent, non-zero exit with the reason); a
run that succeeds (summary table and JSON, both run ids); status by region name; a foreign
ServerApp refused by the aggregator and logged; SuperNode keys refused (never registered, and
unregistered) logged by the aggregator and shown in its status; a run with a dead region (no
train message below quorum, non-zero exit). One federation is shared by the module (start-up
takes tens of seconds).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from private_dirs import private_dir

from fedfsd.audit import read_events
from fedfsd.data.testing import generate_fleets
from fedfsd.deploy.appbundle import app_digest
from fedfsd.deploy.control import CONNECTION_NAME
from fedfsd.deploy.federation import LocalFederation, RegionSpec
from fedfsd.deploy.processes import flower_env, free_ports
from fedfsd.flower.node_refusals import fingerprint_of_file

pytestmark = pytest.mark.slow

APPS = Path(__file__).parent / "apps"

REGIONS = ("eu", "us")
BUDGET = 5.0
# Tiny DP rounds: the point is the plumbing, not the model.
TINY = ["--local-steps", "2", "--vehicles-per-step", "4", "--frames-per-vehicle", "4",
        "--noise-multiplier", "1.0", "--round-timeout", "300",
        "--evaluate-every", "100"]  # fmt: skip


def _policy(region: str, digest: str) -> str:
    return (
        f'region = "{region}"\nepsilon_budget = {BUDGET}\ndelta = 1e-3\n'
        "min_noise_multiplier = 0.8\nmax_clip_norm = 1.0\nupdate_norm_bound = 5.0\n"
        f'max_vehicles_per_step = 8\nallowed_app_digests = ["{digest}"]\n'
    )


def _fedfsd(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedfsd.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **flower_env(), "COLUMNS": "200"},
    )


@pytest.fixture(scope="module")
def root(request: pytest.FixtureRequest):
    with private_dir(request, "fedfsd-ops-") as path:
        yield path


@pytest.fixture(scope="module")
def fed(root: Path):
    digest = app_digest()
    generate_fleets(root, REGIONS, vehicles=16, episodes=3)
    regions = {}
    for region in REGIONS:
        pol = root / f"{region}-policy.toml"
        pol.write_text(_policy(region, digest))
        regions[region] = RegionSpec(root / "data" / region, pol, root / f"{region}-ledger.jsonl")
    # The aggregator runs only fedfsd's packaged ServerApp (as `fedfsd aggregator start` does).
    with LocalFederation(root / "agg", regions, tls=True, serverapp_digests=[digest]) as fed:
        fed.wait_connected(list(REGIONS), timeout=180)
        yield fed


def _releases(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["run_id"], r["round"]) for r in recs if r.get("kind") == "release"]


def _train_tasks(fed: LocalFederation, region: str, flower_run_id: int) -> list[dict]:
    path = fed.region_dir(region) / "decisions.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        r for r in recs if r.get("run_id") == flower_run_id and r.get("message_type") == "train"
    ]


def _run(fed: LocalFederation, run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _fedfsd(
        "aggregator", "run", "--dir", str(fed.run_dir), "--run-dir", str(run_dir),
        "--node-wait", "30", *TINY, *args,
    )  # fmt: skip


def test_status_without_an_aggregator(tmp_path: Path) -> None:
    res = _fedfsd("aggregator", "status", "--dir", str(tmp_path / "nothing"))
    assert res.returncode == 1
    assert "no aggregator in" in res.stderr and "fedfsd aggregator start" in res.stderr
    assert "Traceback" not in res.stderr


def test_data_stats_warns_about_a_high_crash_rate(fed: LocalFederation, root: Path) -> None:
    calm = _fedfsd("data", "stats", str(root / "data" / "eu"))
    assert calm.returncode == 0 and "crash rate" in calm.stdout
    rate = json.loads((root / "data" / "eu" / "manifest.json").read_text())["counts"]
    assert ("warning:" in calm.stderr) == (rate["crash_rate"] > 0.10)
    crashy = root / "crashy"
    shutil.copytree(root / "data" / "eu", crashy)
    manifest = json.loads((crashy / "manifest.json").read_text())
    manifest["counts"]["crash_rate"] = 0.17  # as in the walkthrough that found no warning
    (crashy / "manifest.json").write_text(json.dumps(manifest))
    res = _fedfsd("data", "stats", str(crashy))
    assert res.returncode == 0, res.stderr
    assert "warning:" in res.stderr and "crash rate 17.0% is above 10%" in res.stderr


def test_unaffordable_plan_is_refused_up_front_and_spends_nothing(
    fed: LocalFederation, root: Path
) -> None:
    run_dir = root / "runs" / "too-long"
    res = _run(fed, run_dir, "--rounds", "60", "--min-regions", "2")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] is False and summary["rounds_ok"] == 0
    assert summary["rounds_run"] == 1  # the run ended once no quorum could ever be met
    assert set(summary["run_refused"]) == set(REGIONS)
    for region in REGIONS:
        reason = summary["run_refused"][region]
        assert reason.startswith("run refused: 60 round(s)")
        assert "at most" in reason and "σ ≥" in reason and "nothing spent" in reason
        assert _releases(fed.regions[region].ledger_path) == []  # nothing spent
    assert "refused the run: run refused: 60 round(s)" in out
    assert "0 of 60 round(s) successful" in out
    ids = json.loads((run_dir / "run.json").read_text())
    assert ids["fedfsd_run_id"] == summary["fedfsd_run_id"]
    assert ids["flower_run_id"] == summary["flower_run_id"]


def test_successful_run_prints_a_summary_and_both_run_ids(fed: LocalFederation, root: Path) -> None:
    run_dir = root / "runs" / "ok"
    res = _run(fed, run_dir, "--rounds", "1", "--min-regions", "2")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] is True and summary["rounds_ok"] == 1
    assert summary["rounds"][0]["accepted"] == list(REGIONS)
    fid, flid = summary["fedfsd_run_id"], summary["flower_run_id"]
    assert f"started run {flid} (fedfsd run id {fid}" in out
    for region in REGIONS:
        assert _releases(fed.regions[region].ledger_path) == [(fid, 1)]
        e = summary["regions"][region]
        assert 0 < e["epsilon"] < BUDGET
        assert e["epsilon_left"] == pytest.approx(BUDGET - e["epsilon"])
        assert region in out


def test_status_names_regions_and_the_last_run(fed: LocalFederation, root: Path) -> None:
    res = _fedfsd("aggregator", "status", "--dir", str(fed.run_dir), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    names = {r["region"]: r for r in doc["regions"]}
    assert set(REGIONS) <= set(names) and all(names[r]["connected"] for r in REGIONS)
    run = doc["run"]
    runs_log = (fed.run_dir / "runs.jsonl").read_text()
    assert run["run_dir"] == str(root / "runs" / "ok"), runs_log
    assert run["round"] == 1
    assert run["status"] == "finished:completed" and run["rounds_ok"] == 1
    assert set(run["regions"]) == set(REGIONS)
    assert all(run["regions"][r]["last_accepted_round"] == 1 for r in REGIONS)
    text = _fedfsd("aggregator", "status", "--dir", str(fed.run_dir))
    assert text.returncode == 0 and "eu" in text.stdout and "fedfsd run id" in text.stdout


def test_foreign_serverapp_is_refused_on_the_aggregator_and_logged(
    fed: LocalFederation, root: Path
) -> None:
    marker, result = root / "pwned.txt", root / "result.json"
    foreign = APPS / "foreign_app"
    run_id = fed.start_run(
        {"marker-path": str(marker), "result-path": str(result), "min-regions": 2}, foreign
    )
    assert fed.wait_run(run_id, timeout=180) == "finished:failed"
    assert not result.exists() and not marker.exists()  # its ServerApp never ran
    (event,) = [e for e in read_events(fed.security_log) if e["event"] == "serverapp_refused"]
    assert event["flower_run_id"] == run_id and event["fab_digest"] == app_digest(foreign)
    assert "allowed ServerApp digests" in event["reason"]


def test_refused_keys_are_logged_by_the_aggregator_and_shown_in_status(
    fed: LocalFederation, root: Path
) -> None:
    agg, keys = fed.run_dir, root / "keys"
    for name in ("ghost", "mallory"):
        assert _fedfsd("deploy", "keygen", name, "--out", str(keys)).returncode == 0
    # ghost: registered, then unregistered the way docs/deploy-local.md says (no docker)
    reg = _fedfsd("aggregator", "register", str(keys / "ghost.pub"), "--dir", str(agg))
    assert reg.returncode == 0, reg.stdout + reg.stderr
    node_id = re.search(r"SuperNode id (\d+)", reg.stdout).group(1)  # type: ignore[union-attr]
    unreg = fed.flwr("supernode", "unregister", node_id, CONNECTION_NAME)
    assert unreg.returncode == 0, unreg.stdout + unreg.stderr
    assert fed.server is not None
    for name, port in zip(("ghost", "mallory"), free_ports(2, "127.0.0.1"), strict=True):
        res = _fedfsd(
            "region", "start", "--superlink", f"127.0.0.1:{fed.fleet_port}",
            "--ca", str(fed.server.ca_cert), "--key", str(keys / name),
            "--policy", str(root / "eu-policy.toml"), "--data", str(root / "data" / "eu"),
            "--ledger", str(root / name / "ledger.jsonl"), "--runtime-port", str(port),
            timeout=240,
        )  # fmt: skip
        assert res.returncode != 0 and "connected to" not in res.stdout, res.stdout + res.stderr
    ghost, mallory = (fingerprint_of_file(keys / f"{n}.pub") for n in ("ghost", "mallory"))
    events = {e["fingerprint"]: e for e in read_events(agg / "security.jsonl")
              if e["event"] == "node_refused"}  # fmt: skip
    assert set(events) == {ghost, mallory}  # the registered regions never were refused
    assert events[ghost]["region"] == "ghost" and "region" not in events[mallory]
    assert events[mallory]["side"] == "aggregator" and events[mallory]["time"]
    doc = json.loads(_fedfsd("aggregator", "status", "--dir", str(agg), "--json").stdout)
    rows = {r["fingerprint"]: r for r in doc["refused_nodes"]}
    assert set(rows) == {ghost, mallory} and rows[ghost]["region"] == "ghost"
    assert all(r["attempts"] >= 1 for r in rows.values())
    text = _fedfsd("aggregator", "status", "--dir", str(agg))
    assert text.returncode == 0 and "refused SuperNode keys" in text.stdout
    assert mallory in text.stdout and ghost in text.stdout


def test_dead_region_gets_no_round_below_quorum(fed: LocalFederation, root: Path) -> None:
    before = _releases(fed.regions["eu"].ledger_path)
    fed.kill_region("us")  # the SuperLink still lists it as connected for about a minute
    run_dir = root / "runs" / "dead"
    res = _run(fed, run_dir, "--rounds", "1", "--min-regions", "2")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    summary = json.loads((run_dir / "summary.json").read_text())
    (only,) = summary["rounds"]
    assert only["status"] == "failed" and "not sent" in only["note"]
    assert _releases(fed.regions["eu"].ledger_path) == before  # the survivor spent nothing
    assert _train_tasks(fed, "eu", summary["flower_run_id"]) == []  # and got no train message
    assert "not sent" in out and "node-" not in only["note"]
