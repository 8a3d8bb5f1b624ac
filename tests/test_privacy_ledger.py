"""Ledger and local round: budget refusal, no double spend, history carried, torn lines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from fedfsd.cli import app
from fedfsd.config import PolicyError, TrainRequest, parse_policy
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.models import build_model, get_weights
from fedfsd.privacy.accounting import compute_epsilon
from fedfsd.privacy.ledger import Ledger, LedgerError, update_digest
from fedfsd.privacy.local_round import BudgetExceeded, run_local_round

POLICY = """
region = "synthetic"
epsilon_budget = {budget}
delta = 1e-3
min_noise_multiplier = 1.0
max_clip_norm = 1.0
update_norm_bound = 0.5
max_local_steps = 200
"""
REQ = TrainRequest(
    local_steps=5, lr=0.05, noise_multiplier=1.0, vehicles_per_step=10, frames_per_vehicle=4
)


@pytest.fixture(scope="module")
def frames():
    return make_synthetic_frames(100, 6, seed=0)


@pytest.fixture(scope="module")
def weights(frames):
    return get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))


def policy(budget=8.0):
    return parse_policy(POLICY.format(budget=budget))


def test_rounds_accumulate_one_history_and_repeat_is_free(tmp_path, frames, weights):
    led = tmp_path / "eu.jsonl"
    r0 = run_local_round(frames, policy(), led, weights, REQ, "run", 0, "mlp", seed=1)
    r1 = run_local_round(frames, policy(), led, r0.new_weights, REQ, "run", 1, "mlp", seed=2)
    lg = Ledger(led)
    assert lg.history() == [(1.0, 0.1, 10)]  # carried across rounds, never reset
    assert r1.epsilon == pytest.approx(compute_epsilon([(1.0, 0.1, 10)], 1e-3))
    assert r1.epsilon > r0.epsilon
    assert lg.epsilon() == pytest.approx(r1.epsilon)
    # the update leaving the region is L2-bounded and its digest is on the ledger
    upd = {k: r1.new_weights[k] - r0.new_weights[k] for k in weights}
    assert r1.update_norm <= 0.5 + 1e-6
    assert lg.releases()[-1]["update_sha256"] == update_digest(upd) == r1.update_sha256
    # a repeated (run, round) (e.g. aggregator --resume) returns the same release, no new spend
    again = run_local_round(frames, policy(), led, r0.new_weights, REQ, "run", 1, "mlp")
    assert again.cached
    assert all(np.array_equal(again.new_weights[k], r1.new_weights[k]) for k in weights)
    assert len(Ledger(led).releases()) == 2
    # a different received model for an already released round is refused, not re-trained
    with pytest.raises(LedgerError, match="already released"):
        run_local_round(frames, policy(), led, weights, REQ, "run", 1, "mlp")
    # every record is plain JSON with the contract's fields
    rec = json.loads(led.read_text().splitlines()[-1])
    assert rec["accountant_history"] == [[1.0, 0.1, 10]] and rec["private"] is True
    assert rec["sampling"] == "poisson" and rec["sample_rate"] == 0.1


def test_budget_refusal_trains_records_and_releases_nothing(tmp_path, frames, weights):
    led = tmp_path / "eu.jsonl"
    first = run_local_round(frames, policy(3.0), led, weights, REQ, "r", 0, "mlp", seed=0)
    before = led.read_bytes()
    cached = sorted(p.name for p in Ledger(led).cache_dir.iterdir())
    big = REQ.model_copy(update={"local_steps": 200})
    with pytest.raises(BudgetExceeded) as e:
        run_local_round(frames, policy(3.0), led, weights, big, "r", 1, "mlp")
    assert e.value.spent == pytest.approx(first.epsilon)
    assert e.value.projected > 3.0
    assert led.read_bytes() == before
    assert sorted(p.name for p in Ledger(led).cache_dir.iterdir()) == cached


def test_one_ledger_per_region_fleet_and_mode(tmp_path, frames, weights):
    led = tmp_path / "eu.jsonl"
    run_local_round(frames, policy(), led, weights, REQ, "r", 0, "mlp", seed=0)
    other_fleet = make_synthetic_frames(100, 6, seed=9)
    with pytest.raises(LedgerError, match="fleet"):
        run_local_round(other_fleet, policy(), led, weights, REQ, "r", 1, "mlp")
    with pytest.raises(LedgerError, match="never mix"):
        run_local_round(frames, policy(), led, weights, REQ, "r", 1, "mlp", private=False)
    # a non-private baseline gets its own ledger, labelled as such
    np_led = tmp_path / "baseline.jsonl"
    res = run_local_round(frames, policy(), np_led, weights, REQ, "b", 0, "mlp", private=False)
    assert not res.private and res.epsilon == math.inf
    lg = Ledger(np_led)
    assert lg.header["private"] is False and lg.releases()[0]["epsilon_prv"] is None
    assert lg.epsilon() == math.inf
    out = CliRunner().invoke(app, ["privacy", "ledger", "show", str(np_led)])
    assert out.exit_code == 0 and "NON-PRIVATE" in out.output


def test_torn_last_line_is_reported_not_counted_and_cut(tmp_path, frames, weights):
    led = tmp_path / "eu.jsonl"
    run_local_round(frames, policy(), led, weights, REQ, "r", 0, "mlp", seed=0)
    good = led.read_bytes()
    # A crash half-way through writing round 1's line: the head of the real next line, and no
    # release marker (the marker is written only once the line is durable).
    run_local_round(frames, policy(), led, weights, REQ, "r", 1, "mlp", seed=0)
    nxt = led.read_bytes()[len(good) :]
    led.write_bytes(good + nxt[: len(nxt) // 2])
    Ledger(led).cache_dir.joinpath(Ledger(led).cache_path("r", 1).stem + ".released").unlink()
    lg = Ledger(led)
    assert lg.torn_tail is not None and len(lg.releases()) == 1
    assert lg.history() == [(1.0, 0.1, 5)]
    show = CliRunner().invoke(app, ["privacy", "ledger", "show", str(led), "--json"])
    assert json.loads(show.output)["torn_tail"] is True
    run_local_round(frames, policy(), led, weights, REQ, "r", 1, "mlp", seed=0)
    lines = led.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x) for x in lines)
    assert Ledger(led).torn_tail is None and Ledger(led).history() == [(1.0, 0.1, 10)]


def test_corrupt_or_inconsistent_middle_lines_are_errors(tmp_path, frames, weights):
    led = tmp_path / "eu.jsonl"
    for r in range(2):
        run_local_round(frames, policy(), led, weights, REQ, "r", r, "mlp", seed=r)
    lines = led.read_text().splitlines(keepends=True)
    led.write_text(lines[0] + "garbage\n" + lines[2])
    with pytest.raises(LedgerError, match="corrupt"):
        Ledger(led).releases()
    led.write_text(lines[0] + lines[2])  # dropping a release breaks the running history
    with pytest.raises(LedgerError, match="does not extend"):
        Ledger(led).releases()
    r = CliRunner().invoke(app, ["privacy", "ledger", "show", str(led)])
    assert r.exit_code == 4 and "does not extend" in r.output and "Traceback" not in r.output


def test_policy_delta_must_fit_the_fleet(tmp_path, frames, weights):
    pol = parse_policy(POLICY.format(budget=8.0).replace("delta = 1e-3", "delta = 0.02"))
    with pytest.raises(PolicyError, match=r"delta: 0.02 must be < 1/vehicles = 1/100"):
        run_local_round(frames, pol, tmp_path / "l.jsonl", weights, REQ, "r", 0, "mlp")
    assert not (tmp_path / "l.jsonl").exists()


def test_ledger_digest_matches_the_egress_release_when_the_bound_clips(tmp_path, frames, weights):
    """A clipped update must reach the border unchanged: the manifest's digest is the ledger's."""
    from fedfsd.region.egress import guard_update

    tight = parse_policy(
        POLICY.format(budget=8.0).replace("update_norm_bound = 0.5", "update_norm_bound = 1e-3")
    )
    res = run_local_round(
        frames, tight, tmp_path / "l.jsonl", weights, REQ, "run", 1, "mlp", seed=3
    )
    assert res.update_norm <= 1e-3
    release = guard_update(weights, res.new_weights, tight.update_norm_bound)
    assert not release.clipped  # the guard had nothing left to clip
    assert release.sha256 == res.update_sha256
