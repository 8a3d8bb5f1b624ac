"""Every experiment script runs end to end at a tiny size, so none of them can rot.

Each script runs as a subprocess exactly as the README calls it; a test checks what the script
wrote (JSON table + PNG) and that the numbers obey what the script claims (ε spent within the
target, bytes at least the update size, every round accepted). Scripts that start real Flower
processes (a TLS federation, a Ray simulation) are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from fedfsd.deploy.processes import descendants, terminate

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments"


def run_script(args: Sequence[str], timeout: float, cwd: Path = ROOT) -> tuple[int, str]:
    """Run an experiment script; whatever happens, stop it and every process below it."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "160"}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the scripts stop their own children on SIGTERM
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        terminate(descendants(proc.pid) | ({proc.pid} if proc.poll() is None else set()), 0.5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert path.stat().st_size > 5_000


def test_privacy_utility_tiny(tmp_path: Path) -> None:
    rc, out = run_script([str(EXP / "privacy_utility.py"), "--tiny", "--out", str(tmp_path)], 900)
    assert rc == 0, out[-3000:]
    doc = json.loads((tmp_path / "privacy_utility.json").read_text())
    _png(tmp_path / "privacy_utility.png")
    conds = set(doc["summary"])
    assert {"centralised (pooled, no DP)", "federated (no DP)", "federated (ε=8)"} <= conds
    assert {"local cn (no DP)", "local cn (ε=8)", "local us (ε=8)"} <= conds
    for per_test in doc["summary"].values():
        assert set(per_test) == {"cn", "eu", "us", "jp", "pooled"}
        for m in ("ade", "fde", "accel_mae"):
            mean, std = per_test["pooled"][m]
            assert mean > 0 and std >= 0
    # Two seeds give two different private models: the spread is real, not a copy.
    assert doc["summary"]["federated (ε=8)"]["pooled"]["fde"][1] > 0
    # ε read back from every region's ledger: spent, and never above the target.
    for info in doc["privacy"]["federated (ε=8)"]:
        assert not info["rejected"]
        for r in ("cn", "eu", "us"):
            assert 0.9 * 8 <= info["regions"][r]["epsilon_spent"] <= 8.0
            assert info["regions"][r]["sigma"] > 0
    targets = doc["targets"]
    assert isinstance(targets["within_1.25x_of_centralised"]["met"], bool)
    ratio = targets["within_1.25x_of_centralised"]["ratio"]
    fed = doc["summary"]["federated (ε=8)"]["pooled"]["fde"][0]
    cen = doc["summary"]["centralised (pooled, no DP)"]["pooled"]["fde"][0]
    assert ratio == pytest.approx(fed / cen)
    assert targets["within_1.25x_of_centralised"]["met"] == (ratio <= 1.25)
    verdict = "MET" if targets["within_1.25x_of_centralised"]["met"] else "MISSED"
    line = next(x for x in out.splitlines() if x.startswith("target 1"))
    assert line.rstrip().endswith(f"→ {verdict}"), line
    # Training helps even at this size: for every seed, the federated models (with and without
    # DP) and the centralised one predict better than the untrained model they all start from.
    prior = _untrained_pooled_fde(doc)
    for name in ("federated (ε=8)", "federated (no DP)", "centralised (pooled, no DP)"):
        fdes = [s["pooled"]["fde"] for s in doc["raw"][name]]
        assert len(fdes) == 2 and all(f < prior for f in fdes), (name, fdes, prior)


def _untrained_pooled_fde(doc: dict) -> float:
    """Pooled FDE of the round-0 model the study starts from (the constant-velocity prior with
    an untrained residual), recomputed with the script's own data, model and scoring code."""
    sys.path.insert(0, str(EXP))
    try:
        import privacy_utility as pu
    finally:
        sys.path.remove(str(EXP))
    st = pu.Study(**doc["study"])
    assert st.synthetic  # generated in memory: load_data reads no dataset from the cache path
    trains, tests = pu.load_data(st, Path("unused"))
    pooled = pu.pool_frames([trains[r] for r in st.regions])
    fdes = {pu.score(st, pu.initial(st, pooled, s), tests)["pooled"]["fde"] for s in st.seeds}
    assert len(fdes) == 1, fdes  # the residual head starts at zero: every seed's prior is one
    return fdes.pop()


def test_dp_schedule_sweep_tiny(tmp_path: Path) -> None:
    rc, out = run_script([str(EXP / "dp_schedule_sweep.py"), "--tiny", "--out", str(tmp_path)], 600)
    assert rc == 0, out[-3000:]
    doc = json.loads((tmp_path / "dp_schedule_sweep.json").read_text())
    _png(tmp_path / "dp_schedule_sweep.png")
    assert [r["steps"] for r in doc["rows"]] == [2, 3]
    # σ is calibrated per schedule: 4 steps need more noise than 3 at the same q and ε.
    first, second = doc["rows"]
    assert all(first["sigma"][r] > second["sigma"][r] > 0 for r in ("cn", "eu", "us"))
    for row in doc["rows"]:
        for r in ("cn", "eu", "us"):
            assert row[f"fed_{r}"][0] > 0 and row[f"local_{r}"][0] > 0
            assert row["fed_beats_local_on_own_region"][r] == (
                row[f"fed_{r}"][0] < row[f"local_{r}"][0]
            )
    assert set(doc["references"]) == {"untrained (prior only)", "centralised (no DP, 6 steps)"}


def test_bad_options_fail_with_one_red_line(tmp_path: Path) -> None:
    for script, args in (
        ("privacy_utility.py", ["--seeds", "0"]),
        ("privacy_utility.py", ["--epsilons", "a,b"]),
        ("scale.py", ["--regions", "four"]),
        ("federation_cost.py", ["--rounds", "0"]),
        ("dp_schedule_sweep.py", ["--schedules", "10x3@0.2"]),
        ("federation_cost.py", ["--evaluate-every", "0"]),
        ("fleet_scale.py", ["--max-total-steps", "0"]),
        ("fleet_scale.py", ["--max-seeds-large", "0"]),
        ("fleet_scale.py", ["--finetune-max-steps", "0"]),
    ):
        rc, out = run_script([str(EXP / script), *args, "--out", str(tmp_path)], 120)
        assert rc == 2, out
        assert "error:" in out and "Traceback" not in out


def test_bench_generate_tiny() -> None:
    args = ["--regions", "eu", "--vehicles", "4", "--episodes", "1", "--workers", "1"]
    rc, out = run_script([str(EXP / "bench_generate.py"), *args], 600)
    assert rc == 0, out[-3000:]
    assert "frames/s" in out


def test_cross_region_tiny(tmp_path: Path) -> None:
    args = ["--regions", "eu", "us", "--vehicles", "6", "--episodes", "3", "--steps", "20"]
    rc, out = run_script([str(EXP / "cross_region.py"), *args, "--data", str(tmp_path)], 600)
    assert rc == 0, out[-3000:]


@pytest.mark.slow
def test_bench_dp_step_quick(tmp_path: Path) -> None:
    args = ["--quick", "--batches", "16", "--out", str(tmp_path / "out")]  # a smoke run
    rc, out = run_script([str(EXP / "bench_dp_step.py"), *args], 900)
    assert rc == 0, out[-3000:]
    rows = json.loads((tmp_path / "out" / "dp_step.json").read_text())
    assert {r["mode"] for r in rows} == {"dp", "non-private"}
    assert (tmp_path / "out" / "dp_step.png").stat().st_size > 0


@pytest.mark.slow
def test_federation_cost_tiny(tmp_path: Path) -> None:
    args = ["--tiny", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data")]
    args += ["--reps", "2"]
    rc, out = run_script([str(EXP / "federation_cost.py"), *args], 900)
    assert rc == 0, out[-3000:]
    doc = json.loads((tmp_path / "out" / "federation_cost.json").read_text())
    _png(tmp_path / "out" / "federation_cost.png")
    assert [r["status"] for r in doc["rounds"]] == ["ok", "ok"]
    raw = doc["raw_update_bytes"]
    assert raw == 4 * doc["n_params"]
    assert doc["serialisation"]["train_reply_bytes"] >= raw
    # packed wire layout: one array + layout, so a reply is 7 Flower objects (17 per-tensor)
    assert doc["serialisation"]["train_reply_objects"] == 7
    assert doc["serialisation"]["train_ins_objects"] == 6
    for r in ("eu", "us"):
        b = doc["bytes"][r]
        # Each round the region uploaded its update and downloaded the model twice (train +
        # evaluate), all through TLS: the relay saw at least those bytes.
        assert b["up_bytes_per_round"] >= raw
        assert b["down_bytes_per_round"] >= 2 * raw
        assert b["tcp_connections"] >= 1
        assert 0 < b["up_without_idle_polls_per_round"] <= b["up_bytes_per_round"]
    for row in doc["rounds"]:
        assert row["round_s"] > 0 and row["train_task_s"] > 0
        # DP training time comes from the regions' own ledgers and sits inside the train task.
        assert 0 < row["local_training_s"] < row["train_task_s"] < row["round_s"]
        assert 0 < row["not_training_share"] < 1


@pytest.mark.slow
def test_scale_tiny(tmp_path: Path) -> None:
    rc, out = run_script([str(EXP / "scale.py"), "--tiny", "--out", str(tmp_path)], 900)
    assert rc == 0, out[-3000:]
    doc = json.loads((tmp_path / "scale.json").read_text())
    _png(tmp_path / "scale.png")
    (row,) = doc["sizes"]
    assert row["regions"] == 2
    assert row["accepted_per_round"] == [2, 2]
    assert row["rounds_per_minute"] > 0
    assert row["peak_rss_mib"] > 100  # a Python + torch process tree, at least


def test_fleet_scale_tiny(tmp_path: Path) -> None:
    rc, out = run_script([str(EXP / "fleet_scale.py"), "--tiny", "--out", str(tmp_path)], 900)
    assert rc == 0, out[-3000:]
    doc = json.loads((tmp_path / "fleet_scale.json").read_text())
    _png(tmp_path / "fleet_scale.png")
    sizes = doc["study"]["sizes"]
    assert set(doc["table"]) == {str(n) for n in sizes}
    for n in sizes:
        t = doc["table"][str(n)]
        names = set(t)
        assert {"constant-velocity prior", "centralised (pooled, no DP)"} <= names
        for r in ("cn", "eu", "us"):
            assert {
                f"local-only (no DP) {r}",
                f"personalised {r}",
                f"local-only (DP ε=3) {r}",
            } <= names
        assert "federated DP ε=3 + public pretraining + FedAdam" in names
        assert "federated DP ε=8 (selected on val)" in names
        for per_test in t.values():
            assert set(per_test) == {"cn", "eu", "us", "jp", "pooled"}
    # The prior has no learned parameter: its score cannot depend on the fleet size.
    p0, p1 = (doc["table"][str(n)]["constant-velocity prior"]["pooled"]["fde"][0] for n in sizes)
    assert p0 == pytest.approx(p1, rel=1e-9)
    for cell in doc["cells"]:
        ch = cell["chosen"]
        # Early stopping starts from the prior: the chosen model is never worse on validation.
        curve = ch["centralised (pooled, no DP)"]["val_curve"]
        assert ch["centralised (pooled, no DP)"]["best_val_fde"] <= curve[0][1]
        for name, spent in ch["epsilon_spent"].items():
            target = 3.0 if "ε=3" in name else 8.0
            vals = spent.values() if isinstance(spent, dict) else [spent]
            assert all(0 < v <= target for v in vals), (name, spent)
        assert ch["federated DP ε=3 selected"] in ch["federated DP ε=3 val"]
    for tgt in doc["targets"].values():
        assert isinstance(tgt["met"], bool)


def test_secagg_utility_tiny(tmp_path: Path) -> None:
    # ~30 CPU-s: most of it the planner's accounting (plan_schedule, plan_distributed_sigma for
    # R = 3 and 4) and imports; the 2 × 2 × 2 tiny runs themselves take a few seconds.
    rc, out = run_script([str(EXP / "secagg_utility.py"), "--tiny", "--out", str(tmp_path)], 900)
    assert rc == 0, out[-3000:]
    doc = json.loads((tmp_path / "secagg_utility.json").read_text())
    _png(tmp_path / "secagg_utility.png")
    rows, scheds = doc["summary"]["rows"], doc["schedules"]
    assert set(rows) == {f"{n}/{m}" for n in (3, 4) for m in ("prior", "local", "distributed")}
    # Same schedule for both mechanisms and both region counts; t = the protocol's default.
    assert scheds["3"]["rounds"] == scheds["4"]["rounds"] >= 2
    assert scheds["3"]["vehicles_per_step"] == scheds["4"]["vehicles_per_step"]
    assert (scheds["3"]["threshold"], scheds["4"]["threshold"]) == (2, 3)
    for n in ("3", "4"):
        s, t = scheds[n], scheds[n]["threshold"]
        m, r = s["vehicles_per_step"], int(n)
        # Noise on the average: every region adds variance (σ s C)²/t (distributed) or σ²C².
        assert s["noise_on_average"]["distributed"] == pytest.approx(
            s["sigma"]["distributed"] / (m * (r * t) ** 0.5)
        )
        assert s["noise_on_average"]["local"] == pytest.approx(s["sigma"]["local"] / (m * r**0.5))
    (seed,) = doc["seeds"]
    for key, run in seed["runs"].items():
        n = int(key.split("/")[0])
        assert len(run["epsilon"]) == n and run["lr"] in doc["study"]["lrs"]
        assert set(run["val_fde"]) == {f"{lr:g}" for lr in doc["study"]["lrs"]}
        for eps in run["epsilon"].values():
            # one ledger release per round in every region, ε read back from the ledger
            assert eps["releases"] == scheds[str(n)]["rounds"]
            if run["mechanism"] == "distributed":
                assert 0.8 * 3 <= eps["distributed"] <= 3.0 + 1e-9
                assert eps["own_noise"] > eps["distributed"]  # one share is less noise
            else:
                assert 0 < eps["own_noise_prv"] <= 3.0 + 1e-9
        # Trained models moved away from the prior they started from.
        assert run["scores"]["pooled"]["fde"] != seed["prior"]["pooled"]["fde"]
    # Pooled over cn+eu+us is the frame-weighted mean of those regions' scores.
    frames = {r: d["test_frames"] for r, d in doc["data"].items()}
    run = seed["runs"]["4/distributed"]
    base = sum(run["scores"][r]["fde"] * frames[r] for r in ("cn", "eu", "us"))
    want = base / sum(frames[r] for r in ("cn", "eu", "us"))
    assert rows["4/distributed"]["pooled_fde_cn_eu_us"][0] == pytest.approx(want)
    assert "SYNTHETIC" in " ".join(doc["notes"]) and "ε = 3" in out
