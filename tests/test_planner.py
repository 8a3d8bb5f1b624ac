"""The DP schedule planner: weight noise in budget, grows with the fleet, refuses the impossible.

PRV evaluations are slow (0.1-6 s): plans are computed once per module and compute_epsilon
caches its results, so the tests share them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfsd.aggregator.settings import NOMINAL_PLAN, RunSettings, parse_settings
from fedfsd.cli import app
from fedfsd.config import RegionPolicy
from fedfsd.privacy.accounting import compute_epsilon
from fedfsd.privacy.planner import (
    MAX_VEHICLES_PER_STEP,
    NOISE_BUDGET,
    SIGMA_FLOOR,
    Plan,
    PlanError,
    calibrate_sigma,
    plan_schedule,
)


@pytest.fixture(scope="module")
def sweep_plan() -> Plan:
    return plan_schedule(300, 8.0, 1e-5, 10)


@pytest.fixture(scope="module")
def nominal_plan() -> Plan:
    return plan_schedule(**NOMINAL_PLAN)


@pytest.fixture(scope="module")
def demo_plan() -> Plan:
    return plan_schedule(960, 7.5, 1e-5, 5, max_vehicles_per_step=512)


def test_reproduces_the_schedule_chosen_on_validation(demo_plan: Plan) -> None:
    """The demo's fleets (960 declared vehicles, ε 7.5, 5 rounds) → 256 vehicles, 60 steps.

    That is the schedule experiments/demo_schedule.py measured inside the flat region on
    validation episodes (T = 15-100 all ≈ 0.81× the prior; T = 300 worse than the prior).
    """
    p = demo_plan
    assert (p.vehicles_per_step, p.total_steps, p.steps_per_round) == (256, 60, 12)
    assert p.weight_noise <= NOISE_BUDGET and p.noise_multiplier == pytest.approx(1.55, abs=0.05)
    assert p.weight_noise == pytest.approx(p.noise_ratio * math.sqrt(p.total_steps))
    hist = [(p.noise_multiplier, p.sample_rate, p.total_steps)]
    assert p.epsilon_prv == compute_epsilon(hist, 1e-5) and 7.4 <= p.epsilon_prv <= 7.5
    assert p.epsilon_rdp == compute_epsilon(hist, 1e-5, "rdp") >= p.epsilon_prv
    # the most steps: one more round's steps at the budget's σ overspends ε
    t = p.total_steps + p.rounds
    sigma_at_budget = NOISE_BUDGET * 256 / math.sqrt(t)
    assert compute_epsilon([(sigma_at_budget, p.sample_rate, t)], 1e-5) > 7.5
    assert p.limited_by == "noise budget"


def test_schedule_grows_with_the_fleet(sweep_plan: Plan, nominal_plan: Plan) -> None:
    """T ≈ B·N·ε/√(2 ln 1/δ): about linear in N·ε until a cap binds."""
    assert nominal_plan.vehicles == 1000
    assert sweep_plan.total_steps < nominal_plan.total_steps
    big = plan_schedule(10_000, 3.0, 1e-5, 10)
    assert 3 * nominal_plan.total_steps < big.total_steps < 2000
    assert big.limited_by == "noise budget" and big.weight_noise <= NOISE_BUDGET
    # m grows until σ is in the large-σ regime (rule c)
    assert big.vehicles_per_step > 256 and big.noise_multiplier >= SIGMA_FLOOR
    assert big.epsilon_prv <= 3.0
    assert big.vehicles_per_step <= RegionPolicy.model_fields["max_vehicles_per_step"].default
    capped = plan_schedule(10_000, 3.0, 1e-5, 10, max_total_steps=100)
    assert capped.total_steps == 100 and capped.limited_by == "max total steps"
    # rule (d): m doubles towards σ ≥ 2 until the compute cap stops it
    assert capped.weight_noise < NOISE_BUDGET and capped.vehicles_per_step == MAX_VEHICLES_PER_STEP


def test_aggregator_defaults_are_the_nominal_plan(nominal_plan: Plan) -> None:
    s = RunSettings()
    got = {k: getattr(s, k.replace("-", "_")) for k in nominal_plan.run_config()}
    assert got == nominal_plan.run_config()


def test_policy_cap_does_not_silently_cap_a_plan() -> None:
    assert RegionPolicy.model_fields["max_vehicles_per_step"].default == MAX_VEHICLES_PER_STEP


def test_calibrated_sigma_is_tight_and_admissible() -> None:
    sigma = calibrate_sigma(3.0, 1e-5, 0.01, 1000)
    assert compute_epsilon([(sigma, 0.01, 1000)], 1e-5) <= 3.0
    assert compute_epsilon([(sigma * 0.99, 0.01, 1000)], 1e-5) > 3.0


def test_refuses_large_delta_and_unreachable_targets() -> None:
    with pytest.raises(PlanError, match="1/vehicles"):
        plan_schedule(300, 8.0, 1 / 300, 10)
    with pytest.raises(PlanError, match="not even one step fits"):
        plan_schedule(300, 0.2, 1e-5, 10)
    with pytest.raises(PlanError, match="rounds must be"):
        plan_schedule(300, 8.0, 1e-5, 0)
    with pytest.raises(PlanError, match="epsilon"):
        plan_schedule(300, math.inf, 1e-5, 10)


def test_cli_prints_writes_and_the_aggregator_reads_the_plan(
    tmp_path: Path, nominal_plan: Plan
) -> None:
    runner = CliRunner()
    base = ["privacy", "plan", "--vehicles", "1000", "--epsilon", "8", "--delta", "1e-5"]
    out = runner.invoke(app, [*base, "--rounds", "10", "--json", "-"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["run_config"] == nominal_plan.run_config()
    assert Plan.model_validate({k: v for k, v in doc.items() if k != "run_config"}).total_steps == (
        nominal_plan.total_steps
    )
    path = tmp_path / "plan.json"
    table = runner.invoke(app, [*base, "--rounds", "10", "--json", str(path)])
    assert table.exit_code == 0 and "noise multiplier σ" in table.output
    s = parse_settings({"plan": str(path), "local-steps": 3, "num-server-rounds": 1})
    assert s.local_steps == 7 and s.num_server_rounds == 10  # the plan wins in the run config
    assert s.noise_multiplier == nominal_plan.noise_multiplier and s.vehicles_per_step == 256
    bad = runner.invoke(app, [*base[:-1], "0.01", "--rounds", "10"])
    assert bad.exit_code == 2 and "delta" in bad.output and bad.output.count("\n") <= 2
