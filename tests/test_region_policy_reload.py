"""A region operator edits the policy file: the next task runs under the new policy, with no
node restart (fedfsd.region.client_app keeps loaded policies in a cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from netbed.fixtures import cached_region_data
from test_apps_client import _ctx, _manifest, _msg

from fedfsd.aggregator.server_app import initial_weights
from fedfsd.aggregator.settings import RunSettings
from fedfsd.region.client_app import make_client_app

SETTINGS = RunSettings(**{"local-steps": 2, "vehicles-per-step": 4, "frames-per-vehicle": 4})
POLICY = (
    'region = "eu"\nepsilon_budget = {budget}\ndelta = 1e-6\nmin_noise_multiplier = 0.8\n'
    "max_clip_norm = 1.0\nupdate_norm_bound = 5.0\n"
)


@pytest.fixture(scope="module")
def weights():
    return initial_weights(SETTINGS)


def test_a_changed_policy_takes_effect_on_the_next_task(tmp_path: Path, weights) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.format(budget="50.0"))
    node = {
        "region": "eu",
        "data-dir": str(cached_region_data("eu")),
        "policy": str(policy),
        "ledger": str(tmp_path / "ledger.jsonl"),
    }
    app = make_client_app()

    def train(rnd: int):
        return _manifest(app(_msg("train", weights, rnd=rnd), _ctx(node)))

    m1 = train(1)
    assert not m1.refused_reason and m1.epsilon_budget == 50.0, m1
    # The operator tightens the budget below what is already spent: the next round is refused.
    policy.write_text(POLICY.format(budget="0.001"))
    m2 = train(2)
    assert "budget" in m2.refused_reason and m2.epsilon_budget == 0.001, m2
    # Loosened again, and the file keeps the modification time of the previous version (an
    # edit within one clock tick, or a deployment that sets fixed times, e.g. a Nix store or
    # SOURCE_DATE_EPOCH): the change is still seen.
    stamp = policy.stat()
    policy.write_text(POLICY.format(budget="40.0"))
    os.utime(policy, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    m3 = train(3)
    assert not m3.refused_reason and m3.epsilon_budget == 40.0, m3
    assert m3.epsilon > m1.epsilon  # the same ledger: round 3 spends on top of round 1
