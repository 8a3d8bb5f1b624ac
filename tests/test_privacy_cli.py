"""`fedfsd region train-local` and `fedfsd privacy ledger show`: output and clear errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fedfsd.cli import app

POLICY = """
region = "synthetic"
epsilon_budget = 20.0
delta = 1e-3
min_noise_multiplier = 1.0
max_clip_norm = 1.0
update_norm_bound = 1.0
max_local_steps = 3
"""


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_train_local_prints_epsilon_and_ledger_show_agrees(tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text(POLICY)
    led = tmp_path / "l.jsonl"
    base = ["region", "train-local", "--synthetic", "50", "--policy", str(pol),
            "--ledger", str(led), "--vehicles-per-step", "5", "--seed", "0"]  # fmt: skip
    r = run(*base, "--steps", "10", "--out", str(tmp_path / "w.npz"))
    assert r.exit_code == 0, r.output
    assert "ε spent" in r.output and "ε left" in r.output
    assert "3 steps" in r.output  # the policy caps the request
    assert (tmp_path / "w.npz").exists()
    r = run(*base, "--steps", "3")  # next round of the same run
    assert r.exit_code == 0, r.output
    show = json.loads(run("privacy", "ledger", "show", str(led), "--json").output)
    assert show["releases"] == 2 and show["private"] is True
    assert 0 < show["epsilon_prv"] < show["epsilon_rdp"]
    assert show["epsilon_left"] == 20.0 - show["epsilon_prv"]
    table = run("privacy", "ledger", "show", str(led))
    assert table.exit_code == 0 and "total ε" in table.output


def test_clear_one_line_errors(tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text(POLICY.replace("delta = 1e-3", "delta = -1"))
    led = str(tmp_path / "l.jsonl")
    r = run("region", "train-local", "--synthetic", "50", "--policy", str(pol), "--ledger", led,
            "--steps", "2")  # fmt: skip
    assert r.exit_code == 2 and "delta" in r.output and "Traceback" not in r.output
    pol.write_text(POLICY)
    r = run("region", "train-local", "--synthetic", "50", "--policy", str(pol), "--ledger", led,
            "--steps", "2", "--model", "resnet")  # fmt: skip
    assert r.exit_code == 2 and "--model" in r.output
    r = run("region", "train-local", "--policy", str(pol), "--ledger", led, "--steps", "2")
    assert r.exit_code == 2 and "--data" in r.output
    r = run("region", "train-local", "--data", str(tmp_path / "nope"), "--policy", str(pol),
            "--ledger", led, "--steps", "2")  # fmt: skip
    assert r.exit_code == 2 and "Traceback" not in r.output
    r = run("privacy", "ledger", "show", str(tmp_path / "missing.jsonl"))
    assert r.exit_code == 2 and "no such ledger" in r.output
