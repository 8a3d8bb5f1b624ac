"""Distributed DP noise (issue 15, part 2): Skellam shares, their accounting against direct
numeric computation and Opacus, the policy, the ledger line and `verify` of both ε values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import skellam

from fedfsd.config import PolicyError, parse_policy
from fedfsd.privacy.distributed_accounting import (
    ORDERS,
    SkellamRound,
    epsilon,
    epsilons,
    rdp_to_epsilon,
    skellam_rdp,
    skellam_round_rdp,
    subsampled_rdp,
)
from fedfsd.privacy.distributed_release import (
    DistributedBudgetExceeded,
    plan_distributed_release,
    plan_from_ledger,
    record_fields,
)
from fedfsd.privacy.ledger import Ledger, LedgerError
from fedfsd.privacy.skellam import (
    choose_scale,
    inflated_sensitivities,
    required_bits,
    sample_skellam,
    share_variance,
)
from fedfsd.privacy.verify_ledger import verify_ledger_alone

pytestmark = pytest.mark.secagg

BASE = """
region = "eu"
epsilon_budget = {budget}
delta = 1e-6
min_noise_multiplier = 1.0
max_clip_norm = 1.0
update_norm_bound = 1.0
"""


def policy(
    budget: float = 8.0, extra: str = 'trust_model = "distributed"\nmin_honest_regions = 3\n'
):
    return parse_policy(BASE.format(budget=budget) + extra)


# ---- noise shares ---------------------------------------------------------------------------


def test_shares_sum_to_exactly_skellam_of_t_times_the_share():
    """t independent shares of variance μ_share are distributed as Skellam(t·μ_share)."""
    rng = np.random.default_rng(1)
    t, mu = 3, share_variance(1.0, 2.0, 1.0, 3)  # (σ s C)²/t = 4/3
    assert mu == pytest.approx(4 / 3)
    shares = [sample_skellam(mu, 200_000, rng) for _ in range(t)]
    assert all(s.dtype == np.int64 for s in shares)
    total = np.sum(shares, axis=0)
    assert total.var() == pytest.approx(t * mu, rel=0.02)
    assert abs(total.mean()) < 0.02
    ks = np.arange(-6, 7)
    emp = np.array([(total == k).mean() for k in ks])
    want = skellam.pmf(ks, t * mu / 2, t * mu / 2)
    assert np.abs(emp - want).max() < 0.004


def test_rounding_inflates_sensitivity_and_scale_keeps_it_small():
    d, c = 10_000, 0.5
    s = choose_scale(c, d)
    l1, l2 = inflated_sensitivities(s, c, d)
    assert math.sqrt(d) <= 0.01 * s * c * (1 + 1e-12)
    assert l2 == pytest.approx(s * c + 100)
    assert l1 == pytest.approx(s * c * 100 + d)
    assert (
        required_bits(regions=4, vehicles_cap=1024, clip_norm=c, scale=s, total_variance=1e8) <= 62
    )


# ---- the Skellam RDP bound -------------------------------------------------------------------


def _renyi_shifted_skellam(alpha: int, shift: int, variance: float) -> float:
    """D_α(Sk + shift ‖ Sk), summed directly over the support that carries the mass."""
    half = int(30 * math.sqrt(variance)) + 40 + shift
    k = np.arange(-half, half + 1)
    lp = skellam.logpmf(k - shift, variance / 2, variance / 2)
    lq = skellam.logpmf(k, variance / 2, variance / 2)
    ok = np.isfinite(lp) & np.isfinite(lq)
    return float(logsumexp(alpha * lp[ok] + (1 - alpha) * lq[ok])) / (alpha - 1)


@pytest.mark.parametrize("variance", [2.0, 10.0, 50.0])
@pytest.mark.parametrize("shift", [1, 3])
def test_skellam_bound_is_an_upper_bound_of_the_true_divergence(variance, shift):
    for alpha in (2, 3, 4, 8, 16):
        true = _renyi_shifted_skellam(alpha, shift, variance)
        bound = skellam_rdp(alpha, shift, shift, variance)  # 1-D: Δ1 = |Δ|, Δ2² = Δ²
        assert true <= bound + 1e-12, (alpha, true, bound)
        if variance >= 50:  # and tight once the noise is large against the shift
            assert bound <= 1.25 * true, (alpha, true, bound)


def test_skellam_bound_tends_to_the_gaussian_rdp():
    for alpha in (2, 8, 32):
        gauss = alpha * 1.0 / (2 * 1e6)
        rel = skellam_rdp(alpha, 1.0, 1.0, 1e6) / gauss - 1
        assert 0 <= rel < 1e-4
    assert skellam_rdp(8, 1, 1, 10) / (8 / 20) - 1 > 0.05  # the extra term matters at small μ


# ---- Poisson subsampling (Zhu & Wang 2019, Thm 6) ---------------------------------------------


def _gauss_base(sigma: float) -> list[float]:
    return [a / (2 * sigma**2) for a in range(2, max(ORDERS) + 1)]


def test_subsampling_q1_is_unsampled_and_never_exceeds_it():
    base = _gauss_base(1.0)
    for a in (2, 5, 40):
        assert subsampled_rdp(a, 1.0, base) == base[a - 2]
        for q in (0.001, 0.1, 0.5, 0.99):
            assert subsampled_rdp(a, q, base) <= base[a - 2]


@pytest.mark.parametrize("q,sigma", [(0.001, 1.0), (0.004, 1.2), (0.01, 2.0)])
def test_subsampling_matches_opacus_subsampled_gaussian(q, sigma):
    """Fed the Gaussian RDP, the general bound is ≥ Opacus' tight subsampled-Gaussian RDP (it is
    an upper bound) and close to it at the orders that set ε (factor 3 only from l ≥ 3 on)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    base = _gauss_base(sigma)
    ours = np.array([subsampled_rdp(a, q, base) for a in ORDERS])
    theirs = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(ORDERS)))
    assert np.all(ours >= theirs * (1 - 1e-9))
    assert ours[0] == pytest.approx(theirs[0], rel=0.02)  # α = 2
    e_ours = rdp_to_epsilon(ours * 1000, 1e-6)
    e_theirs = rdp_to_epsilon(theirs * 1000, 1e-6)
    assert e_theirs <= e_ours <= e_theirs * 1.35, (e_ours, e_theirs)


# ---- ε under both assumptions ----------------------------------------------------------------


def _round(t: int = 3, q: float = 0.01, sigma: float = 1.0, n: int = 1) -> SkellamRound:
    c, d = 1.0, 1000
    s = choose_scale(c, d)
    return SkellamRound(
        sample_rate=q,
        share_variance=share_variance(sigma, s, c, t),
        min_honest_regions=t,
        scale=s,
        clip_norm=c,
        dimension=d,
        rounds=n,
    )


def test_distributed_eps_is_the_gaussian_one_and_own_noise_is_worse():
    r = _round(t=3, n=200)
    eps = epsilons([r], 1e-6)
    from opacus.accountants.analysis.rdp import compute_rdp

    # t shares reach σ s C: ε is close to the subsampled Gaussian's at σ (rounding: ≤ 1%)
    g = rdp_to_epsilon(
        np.asarray(compute_rdp(q=0.01, noise_multiplier=1.0, steps=200, orders=list(ORDERS))), 1e-6
    )
    assert g <= eps["distributed"] <= g * 1.3
    assert eps["own_noise"] > 1.4 * eps["distributed"]  # σ/√3 alone protects much less
    one = _round(t=1, n=200)
    assert epsilon([one], 1e-6, "own_noise") == pytest.approx(epsilon([one], 1e-6, "distributed"))
    assert epsilon([_round(n=100)], 1e-6, "distributed") < eps["distributed"]
    assert np.all(skellam_round_rdp(r, "own_noise") >= skellam_round_rdp(r, "distributed"))


# ---- policy -----------------------------------------------------------------------------------


def test_policy_trust_fields():
    assert parse_policy(BASE.format(budget=3)).trust_model == "local"
    p = policy()
    assert (p.trust_model, p.min_honest_regions, p.enforce_on) == ("distributed", 3, "own_noise")
    with pytest.raises(PolicyError, match="min_honest_regions: required"):
        policy(extra='trust_model = "distributed"\n')
    with pytest.raises(PolicyError, match="min_honest_regions"):
        policy(extra='trust_model = "distributed"\nmin_honest_regions = 1\n')
    with pytest.raises(PolicyError, match="only applies to trust_model = 'distributed'"):
        policy(extra="min_honest_regions = 3\n")
    with pytest.raises(PolicyError, match="enforce_on"):
        policy(extra='trust_model = "distributed"\nmin_honest_regions = 2\nenforce_on = "x"\n')
    with pytest.raises(PolicyError, match="only applies to trust_model = 'distributed'"):
        parse_policy(BASE.format(budget=3) + 'enforce_on = "distributed"\n')


def test_a_local_policy_written_out_in_full_loads_again(tmp_path):
    """The experiments write every field of a policy (defaults included): that must load."""
    import tomli_w

    local = parse_policy(BASE.format(budget=3))
    dumped = tomli_w.dumps(local.model_dump(exclude_none=True))
    assert 'enforce_on = "own_noise"' in dumped
    assert parse_policy(dumped) == local


# ---- plan, ledger, verify ---------------------------------------------------------------------

KW = {"noise_multiplier": 1.0, "clip_norm": 1.0, "sample_rate": 0.02, "dimension": 500}


def test_plan_refuses_on_the_enforced_assumption():
    strict = policy(budget=3.0)
    trusting = policy(budget=3.0, extra=_trusting())
    hist = [_round(q=0.02, n=40).model_copy(update={"dimension": 500})]
    with pytest.raises(DistributedBudgetExceeded, match="own_noise"):
        plan_distributed_release(strict, skellam_history=hist, **KW)
    plan = plan_distributed_release(trusting, skellam_history=hist, **KW)
    assert plan.epsilon_enforced == plan.epsilon_distributed < 3.0 < plan.epsilon_own_noise
    with pytest.raises(PolicyError, match="trust_model"):
        plan_distributed_release(parse_policy(BASE.format(budget=3)), **KW)


def _trusting() -> str:
    return 'trust_model = "distributed"\nmin_honest_regions = 3\nenforce_on = "distributed"\n'


def _release_line(pol, led: Ledger, rnd: int, **forge) -> dict:
    plan = plan_from_ledger(led, pol, **KW)
    rec = {
        "kind": "release",
        "schema": 1,
        "region": "eu",
        "fleet_id": "f",
        "run_id": "run",
        "round": rnd,
        "private": True,
        "rng": "numpy Generator seeded from the OS",
        "time": f"2026-11-29T10:{rnd:02d}:00+00:00",
        "model": "mlp",
        "lr": 0.1,
        "vehicles": 5000,
        "public_fleet_size": False,
        "expected_vehicles_per_step": 100,  # q = 100 / 5000 = KW's 0.02
        "frames_per_vehicle": 4,
        "normalisation": "sum of clipped vehicle gradients + Skellam share, secure sum",
        "update_norm": 0.5,
        "update_sha256": f"{rnd:064x}",
        "code_version": "test",
        "method": "per-vehicle gradients",
        **record_fields(plan, pol),
    }
    rec.update(forge)
    return rec


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "eu.jsonl")
    led.create(
        region="eu",
        fleet_id="f",
        vehicles=5000,
        delta=1e-6,
        epsilon_budget=8.0,
        private=True,
        created="2026-11-29T00:00:00+00:00",
    )
    return led


def test_ledger_records_both_eps_and_verify_recomputes_them(ledger):
    pol = policy()
    for rnd in (1, 2, 3):
        ledger.append(_release_line(pol, ledger, rnd))
    rel = Ledger(ledger.path).releases()
    assert [r["distributed_history"][0][-1] for r in rel] == [1, 2, 3]
    from fedfsd.privacy.release_record import RELEASE_KEYS

    assert set(record_fields(plan_from_ledger(ledger, pol, **KW), pol)) <= RELEASE_KEYS
    last = rel[-1]
    assert last["epsilon_distributed"] < last["epsilon_own_noise"] == last["epsilon_prv"]
    assert Ledger(ledger.path).epsilon() == pytest.approx(last["epsilon_own_noise"])
    # the ledger's spend holds both parts, so a local round or a metric on it composes them
    # (tests/test_privacy_ledger_mixed.py runs one); only the Gaussian-only history() refuses
    spend = Ledger(ledger.path).spend()
    assert spend.mixed and spend.gaussian == [] and spend.skellam[0].rounds == 3
    assert spend.epsilon(1e-6, "own_noise") == pytest.approx(last["epsilon_own_noise"])
    assert spend.epsilons(1e-6)["distributed"] == pytest.approx(last["epsilon_distributed"])
    with pytest.raises(LedgerError, match="Ledger.spend"):
        Ledger(ledger.path).history()
    v = verify_ledger_alone(ledger.path)
    assert v.ok, v.problems


@pytest.mark.parametrize("key", ["epsilon_distributed", "epsilon_own_noise"])
def test_verify_fails_on_a_forged_epsilon(ledger, key):
    """A region that signs a line with a lowered ε (a validly chained, signed forgery)."""
    pol = policy()
    ledger.append(_release_line(pol, ledger, 1))
    honest = _release_line(pol, ledger, 2)
    ledger.append({**honest, key: honest[key] * 0.5})
    v = verify_ledger_alone(ledger.path)
    assert not v.ok
    assert any(key in p and "recomputes" in p for p in v.problems), v.problems


def test_verify_fails_on_a_forged_share(ledger):
    """A share smaller than (σ s C)²/t, recorded consistently in the history: ledger loads,
    verify names the share (its ε values were computed from the honest share)."""
    pol = policy()
    line = _release_line(pol, ledger, 1)
    small = line["noise_share_variance"] / 4
    hist = [[*line["distributed_history"][0][:1], small, *line["distributed_history"][0][2:]]]
    ledger.append({**line, "noise_share_variance": small, "distributed_history": hist})
    assert len(Ledger(ledger.path).records()) == 2
    v = verify_ledger_alone(ledger.path)
    assert any("noise_share_variance" in p for p in v.problems), v.problems


def test_ledger_refuses_a_history_that_does_not_extend(ledger):
    pol = policy()
    ledger.append(_release_line(pol, ledger, 1))
    good = _release_line(pol, ledger, 2)
    ledger.append({**good, "distributed_history": good["distributed_history"][:0]})
    with pytest.raises(LedgerError, match="distributed_history does not extend"):
        Ledger(ledger.path).records()


def test_old_local_lines_are_unchanged(ledger):
    """A local release line has no distributed key, and loading it is today's check."""
    ledger.append(
        {
            "kind": "release",
            "schema": 1,
            "run_id": "run",
            "round": 1,
            "private": True,
            "noise_multiplier": 1.0,
            "sample_rate": 0.01,
            "steps": 5,
            "accountant_history": [[1.0, 0.01, 5]],
        }
    )
    led = Ledger(ledger.path)
    assert led.distributed_history() == []
    assert led.epsilon(1e-6, accountant="rdp") > 0
    assert "trust_model" not in json.loads(ledger.path.read_text().splitlines()[-1])


# ---- reports and `fedfsd privacy verify` -------------------------------------------------------


@pytest.fixture
def distributed_ledger(ledger):
    pol = policy()
    for rnd in (1, 2, 3):
        ledger.append(_release_line(pol, ledger, rnd))
    return ledger.path


def test_report_states_both_eps_and_verifies(distributed_ledger, tmp_path):
    from fedfsd.privacy.report import build_report
    from fedfsd.privacy.report_checks import verify_report
    from fedfsd.privacy.report_render import to_markdown
    from fedfsd.privacy.verify_ledger import verify_with_ledger

    rep = build_report(distributed_ledger)
    d = rep.distributed
    last = Ledger(distributed_ledger).releases()[-1]
    assert d.epsilon_distributed == pytest.approx(last["epsilon_distributed"])
    assert d.epsilon_own_noise == pytest.approx(last["epsilon_own_noise"])
    assert rep.accounting.epsilon == pytest.approx(d.epsilon_own_noise)  # enforced
    assert d.assumption_distributed == (
        "if at least 3 regions are honest and secure aggregation holds"
    )
    assert "if at least 3 regions are honest" in rep.statement
    assert "if every other region cheated" in rep.statement
    v = verify_report(rep)
    assert v.ok, v.problems
    v = verify_with_ledger(rep, distributed_ledger)
    assert v.ok, v.problems
    md = to_markdown(rep, tmp_path / "r.png")
    assert "if every other region cheated" in md and "Distributed noise" in md


@pytest.mark.parametrize("field", ["epsilon_distributed", "epsilon_own_noise"])
def test_verify_fails_on_a_forged_report_eps(distributed_ledger, field):
    from fedfsd.privacy.report import build_report
    from fedfsd.privacy.report_checks import verify_report

    rep = build_report(distributed_ledger)
    setattr(rep.distributed, field, getattr(rep.distributed, field) * 0.8)
    v = verify_report(rep)
    assert not v.ok
    assert any("recomputes to" in p for p in v.problems), v.problems


def test_cli_verify_ledger_alone(distributed_ledger, capsys):
    from typer.testing import CliRunner

    from fedfsd.cli import app

    res = CliRunner().invoke(app, ["privacy", "verify", "--ledger", str(distributed_ledger)])
    assert res.exit_code == 0, res.output
    assert "OK ledger" in res.output
    led = Ledger(distributed_ledger)
    line = _release_line(policy(), led, 4)
    led.append({**line, "epsilon_own_noise": 0.01})
    res = CliRunner().invoke(app, ["privacy", "verify", "--ledger", str(distributed_ledger)])
    assert res.exit_code == 1
    assert "epsilon_own_noise is recorded as 0.01" in res.output


def test_planner_sigma_under_both_assumptions():
    from fedfsd.privacy.planner import plan_distributed_sigma

    p = plan_distributed_sigma(
        2000, 3.0, 1e-6, 50, regions=4, min_honest_regions=3, vehicles_per_step=64, dimension=500
    )
    assert p.sigma_distributed < p.sigma_own_noise
    r = SkellamRound(
        sample_rate=p.sample_rate,
        share_variance=share_variance(p.sigma_distributed, p.scale, 1.0, 3),
        min_honest_regions=3,
        scale=p.scale,
        clip_norm=1.0,
        dimension=500,
        rounds=50,
    )
    assert 0.98 * 3.0 <= epsilon([r], 1e-6, "distributed") <= 3.0


def test_cli_plan_distributed():
    from typer.testing import CliRunner

    from fedfsd.cli import app

    args = ["privacy", "plan", "--vehicles", "2000", "--epsilon", "3", "--delta", "1e-6"]
    args += ["--rounds", "20", "--trust-model", "distributed", "--regions", "3"]
    res = CliRunner().invoke(app, [*args, "--min-honest", "2", "--dimension", "500", "--json", "-"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{") :])
    assert out["sigma_distributed"] < out["sigma_own_noise"]
    res = CliRunner().invoke(app, [*args, "--min-honest", "4"])
    assert res.exit_code == 2 and "--min-honest 4" in res.output


def test_subsampled_skellam_bound_holds_against_the_true_mixture_divergence():
    """Poisson-subsampled 1-D Skellam: the add/remove neighbours give (1−q)·Sk + q·Sk(+Δ) and Sk;
    both Rényi divergences, summed directly, stay below the Thm 6 bound on the Skellam RDP."""
    variance, shift, q = 10.0, 2, 0.1
    half = int(30 * math.sqrt(variance)) + 40
    k = np.arange(-half, half + 1)
    lq = skellam.logpmf(k, variance / 2, variance / 2)
    lp = np.logaddexp(
        np.log1p(-q) + lq, np.log(q) + skellam.logpmf(k - shift, variance / 2, variance / 2)
    )
    base = [skellam_rdp(a, shift, shift, variance) for a in range(2, 17)]
    for alpha in (2, 3, 4, 8, 16):
        bound = subsampled_rdp(alpha, q, base)
        for a_, b_ in ((lp, lq), (lq, lp)):
            true = float(logsumexp(alpha * a_ + (1 - alpha) * b_)) / (alpha - 1)
            assert true <= bound + 1e-12, (alpha, true, bound)
