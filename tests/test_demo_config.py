"""The demo's embedded defaults must be accepted by both sides and fit the privacy budget."""

from pathlib import Path

from fedfsd.aggregator.settings import RunSettings
from fedfsd.config import parse_policy
from fedfsd.demo import DemoConfig, _print_new_rounds, policy_toml
from fedfsd.privacy.accounting import compute_epsilon
from fedfsd.region.client_app import _request


def test_demo_policy_and_run_config_validate():
    cfg = DemoConfig()
    for region in cfg.regions:
        policy = parse_policy(policy_toml(cfg, region), f"{region}.toml")
        assert policy.region == region
    s = RunSettings.model_validate(cfg.run_config(Path("/tmp/x"), "r1"))
    for region in cfg.regions:  # what each region receives: the run config's train request
        policy = parse_policy(policy_toml(cfg, region), f"{region}.toml")
        params = policy.effective(_request(s.train_request()))
        assert params.noise_multiplier == cfg.noise_multiplier
        assert params.steps == cfg.local_steps and params.lr == cfg.lr
    assert s.num_server_rounds == cfg.rounds and s.min_regions == len(cfg.regions)


def test_demo_defaults_stay_within_budget_for_the_fleet_size():
    """All rounds at the smallest train fleet the demo's seeded data gives (eu: 222 vehicles)."""
    cfg = DemoConfig()
    vehicles_in_train = 222
    q = cfg.vehicles_per_step / vehicles_in_train
    eps = compute_epsilon(
        [(cfg.noise_multiplier, q, cfg.rounds * cfg.local_steps)], cfg.delta, "prv"
    )
    assert eps < cfg.epsilon_budget
    assert cfg.delta < 1 / vehicles_in_train


def test_round_lines_are_printed_once(tmp_path, capsys):
    (tmp_path / "rounds.jsonl").write_text(
        '{"round": 1, "status": "ok", "seconds": 3, "accepted": ["eu"],'
        ' "epsilon": {"eu": 1.5}, "metrics": {"eu/fde": 2.5}}\n{"round": 2'
    )
    assert _print_new_rounds(tmp_path, 0) == 1  # the torn second line waits
    assert _print_new_rounds(tmp_path, 1) == 1
    out = capsys.readouterr().out
    assert out.count("round 1: ok") == 1 and "eu ε 1.50" in out and "eu FDE 2.50 m" in out
