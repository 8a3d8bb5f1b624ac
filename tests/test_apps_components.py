"""pyproject's Flower components resolve to the fedfsd apps; constants agree across sides."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def test_components_point_at_the_fedfsd_apps() -> None:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    comp = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert isinstance(_load(comp["serverapp"]), ServerApp)
    assert isinstance(_load(comp["clientapp"]), ClientApp)


def test_pyproject_run_config_is_valid_for_the_server() -> None:
    from fedfsd.aggregator.settings import parse_settings

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    s = parse_settings(cfg)
    assert s.num_server_rounds == cfg["num-server-rounds"] and s.model == cfg["model"]


def test_aggregator_model_widths_match_the_data_side() -> None:
    from fedfsd.aggregator.settings import DEFAULT_N_FEATURES, DEFAULT_N_LABELS
    from fedfsd.data.feature_spec import N_FEATURES, N_LABELS

    assert (DEFAULT_N_FEATURES, DEFAULT_N_LABELS) == (N_FEATURES, N_LABELS)


def test_bad_run_config_names_the_key() -> None:
    import pytest

    from fedfsd.aggregator.settings import SettingsError, parse_settings

    with pytest.raises(SettingsError, match="min-regions"):
        parse_settings({"min-regions": 0})
    with pytest.raises(SettingsError, match="absolute"):
        parse_settings({"run-dir": "relative/dir"})


def _table(path: Path) -> dict:
    return tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]


def test_both_run_config_tables_carry_the_run_config_models_keys_and_defaults() -> None:
    """`flwr run` only accepts declared keys: both tables must hold exactly the keys and defaults
    of fedfsd.run_config.RunConfig, the one source (the root table adds the simulation keys)."""
    from fedfsd.aggregator.settings import RunSettings
    from fedfsd.run_config import RunConfig, run_config_defaults

    expected = run_config_defaults()
    assert len(expected) == len(RunConfig.model_fields) and expected["node-wait"] == 120.0
    assert set(RunSettings.model_fields) == set(RunConfig.model_fields)
    root = _table(ROOT / "pyproject.toml")
    packaged = _table(ROOT / "fedfsd" / "flwr_app" / "pyproject.toml")
    sim_only = {k: v for k, v in root.items() if k.startswith("sim-")}  # ClientApp simulation
    assert {k: v for k, v in root.items() if k not in sim_only} == expected
    assert packaged == expected


def test_cli_option_defaults_come_from_the_run_config_model() -> None:
    """`fedfsd aggregator run` sends what it is not told from the model, never its own numbers."""
    import inspect

    from fedfsd.aggregator.cli import run
    from fedfsd.run_config import default

    opts = {n: p.default for n, p in inspect.signature(run).parameters.items()}
    for key in ("min-regions", "round-timeout", "node-wait", "model", "server-optimizer",
                "server-momentum", "server-lr", "evaluate-every", "update-norm-bound"):  # fmt: skip
        assert opts[key.replace("-", "_")].default == default(key), key
    for key in ("local-steps", "lr", "noise-multiplier", "clip-norm", "vehicles-per-step"):
        opt = opts[key.replace("-", "_")]
        assert opt.default is None and f"({default(key)})" in opt.help, key


def test_train_request_defaults_equal_the_aggregators() -> None:
    """A region asked nothing explicit trains the aggregator's default schedule."""
    from fedfsd.aggregator.settings import RunSettings
    from fedfsd.config import TrainRequest

    req = RunSettings().train_request()
    t = TrainRequest()
    assert (t.local_steps, t.lr, t.noise_multiplier, t.clip_norm) == (
        req["local-steps"],
        req["lr"],
        req["noise-multiplier"],
        req["clip-norm"],
    )
    assert (t.vehicles_per_step, t.frames_per_vehicle, t.model) == (
        req["vehicles-per-step"],
        req["frames-per-vehicle"],
        req["model"],
    )
