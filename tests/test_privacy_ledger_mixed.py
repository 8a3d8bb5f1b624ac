"""One ledger with local (Gaussian) and distributed (Skellam) releases (issue 15, item 2).

A region runs plain and secure rounds on one ledger (one budget per vehicle fleet): ε composes
every release under each assumption, in RDP. Real accountants, real local rounds, in-process.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedfsd.config import TrainRequest, parse_policy
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.models import build_model, get_weights
from fedfsd.privacy.accounting import compute_epsilon, extend_history
from fedfsd.privacy.distributed_accounting import ORDERS, epsilons, skellam_round_rdp
from fedfsd.privacy.distributed_release import plan_from_ledger, record_fields
from fedfsd.privacy.ledger import Ledger, LedgerError
from fedfsd.privacy.local_round import BudgetExceeded, run_local_round
from fedfsd.privacy.report import build_report, is_metric, skellam_history_of
from fedfsd.privacy.report_checks import verify_report
from fedfsd.privacy.verify_ledger import verify_with_ledger

pytestmark = pytest.mark.secagg  # distributed noise on a region ledger (issue 15)

DELTA = 1e-3
LOCAL = """
region = "synthetic"
epsilon_budget = {budget}
delta = 1e-3
min_noise_multiplier = 1.0
max_clip_norm = 1.0
update_norm_bound = 0.5
max_local_steps = 200
allowed_metrics = ["loss"]
"""
SECURE = 'trust_model = "distributed"\nmin_honest_regions = 3\n'
REQ = TrainRequest(
    local_steps=5, lr=0.05, noise_multiplier=1.0, vehicles_per_step=10, frames_per_vehicle=4
)
# One DP-FedSGD round: q = 10 / 100 vehicles, as the local rounds.
KW = {"noise_multiplier": 2.0, "clip_norm": 1.0, "sample_rate": 0.1, "dimension": 500}


def local_policy(budget: float = 50.0):
    return parse_policy(LOCAL.format(budget=budget))


def secure_policy(budget: float = 50.0, trusting: bool = False):
    enforce = 'enforce_on = "distributed"\n' if trusting else ""
    return parse_policy(LOCAL.format(budget=budget) + SECURE + enforce)


def _distributed_line(led: Ledger, fleet_id: str, rnd: int, trusting: bool = False) -> dict:
    """A distributed release line as fedfsd.region.secure_release writes it (its ε fields from
    the real plan on this ledger's histories); `trusting`: enforced on the distributed ε."""
    pol = secure_policy(trusting=trusting)
    return {
        "kind": "release",
        "schema": 1,
        "region": "synthetic",
        "fleet_id": fleet_id,
        "run_id": "secure",
        "round": rnd,
        "private": True,
        "rng": "numpy Generator seeded from the OS",
        "time": f"2026-11-30T01:{rnd:02d}:00+00:00",
        "model": "mlp",
        "lr": 0.05,
        "vehicles": 100,
        "public_fleet_size": False,
        "expected_vehicles_per_step": 10,
        "frames_per_vehicle": 4,
        "normalisation": "sum of clipped vehicle gradients + Skellam share, secure sum",
        "update_norm": 0.5,
        "update_sha256": f"{rnd:064x}",
        "code_version": "test",
        "method": "per-vehicle gradients",
        **record_fields(plan_from_ledger(led, pol, **KW), pol),
    }


def composed_by_hand(led: Ledger, assumption: str) -> float:
    """An independent composition: Opacus' RDP of each Gaussian entry plus each Skellam round's
    RDP (distributed_accounting's per-release curve), summed and converted by Opacus."""
    rdp = np.zeros(len(ORDERS))
    for sigma, q, steps in led.gaussian_history():
        rdp += np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS))
    for r in led.distributed_history():
        rdp += r.rounds * skellam_round_rdp(r, assumption)  # type: ignore[arg-type]
    return float(get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=DELTA)[0])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """local 0, local 1 | distributed 2, 3 | local 4 (plain on a mixed ledger) | distributed 5.

    Returns the ledger path and what each step returned or recorded."""
    frames = make_synthetic_frames(100, 6, seed=0)
    w = get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))
    path = tmp_path_factory.mktemp("mixed") / "synthetic.jsonl"
    out: dict = {"frames": frames, "path": path}
    r0 = run_local_round(frames, local_policy(), path, w, REQ, "plain", 0, "mlp")
    r1 = run_local_round(frames, local_policy(), path, r0.new_weights, REQ, "plain", 1, "mlp")
    led = Ledger(path)
    out["gaussian_only"] = (
        r1,
        led.gaussian_history(),
        led.epsilon(),
        led.epsilon(accountant="rdp"),
    )
    fleet = led.header["fleet_id"]
    for rnd in (2, 3):
        led.append(_distributed_line(Ledger(path), fleet, rnd))
    led = Ledger(path)
    out["before_plain"] = led.spend()
    out["r4"] = run_local_round(
        frames, local_policy(), path, r1.new_weights, REQ, "plain", 4, "mlp"
    )
    out["after_plain"] = Ledger(path).spend()
    # enforced on the distributed ε this time: the recorded (enforced) ε goes down
    Ledger(path).append(_distributed_line(Ledger(path), fleet, 5, trusting=True))
    out["weights"] = out["r4"].new_weights
    # a differentially private metric (Gaussian, q = 1) on the mixed ledger
    from fedfsd.privacy.metrics import release_metrics

    out["before_metric"] = Ledger(path).spend()
    out["metric"] = release_metrics(
        path,
        local_policy(),
        run_id="plain",
        round_idx=4,
        phase="evaluate",
        model_sha256="0" * 64,
        score=lambda: {"loss": np.linspace(0.0, 1.0, 100)},
    )
    return out


def test_gaussian_only_ledger_keeps_todays_prv_epsilon(mixed):
    r1, hist, eps, eps_rdp = mixed["gaussian_only"]
    assert hist == [(1.0, 0.1, 10)]
    assert eps == compute_epsilon(hist, DELTA, "prv") == r1.epsilon  # exactly today's number
    assert eps_rdp == compute_epsilon(hist, DELTA, "rdp") == r1.epsilon_rdp
    first = Ledger(mixed["path"]).releases()[1]
    assert "epsilon_own_noise" not in first and "distributed_history" not in first


def test_plain_round_on_a_mixed_ledger_composes_both_parts(mixed):
    r4, before, after = mixed["r4"], mixed["before_plain"], mixed["after_plain"]
    assert before.mixed and after.skellam == before.skellam
    assert after.gaussian == extend_history(before.gaussian, 1.0, 0.1, 5)
    line = Ledger(mixed["path"]).releases()[4]
    assert "trust_model" not in line  # a local release
    # ε of the plain round is the composition under the enforced (own-noise) assumption ...
    assert line["enforce_on"] == "own_noise"
    assert r4.epsilon == line["epsilon_prv"] == line["epsilon_own_noise"] == r4.epsilon_rdp
    assert line["distributed_history"] == [r.as_list() for r in before.skellam]
    eps = after.epsilons(DELTA)
    assert line["epsilon_distributed"] == eps["distributed"] < eps["own_noise"] == r4.epsilon
    # ... at least each part alone (Gaussian in RDP and PRV, Skellam alone under each assumption)
    gauss_only = compute_epsilon(after.gaussian, DELTA, "rdp")
    assert gauss_only >= compute_epsilon(after.gaussian, DELTA, "prv")
    for a in ("distributed", "own_noise"):
        assert eps[a] > gauss_only
        assert eps[a] > epsilons(after.skellam, DELTA)[a]


def test_mixed_epsilon_equals_an_independent_rdp_composition(mixed):
    led = Ledger(mixed["path"])
    assert [r.rounds for r in led.distributed_history()] == [3]  # rounds 2, 3 and 5
    assert len(led.metric_releases()) == 1  # and a metric release after them
    for a in ("distributed", "own_noise"):
        assert led.epsilon(assumption=a) == pytest.approx(composed_by_hand(led, a), rel=1e-12)
    assert led.epsilon() == led.epsilon(assumption="own_noise")  # enforced: the last line's
    assert led.epsilon(accountant="rdp") == led.epsilon()  # PRV cannot take Skellam: RDP
    with pytest.raises(LedgerError, match="Ledger.spend"):
        led.history()  # the Gaussian history alone would under-count


def test_distributed_round_after_a_plain_one_extends_the_same_ledger(mixed):
    led = Ledger(mixed["path"])
    last = led.releases()[-1]
    assert last["trust_model"] == "distributed" and last["round"] == 5
    assert [tuple(h) for h in last["accountant_history"]] == mixed["after_plain"].gaussian
    assert last["epsilon_own_noise"] == pytest.approx(
        mixed["before_metric"].epsilon(DELTA, "own_noise"), rel=1e-12
    )
    assert last["epsilon_own_noise"] > mixed["r4"].epsilon
    # this round's policy enforces the distributed ε: below the last local line's own-noise ε,
    # yet each assumption's ε grew (the report below verifies with it)
    assert last["enforce_on"] == "distributed"
    assert last["epsilon_prv"] == last["epsilon_distributed"] < mixed["r4"].epsilon
    r4 = Ledger(mixed["path"]).releases()[4]
    assert last["epsilon_distributed"] > r4["epsilon_distributed"]


def _unchanged(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_budget_refusal_uses_the_composed_epsilon(mixed):
    """A budget the Gaussian part alone would pass: refused, nothing trained or recorded."""
    path, frames = mixed["path"], mixed["frames"]
    spend = Ledger(path).spend()
    after = spend.plus_gaussian(1.0, 0.1, 5)
    gauss_alone = compute_epsilon(after.gaussian, DELTA, "prv")  # what the old check projected
    composed = after.epsilon(DELTA, "own_noise")
    budget = (gauss_alone + composed) / 2
    assert gauss_alone < budget < composed
    before = _unchanged(path)
    with pytest.raises(BudgetExceeded) as e:
        run_local_round(
            frames, local_policy(budget), path, mixed["weights"], REQ, "plain", 6, "mlp"
        )
    assert e.value.spent == pytest.approx(spend.epsilon(DELTA, "own_noise"))
    assert e.value.projected == pytest.approx(composed)
    assert _unchanged(path) == before


def test_preflight_refuses_a_run_on_the_composed_epsilon(mixed):
    from fedfsd.region.preflight import RunUnaffordable, check_run

    path = mixed["path"]
    spend = Ledger(path).spend()
    after = spend.plus_gaussian(1.0, 0.1, 5 * 2)
    gauss_alone = compute_epsilon(after.gaussian, DELTA, "prv")  # what it projected before
    dist, own = after.epsilon(DELTA, "distributed"), after.epsilon(DELTA, "own_noise")
    budget = (dist + own) / 2
    assert gauss_alone < dist < budget < own
    kw = {"round_idx": 1, "total_rounds": 2, "sigma": 1.0, "q": 0.1, "steps": 5, "delta": DELTA}
    with pytest.raises(RunUnaffordable, match="would bring ε from"):
        check_run(path, run_id="pre-own", budget=budget, **kw)
    # enforced on the distributed assumption (t honest shares), the same plan fits
    p = check_run(path, run_id="pre-dist", budget=budget, enforce_on="distributed", **kw)
    assert p is not None and p.fits


def test_metric_release_on_a_mixed_ledger_composes(mixed):
    path, m = mixed["path"], mixed["metric"]
    line = Ledger(path).metric_releases()[-1]
    want = mixed["before_metric"].plus_gaussian(5.0, 1.0, 1).epsilon(DELTA, "own_noise")
    assert m.epsilon == line["epsilon_prv"] == pytest.approx(want, rel=1e-12)
    assert line["epsilon_own_noise"] == m.epsilon > line["epsilon_distributed"]
    assert Ledger(path).epsilon() == pytest.approx(want, rel=1e-12)
    assert Ledger(path).epsilon() > Ledger(path).releases()[-1]["epsilon_own_noise"]


# ---- reports and verification ----------------------------------------------------------------


@pytest.fixture(scope="module")
def report(mixed):
    return build_report(mixed["path"])


def test_mixed_report_states_both_composed_eps_and_verifies(mixed, report, tmp_path):
    from fedfsd.privacy.report_render import to_markdown

    led = Ledger(mixed["path"])
    d, a = report.distributed, report.accounting
    eps = led.epsilons()
    assert d.epsilon_distributed == pytest.approx(eps["distributed"], rel=1e-9)
    assert d.epsilon_own_noise == pytest.approx(eps["own_noise"], rel=1e-9)
    assert a.epsilon == a.epsilon_rdp == d.epsilon_own_noise  # enforced, RDP
    assert [r.distributed for r in report.releases if not is_metric(r)] == [
        False, False, True, True, False, True,
    ]  # fmt: skip
    # 3 local updates and the metric release, 3 distributed rounds
    assert any(n.startswith("mixed ledger: 4 local") for n in report.notes), report.notes
    assert not any("the ledger recorded" in n for n in report.notes), report.notes
    # round 5 was enforced on the distributed ε, the metric release after it on own noise
    moved = [n for n in report.notes if n.startswith("the budget's assumption changed")]
    assert moved == [
        "the budget's assumption changed from own_noise to distributed at run secure round 5: "
        "the headline ε is the one under the assumption enforced last (own_noise); the other "
        "is stated beside it",
        "the budget's assumption changed from distributed to own_noise at run plain round 4: "
        "the headline ε is the one under the assumption enforced last (own_noise); the other "
        "is stated beside it",
    ], report.notes
    v = verify_report(report)
    assert v.ok, v.problems
    v = verify_with_ledger(report, mixed["path"])
    assert v.ok, v.problems
    md = to_markdown(report, tmp_path / "r.png")
    assert "Mixed ledger: both ε above also compose the 4 local" in md


def _copy(rep):
    out = type(rep)()
    out.CopyFrom(rep)
    return out


def _drop(rep, distributed: bool):
    out = _copy(rep)
    i = [j for j, r in enumerate(out.releases) if r.distributed == distributed][0]
    del out.releases[i]
    return out


def _lower(rep, field: str):
    out = _copy(rep)
    setattr(out.distributed, field, getattr(out.distributed, field) * 0.8)
    return out


def _hide_a_round(rep):
    """Skellam history one round short, every ε recomputed to match: self-consistent but for
    the release it no longer counts."""
    out = _copy(rep)
    out.distributed.history[-1].rounds -= 1
    gauss = [(h.noise_multiplier, h.sample_rate, h.steps) for h in out.accounting.history]
    eps = epsilons(skellam_history_of(out.distributed.history), DELTA, gauss)
    out.distributed.epsilon_distributed = eps["distributed"]
    out.distributed.epsilon_own_noise = eps["own_noise"]
    out.accounting.epsilon = out.accounting.epsilon_rdp = eps["own_noise"]
    b = out.budget
    b.epsilon_spent = eps["own_noise"]
    b.epsilon_remaining = b.epsilon_budget - eps["own_noise"]
    return out


@pytest.mark.parametrize(
    ("forge", "says"),
    [
        (lambda r: _lower(r, "epsilon_own_noise"), "ε (own noise) is reported as"),
        (lambda r: _lower(r, "epsilon_distributed"), "ε (distributed) is reported as"),
        (lambda r: _drop(r, distributed=True), "distributed release(s) (a release dropped"),
        (lambda r: _drop(r, distributed=False), "accountant history has"),
        (_hide_a_round, "the Skellam history has 2 round(s) but the report lists 3"),
    ],
    ids=["own-noise-lowered", "distributed-lowered", "secure-dropped", "plain-dropped", "hidden"],
)
def test_forged_mixed_report_fails_verification(report, forge, says):
    assert verify_report(report).ok
    v = verify_report(forge(report))
    assert not v.ok
    assert any(says in p for p in v.problems), v.problems


def test_forged_mixed_report_fails_against_the_ledger(mixed, report):
    """ε lowered consistently in the whole report: only the ledger's histories show it."""
    forged = _hide_a_round(report)
    v = verify_with_ledger(forged, mixed["path"])
    assert not v.ok
    assert any("recomputes to" in p for p in v.problems), v.problems


@pytest.mark.parametrize("key", ["epsilon_own_noise", "epsilon_distributed", "epsilon_prv"])
def test_ledger_alone_recomputes_a_local_line_on_a_mixed_ledger(mixed, tmp_path, key):
    """`fedfsd privacy verify --ledger` alone: the honest mixed ledger verifies; a validly
    chained, signed copy whose plain round 4 states a lowered ε fails, naming the field."""
    import json
    import shutil

    from fedfsd.privacy import signing
    from fedfsd.privacy.verify_ledger import verify_ledger_alone

    src = mixed["path"]
    v = verify_ledger_alone(src)
    assert v.ok, v.problems
    lines = src.read_text().splitlines()
    i = next(
        n
        for n, line in enumerate(lines)
        if (r := json.loads(line)).get("kind") == "release" and r.get("round") == 4
    )
    forged = tmp_path / "forged.jsonl"
    forged.write_text("\n".join(lines[:i]) + "\n")
    shutil.copy(signing.ledger_key_path(src), signing.ledger_key_path(forged))
    rec = json.loads(lines[i])
    assert rec.get("enforce_on") == "own_noise" and rec.get("distributed_history")
    Ledger(forged).append({**rec, key: rec[key] * 0.5})
    v = verify_ledger_alone(forged)
    assert not v.ok
    assert any(key in p and "mixed ledger" in p for p in v.problems), v.problems


def test_ledger_show_names_the_mixed_composition(mixed):
    """`privacy ledger show` must not call a mixed ledger's RDP composition a PRV ε."""
    import json

    from typer.testing import CliRunner

    from fedfsd.cli import app

    led = Ledger(mixed["path"])
    both = led.epsilons()
    out = CliRunner().invoke(app, ["privacy", "ledger", "show", str(mixed["path"]), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["accountant"] == "rdp-mixed" and doc["epsilon_prv"] is None
    assert doc["enforce_on"] == led.enforce_on()  # the last spending line names it
    assert doc["epsilon"] == led.epsilon() == both[led.enforce_on()]
    assert doc["epsilon_own_noise"] == both["own_noise"] > doc["epsilon_distributed"]
    table = CliRunner().invoke(app, ["privacy", "ledger", "show", str(mixed["path"])])
    assert table.exit_code == 0, table.output
    assert "RDP composition" in table.output and "(PRV;" not in table.output
