"""Simulation mode lives in fedfsd.region.simulation, every key it reads is declared in the root
pyproject's run config with its default, and the production ClientApp reaches it only for a
node config with `partition-id` alone."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from fedfsd.region.client_app import resolve_setup
from fedfsd.region.simulation import SIM_DEFAULTS, simulated_setup, synthetic_policy

ROOT = Path(__file__).resolve().parent.parent


def test_every_simulation_key_is_declared_with_its_default() -> None:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert {k: v for k, v in table.items() if k.startswith("sim-")} == SIM_DEFAULTS
    # Every "sim-..." string the simulation module reads is one of the declared keys.
    src = (ROOT / "fedfsd" / "region" / "simulation.py").read_text()
    used = {
        n.value
        for n in ast.walk(ast.parse(src))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
        if re.fullmatch(r"sim-[a-z0-9]+(-[a-z0-9]+)*", n.value)
    }
    assert "sim-ledger-path" in used and used <= set(SIM_DEFAULTS), used - set(SIM_DEFAULTS)


def test_the_production_client_app_holds_no_simulation_defaults() -> None:
    src = (ROOT / "fedfsd" / "region" / "client_app.py").read_text()
    assert "SIM_DEFAULTS" not in src and '"sim-' not in src


def test_sim_ledger_path_names_the_synthetic_regions_ledger(tmp_path: Path) -> None:
    s = resolve_setup({"partition-id": 2}, {"sim-ledger-path": str(tmp_path / "one.jsonl")})
    assert s.region == "sim2" and s.data_dir is None
    assert s.ledger_for("run-a") == tmp_path / "one.jsonl"
    s = simulated_setup(2, {"sim-ledger-dir": str(tmp_path)})
    assert s.ledger_for("run-a") == tmp_path / "run-a" / "sim2.jsonl"


def test_synthetic_policy_follows_the_run_config() -> None:
    s = simulated_setup(0, {"sim-epsilon-budget": 3.5, "sim-allowed-metrics": "fde, ade"})
    pol = synthetic_policy(s, n_vehicles=64)
    assert pol.region == "sim0" and pol.epsilon_budget == 3.5
    assert list(pol.allowed_metrics) == ["fde", "ade"]
    assert pol.min_noise_multiplier == SIM_DEFAULTS["sim-min-noise-multiplier"]
