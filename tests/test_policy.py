"""Region policy: fields are validated, δ is checked against the fleet, requests only tighten."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fedfsd.config import PolicyError, RegionPolicy, TrainRequest, load_policy, parse_policy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "policy-eu.toml"

GOOD = """
region = "eu"
epsilon_budget = 8.0
delta = 1e-6
min_noise_multiplier = 0.8
max_clip_norm = 1.0
update_norm_bound = 5.0
max_local_steps = 200
max_vehicles_per_step = 64
max_frames_per_vehicle = 16
allowed_metrics = ["loss", "ade"]
"""


def test_example_policy_loads():
    p = load_policy(EXAMPLE)
    assert p.region == "eu" and p.delta == 1e-6 and p.epsilon_budget == 8.0


@pytest.mark.parametrize(
    "edit,field",
    [
        (("epsilon_budget = 8.0", "epsilon_budget = -1"), "epsilon_budget"),
        (("epsilon_budget = 8.0", 'epsilon_budget = "lots"'), "epsilon_budget"),
        (("epsilon_budget = 8.0", "epsilon_budget = inf"), "epsilon_budget"),
        (("delta = 1e-6", "delta = 1.5"), "delta"),
        (("delta = 1e-6\n", ""), "delta"),
        (("max_clip_norm = 1.0", "max_clip_norm = 0"), "max_clip_norm"),
        (("max_local_steps = 200", "max_local_steps = 0"), "max_local_steps"),
        (('["loss", "ade"]', '["loss", "raw_frames"]'), "allowed_metrics"),
        (('region = "eu"', 'region = "eu"\nepsilon = 3'), "epsilon"),
        (('region = "eu"', 'region = "eu"\nweighting = "exact"'), "weighting"),
    ],
)
def test_bad_policies_name_the_field(edit, field, tmp_path):
    f = tmp_path / "p.toml"
    f.write_text(GOOD.replace(*edit))
    with pytest.raises(PolicyError) as e:
        load_policy(f)
    assert str(e.value).startswith(f"{f}: {field}")


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.toml")
    f = tmp_path / "bad.toml"
    f.write_text("region = ")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(f)


def test_delta_checked_against_vehicles_and_region():
    p = parse_policy(GOOD)
    p.check_dataset("eu", 999_999)
    with pytest.raises(PolicyError, match="delta"):
        p.check_dataset("eu", 1_000_000)
    with pytest.raises(PolicyError, match="region"):
        p.check_dataset("us", 10)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.integers(1, 10_000),
    sigma=st.floats(0, 10),
    clip=st.floats(0.01, 100),
    vehicles=st.integers(1, 10_000),
    frames=st.integers(1, 1000),
)
def test_requests_only_tighten(steps, sigma, clip, vehicles, frames):
    p = parse_policy(GOOD)
    req = TrainRequest(
        local_steps=steps,
        noise_multiplier=sigma,
        clip_norm=clip,
        vehicles_per_step=vehicles,
        frames_per_vehicle=frames,
    )
    eff = p.effective(req)
    assert eff.noise_multiplier >= p.min_noise_multiplier
    assert eff.noise_multiplier >= sigma
    assert eff.clip_norm <= p.max_clip_norm and eff.clip_norm <= clip
    assert eff.steps <= p.max_local_steps and eff.steps <= steps
    assert eff.vehicles_per_step <= p.max_vehicles_per_step
    assert eff.frames_per_vehicle <= p.max_frames_per_vehicle
    assert eff.update_norm_bound == p.update_norm_bound


def test_policy_is_immutable():
    p = parse_policy(GOOD)
    with pytest.raises(ValidationError, match="frozen_instance"):
        p.epsilon_budget = 100.0  # type: ignore[misc]
    assert p.epsilon_budget != 100.0
    assert isinstance(p, RegionPolicy)
