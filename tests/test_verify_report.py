"""`verify` catches each kind of tampering with a precise message, and lists every one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf import json_format
from test_report_fixtures import real_ledgers, written_ledger

from fedfsd.privacy.report import build_global_summary, build_report, to_json
from fedfsd.privacy.report_checks import verify_report, verify_summary
from fedfsd.proto.fedfsd.v1 import report_pb2 as pb


@pytest.fixture(scope="module")
def report_json(tmp_path_factory: pytest.TempPathFactory) -> dict:
    led = real_ledgers(tmp_path_factory.mktemp("ledgers"))
    return json.loads(to_json(build_report(led["eu"])))


def _tampered(data: dict, edit: Callable[[dict], None]) -> pb.EpsilonReport:
    d = json.loads(json.dumps(data))
    edit(d)
    return json_format.ParseDict(d, pb.EpsilonReport())


def _problems(data: dict, edit: Callable[[dict], None]) -> list[str]:
    v = verify_report(_tampered(data, edit))
    assert not v.ok
    return v.problems


def _has(problems: list[str], *fragments: str) -> bool:
    return any(all(f in p for f in fragments) for p in problems)


def test_untampered_report_verifies(report_json):
    v = verify_report(_tampered(report_json, lambda d: None))
    assert v.ok, v.problems
    assert v.checks > 30


def test_changed_epsilon(report_json):
    def edit(d):
        d["accounting"]["epsilon"] *= 0.5
        d["budget"]["epsilonSpent"] = d["accounting"]["epsilon"]
        d["budget"]["epsilonRemaining"] = 20.0 - d["accounting"]["epsilon"]

    probs = _problems(report_json, edit)
    assert _has(probs, "ε (PRV) is reported as", "but Opacus PRV recomputes")
    assert _has(probs, "ε (PRV) is reported as", "but dp-accounting PLD recomputes")
    assert _has(probs, "the last release records ε")


def test_changed_rdp_epsilon(report_json):
    probs = _problems(report_json, lambda d: d["accounting"].update(epsilonRdp=1.0))
    assert _has(probs, "ε (RDP) is reported as 1 but Opacus RDP recomputes")
    assert _has(probs, "but dp-accounting RDP recomputes")


def test_changed_history_sigma(report_json):
    probs = _problems(
        report_json, lambda d: d["accounting"]["history"][0].update(noiseMultiplier=2.0)
    )
    assert _has(
        probs,
        "accountant history entry 0 is (σ=2, q=0.2, steps=8)",
        "releases give (σ=1, q=0.2, steps=8)",
    )
    assert _has(probs, "Opacus PRV recomputes")


def test_history_steps_do_not_add_up(report_json):
    probs = _problems(report_json, lambda d: d["accounting"]["history"][0].update(steps="5"))
    assert _has(probs, "accountant history has 5 steps but the releases add up to 8")


def test_release_steps_do_not_add_up(report_json):
    probs = _problems(report_json, lambda d: d["releases"][1].update(steps=7))
    assert _has(probs, "cumulative steps 8, but the steps of the releases so far add up to 11")
    assert _has(probs, "mechanism states 8 total steps but the releases add up to 11")
    assert _has(probs, "accountant history has 8 steps but the releases add up to 11")


def test_changed_q(report_json):
    probs = _problems(report_json, lambda d: d["releases"][0].update(sampleRate=0.1))
    assert _has(
        probs, "release run-1:1: q = 0.1 but expected vehicles per step / vehicles = 8/40 = 0.2"
    )
    probs = _problems(report_json, lambda d: d["mechanism"].update(sampleRate=0.1))
    assert _has(probs, "mechanism q = 0.1 but expected vehicles per step / vehicles = 8/40")


def test_changed_vehicle_count(report_json):
    probs = _problems(report_json, lambda d: d["mechanism"].update(vehicles=400))
    assert _has(probs, "release run-1:1: 40 vehicles, but the mechanism states 400")


def test_changed_delta(report_json):
    probs = _problems(report_json, lambda d: d["accounting"].update(delta=0.05))
    assert _has(probs, "δ = 0.05 is not below 1/vehicles = 1/40 = 0.025")
    assert _has(probs, "Opacus PRV recomputes", "at δ = 0.05")


def test_changed_unit(report_json):
    probs = _problems(report_json, lambda d: d["unit"].update(unit="frame"))
    assert probs == [
        "unit of privacy is 'frame', expected 'vehicle' (frame- or sample-level DP "
        "says little about a vehicle with many frames)"
    ]


def test_gdp_accountant(report_json):
    probs = _problems(report_json, lambda d: d["accounting"].update(headlineAccountant="gdp"))
    assert len(probs) == 1 and probs[0].startswith("headline accountant is 'gdp': GDP is not")
    probs = _problems(report_json, lambda d: d["accounting"].update(crossCheckAccountant="prv"))
    assert probs == ["cross-check accountant is 'prv', expected 'rdp'"]


def test_undeclared_non_poisson_sampler(report_json):
    def edit(d):
        for r in d["releases"]:
            r["sampling"] = "shuffle"

    probs = _problems(report_json, edit)
    assert _has(
        probs,
        "mechanism claims amplification by sampling = True, but releases used "
        "non-Poisson sampler(s) shuffle",
    )
    assert _has(
        probs,
        "sampler shuffle is not Poisson, but the report does not declare ε "
        "without amplification by sampling (recomputed:",
    )


def test_declared_non_poisson_sampler_verifies_and_is_checked(tmp_path):
    rep = build_report(
        written_ledger(
            tmp_path / "s.jsonl", sampling="shuffle", steps=10, per_step=10, vehicles=100
        )
    )
    a = rep.accounting
    assert not rep.mechanism.amplification_by_sampling
    # 10 steps at q = 0.1 is one pass per round: two rounds, two Gaussian releases at q = 1.
    assert [(h.noise_multiplier, h.sample_rate, h.steps) for h in a.no_amplification_history] == [
        (1.0, 1.0, 2)
    ]
    assert a.epsilon_no_amplification > 2 * a.epsilon
    assert "shuffle" in a.no_amplification_method
    v = verify_report(rep)
    assert v.ok, v.problems
    rep.accounting.epsilon_no_amplification = a.epsilon
    assert _has(verify_report(rep).problems, "ε without amplification is reported as")


def test_every_discrepancy_is_listed(report_json):
    def edit(d):
        d["unit"]["unit"] = "sample"
        d["accounting"]["headlineAccountant"] = "gdp"
        d["accounting"]["delta"] = 0.5
        d["releases"][0]["sampleRate"] = 0.3

    probs = _problems(report_json, edit)
    for frag in (
        "unit of privacy is 'sample'",
        "headline accountant is 'gdp'",
        "δ = 0.5 is not below",
        "q = 0.3 but",
    ):
        assert _has(probs, frag), (frag, probs)


def test_tampered_summary(tmp_path):
    a = build_report(written_ledger(tmp_path / "a.jsonl", "us", steps=5, rounds=1))
    b = build_report(written_ledger(tmp_path / "b.jsonl", "jp", sigma=1.5, steps=5, rounds=1))
    g = build_global_summary([a, b], {"us": ["x", "y"], "jp": ["y"]})
    assert verify_summary(g, [a, b]).ok
    g.worst_case_epsilon = a.accounting.epsilon
    g.regions[0].epsilon *= 0.9
    probs = verify_summary(g, [a, b]).problems
    assert _has(probs, "worst-case ε is stated as")
    assert _has(probs, "region us: ε (PRV) is reported as", "Opacus PRV recomputes")
    assert _has(probs, "region us: summary ε", "differs from its report's")


def test_cli_verify_lists_problems_and_exits_nonzero(report_json, tmp_path):
    from typer.testing import CliRunner

    from fedfsd.cli import app

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(report_json))
    d = json.loads(json.dumps(report_json))
    d["unit"]["unit"] = "frame"
    d["accounting"]["delta"] = 0.05
    bad.write_text(json.dumps(d))
    r = CliRunner().invoke(app, ["privacy", "verify", str(good)])
    assert r.exit_code == 0 and r.stdout.startswith(f"OK {good}")
    r = CliRunner().invoke(app, ["privacy", "verify", str(good), str(bad)])
    assert r.exit_code == 1
    assert f"FAILED {bad}" in r.stdout and "  - unit of privacy is 'frame'" in r.stdout
    assert "  - δ = 0.05 is not below" in r.stdout
    junk = tmp_path / "junk.json"
    junk.write_text('{"unit": {"unit": "vehicle"}, "bogus": 1}')
    r = CliRunner().invoke(app, ["privacy", "verify", str(junk)])
    assert r.exit_code == 2 and "not a valid fedfsd.v1.EpsilonReport" in r.stderr
    r = CliRunner().invoke(app, ["privacy", "verify", str(Path(tmp_path, "none.json"))])
    assert r.exit_code == 2 and "no such report file" in r.stderr
