"""Region start checks and the budget pre-flight, through the real CLI and the real ledger.

Fast (no federation): `fedfsd region start` refuses before it starts any process, and the
pre-flight is the function the ClientApp calls on a run's first train message.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedfsd.deploy.processes import flower_env
from fedfsd.privacy.ledger import Ledger
from fedfsd.region.preflight import RunUnaffordable, check_run, decisions_path

POLICY = (
    'region = "eu"\nepsilon_budget = 5.0\ndelta = 1e-3\nmin_noise_multiplier = 0.8\n'
    "max_clip_norm = 1.0\nupdate_norm_bound = 5.0\n"
)


def _region_start(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "manifest.json").write_text('{"region": "eu", "fleet_id": "eu-new", "vehicles": 20}')
    pol = tmp_path / "eu.toml"
    pol.write_text(POLICY)
    argv = ["region", "start", "--superlink", "127.0.0.1:1", "--insecure", "--policy", str(pol),
            "--data", str(data), "--ledger", str(tmp_path / "ledger.jsonl"), *extra]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "fedfsd.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=flower_env(),
    )


def _open_ledger(path: Path, fleet_id: str) -> None:
    Ledger(path).create(
        region="eu",
        fleet_id=fleet_id,
        vehicles=20,
        delta=1e-3,
        epsilon_budget=5.0,
        private=True,
        created="2026-11-29T00:00:00+00:00",
    )


def test_region_start_refuses_a_ledger_of_another_fleet(tmp_path: Path) -> None:
    _open_ledger(tmp_path / "ledger.jsonl", "eu-old")
    res = _region_start(tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "ledger is for fleet 'eu-old', data is fleet 'eu-new'" in res.stderr
    assert "Traceback" not in res.stderr


def test_region_start_names_a_taken_runtime_port_and_its_flag(tmp_path: Path) -> None:
    _open_ledger(tmp_path / "ledger.jsonl", "eu-new")  # the matching ledger passes
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = _region_start(tmp_path, "--runtime-port", str(port))
    assert res.returncode == 5, res.stdout + res.stderr
    assert f"127.0.0.1:{port} is taken" in res.stderr and "--runtime-port" in res.stderr
    assert "Traceback" not in res.stderr


def test_preflight_refuses_the_whole_run_once_and_spends_nothing(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    kw = dict(sigma=1.0, q=0.25, steps=2, delta=1e-3, budget=5.0)
    with pytest.raises(RunUnaffordable) as err:
        check_run(ledger, run_id="r1", round_idx=1, total_rounds=40, **kw)
    msg = str(err.value)
    assert msg.startswith("run refused: 40 round(s) × 2 steps at σ 1")
    fits = int(msg.split("at most ")[1].split()[0])
    assert 0 < fits < 40 and "σ ≥" in msg and err.value.spent == 0.0
    assert not ledger.exists()  # nothing opened, nothing spent
    # Round 39 alone would fit; the run stays refused as decided on its first message.
    with pytest.raises(RunUnaffordable, match="40 round"):
        check_run(ledger, run_id="r1", round_idx=39, total_rounds=40, **kw)
    doc = json.loads(decisions_path(ledger).read_text())
    assert doc["r1"]["decision"] == "refused"
    # What the message says fits, fits.
    p = check_run(ledger, run_id="r2", round_idx=1, total_rounds=fits, **kw)
    assert p is not None and p.fits and p.projected <= 5.0
