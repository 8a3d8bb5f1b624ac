"""The demo's embedded defaults must be accepted by both sides and fit the privacy budget."""

from pathlib import Path

import pytest

from fedfsd.aggregator.settings import RunSettings
from fedfsd.config import parse_policy
from fedfsd.demo import DemoConfig, _print_new_rounds, policy_toml, public_fleet_size
from fedfsd.privacy.accounting import compute_epsilon
from fedfsd.region.client_app import _request

PLAN_FLEET = 960  # a declared (rounded-down) fleet like the demo's 1,000-vehicle regions


@pytest.fixture(scope="module")
def plan():
    return DemoConfig().plan(PLAN_FLEET)


def test_demo_policy_and_run_config_validate(plan):
    cfg = DemoConfig()
    s = RunSettings.model_validate(cfg.run_config(Path("/tmp/x"), "r1", plan))
    for region in cfg.regions:  # what each region receives: the run config's train request
        policy = parse_policy(policy_toml(cfg, region, plan, PLAN_FLEET), f"{region}.toml")
        assert policy.region == region and policy.public_fleet_size == PLAN_FLEET
        assert policy.allowed_metrics == []  # nothing but the update leaves
        params = policy.effective(_request(s.train_request()))
        # The region's own floor is below the plan's σ, so the plan is what runs, uncapped.
        assert params.noise_multiplier == plan.noise_multiplier > cfg.min_noise_multiplier
        assert params.steps == plan.steps_per_round and params.lr == plan.lr
        assert params.vehicles_per_step == plan.vehicles_per_step
    assert s.num_server_rounds == cfg.rounds and s.min_regions == len(cfg.regions)


def test_demo_plan_stays_within_budget(plan):
    """Every round at the declared fleet size: the ledger's ε is the plan's, below the budget."""
    cfg = DemoConfig()
    q = plan.vehicles_per_step / PLAN_FLEET
    eps = compute_epsilon(
        [(plan.noise_multiplier, q, cfg.rounds * plan.steps_per_round)], cfg.delta, "prv"
    )
    assert eps == pytest.approx(plan.epsilon_prv, rel=1e-6)
    assert eps <= cfg.plan_epsilon < cfg.epsilon_budget
    assert cfg.delta < 1 / PLAN_FLEET


def test_public_fleet_size_rounds_down():
    assert [public_fleet_size(n) for n in (42, 222, 1987, 2000, 123456)] == [
        42,
        220,
        1900,
        2000,
        120000,
    ]


def test_round_lines_are_printed_once(tmp_path, capsys):
    (tmp_path / "rounds.jsonl").write_text(
        '{"round": 1, "status": "ok", "seconds": 3, "accepted": ["eu"],'
        ' "epsilon": {"eu": 1.5}, "metrics": {"eu/fde": 2.5}}\n{"round": 2'
    )
    assert _print_new_rounds(tmp_path, 0) == 1  # the torn second line waits
    assert _print_new_rounds(tmp_path, 1) == 1
    out = capsys.readouterr().out
    assert out.count("round 1: ok") == 1 and "eu ε 1.50" in out and "eu FDE 2.50 m" in out
