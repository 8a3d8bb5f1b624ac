"""ε from fedfsd's accounting agrees with Google's dp-accounting; GDP is refused."""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import pytest
from typer.testing import CliRunner

from fedfsd.cli import app
from fedfsd.privacy.accounting import (
    AccountantError,
    compute_epsilon,
    extend_history,
    normalise_history,
)

SETTINGS = [  # (σ, q, steps, δ)
    (1.0, 0.01, 1000, 1e-5),
    (0.8, 0.05, 200, 1e-6),
    (1.5, 0.002, 3000, 1e-6),
    (2.0, 0.1, 100, 1e-5),
]


def _event(sigma: float, q: float, steps: int) -> dpa.DpEvent:
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)


@pytest.mark.parametrize("sigma,q,steps,delta", SETTINGS)
def test_prv_matches_pld_and_rdp_matches_rdp(sigma, q, steps, delta):
    pld = dpa.pld.PLDAccountant()
    pld.compose(_event(sigma, q, steps))
    rdp = dpa.rdp.RdpAccountant()
    rdp.compose(_event(sigma, q, steps))
    ours_prv = compute_epsilon([(sigma, q, steps)], delta, "prv")
    ours_rdp = compute_epsilon([(sigma, q, steps)], delta, "rdp")
    assert ours_prv == pytest.approx(pld.get_epsilon(delta), rel=0.01)
    assert ours_rdp == pytest.approx(rdp.get_epsilon(delta), rel=0.01)
    assert ours_prv < ours_rdp  # PRV is the tighter bound


def test_heterogeneous_history_matches_pld():
    hist = [(1.0, 0.02, 300), (1.3, 0.04, 200)]
    pld = dpa.pld.PLDAccountant()
    for s, q, n in hist:
        pld.compose(_event(s, q, n))
    assert compute_epsilon(hist, 1e-6, "prv") == pytest.approx(pld.get_epsilon(1e-6), rel=0.01)


def test_history_carries_across_rounds():
    one_round = extend_history([], 1.0, 0.05, 100)
    two_rounds = extend_history(one_round, 1.0, 0.05, 100)
    assert two_rounds == [(1.0, 0.05, 200)]
    e1 = compute_epsilon(one_round, 1e-6)
    e2 = compute_epsilon(two_rounds, 1e-6)
    assert e2 > 1.2 * e1  # a per-round accountant would report e1 again


def test_empty_and_nonprivate_histories():
    assert compute_epsilon([], 1e-6) == 0.0
    assert compute_epsilon([(0.0, 0.1, 10)], 1e-6) == math.inf
    assert normalise_history([(1.0, 0.1, 0), (1.0, 0.1, 5), (1.0, 0.1, 5)]) == [(1.0, 0.1, 10)]


@pytest.mark.parametrize("name", ["gdp", "GDP", "moments"])
def test_gdp_and_unknown_accountants_refused(name):
    with pytest.raises(AccountantError, match="gdp|unknown"):
        compute_epsilon([(1.0, 0.01, 10)], 1e-5, name)


@pytest.mark.parametrize("bad", [[(1.0, 0.0, 10)], [(1.0, 1.5, 10)], [(-1.0, 0.1, 10)], [(1, 0.1)]])
def test_bad_histories_refused(bad):
    with pytest.raises(AccountantError):
        compute_epsilon(bad, 1e-5)


def test_cli_epsilon_json_and_gdp_refusal():
    r = CliRunner().invoke(
        app,
        [
            "privacy",
            "epsilon",
            "--noise-multiplier",
            "1.0",
            "--sample-rate",
            "0.01",
            "--steps",
            "1000",
            "--delta",
            "1e-5",
            "--accountant",
            "rdp",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["accountant"] == "rdp"
    assert out["epsilon"] == pytest.approx(2.1014, abs=1e-3)
    r = CliRunner().invoke(
        app,
        [
            "privacy",
            "epsilon",
            "--noise-multiplier",
            "1.0",
            "--sample-rate",
            "0.01",
            "--steps",
            "10",
            "--delta",
            "1e-5",
            "--accountant",
            "gdp",
        ],
    )
    assert r.exit_code != 0
    assert "refused" in r.output
    assert "Traceback" not in r.output
