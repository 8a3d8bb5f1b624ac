"""ε reports built from real ledgers: content, run selection, renderings, summary, CLI."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest
from test_report_fixtures import real_ledgers, written_ledger

from fedfsd.privacy.accounting import compute_epsilon
from fedfsd.privacy.ledger import Ledger
from fedfsd.privacy.report import (
    ReportError,
    build_global_summary,
    build_report,
    load_json,
    to_json,
    write_reports,
)
from fedfsd.privacy.report_checks import verify_files, verify_report, verify_summary


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return real_ledgers(tmp_path_factory.mktemp("ledgers"))


def test_report_from_real_ledger_states_everything_and_verifies(ledgers):
    rep = build_report(ledgers["eu"])
    led = Ledger(ledgers["eu"])
    last = led.releases()[-1]
    assert rep.region == "eu" and rep.private_training
    assert rep.unit.unit == "vehicle" and "add/remove" in rep.unit.adjacency
    assert rep.unit.max_frames_per_vehicle_per_step == 4 and rep.unit.clip_norm == 1.0
    m = rep.mechanism
    assert (m.vehicles, m.expected_vehicles_per_step) == (40, 8)
    assert m.sample_rate == pytest.approx(8 / 40)
    assert m.sampling == "poisson" and m.amplification_by_sampling
    assert (m.rounds, m.total_steps, m.steps_per_round) == (2, 8, 4)
    assert [r.cumulative_steps for r in rep.releases] == [4, 8]
    assert "torch" in m.rng and m.normalisation
    a = rep.accounting
    assert [(h.noise_multiplier, h.sample_rate, h.steps) for h in a.history] == led.history()
    assert a.epsilon == pytest.approx(last["epsilon_prv"], rel=1e-6)
    assert a.epsilon_rdp == pytest.approx(last["epsilon_rdp"], rel=1e-6)
    assert a.epsilon_rdp > a.epsilon > 0
    assert "1/40" in a.delta_rule
    assert rep.budget.epsilon_remaining == pytest.approx(20.0 - a.epsilon)
    assert list(rep.provenance.run_ids) == ["run-1", "run-2"]
    assert rep.provenance.code_version == "0.1.0"
    parties = {p.name: p.trusted for p in rep.trust.parties}
    assert parties["global aggregator"] is False and any(parties.values())
    assert any("global model" in c for c in rep.scope.covered)
    assert any("tuning" in c for c in rep.scope.not_covered)
    assert not rep.notes
    v = verify_report(rep)
    assert v.ok, v.problems
    assert v.recomputed["accountant history:dp_accounting_pld"] == pytest.approx(
        a.epsilon, rel=0.02
    )


def test_run_selection_keeps_earlier_runs_and_drops_later(ledgers):
    rep = build_report(ledgers["eu"], run_id="run-1")
    assert [(r.run_id, r.round) for r in rep.releases] == [("run-1", 1)]
    assert rep.accounting.epsilon == pytest.approx(
        compute_epsilon([(1.0, 0.2, 4)], 1e-4, "prv"), rel=1e-6
    )
    assert verify_report(rep).ok
    with pytest.raises(ReportError, match="no release of run 'nope'.*run-1, run-2"):
        build_report(ledgers["eu"], run_id="nope")


def test_json_roundtrip_is_canonical_protobuf_mapping(ledgers):
    rep = build_report(ledgers["cn"])
    text = to_json(rep)
    data = json.loads(text)
    assert data["unit"]["unit"] == "vehicle"
    assert data["accounting"]["headlineAccountant"] == "prv"
    assert data["mechanism"]["expectedVehiclesPerStep"] == 8
    path = Path(ledgers["cn"]).with_suffix(".report.json")
    path.write_text(text)
    assert load_json(path) == rep


def test_write_reports_html_embeds_plot_and_markdown_renders(ledgers, tmp_path):
    from markdown_it import MarkdownIt

    paths = write_reports([ledgers["eu"], ledgers["cn"]], tmp_path)
    names = {p.name for p in paths}
    for stem in ("epsilon-eu", "epsilon-cn", "epsilon-global"):
        assert {f"{stem}.json", f"{stem}.md", f"{stem}.html"} <= names
        assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "epsilon-eu.html").read_text()
    m = re.search(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert m is not None
    png = base64.b64decode(m.group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "<table>" in html and "Trust model" in html
    rendered = (
        MarkdownIt("commonmark").enable("table").render((tmp_path / "epsilon-eu.md").read_text())
    )
    assert '<img src="epsilon-eu.png"' in rendered
    assert rendered.count("<table>") >= 4 and "<h1>" in rendered
    assert "run-2" in rendered
    results = verify_files(
        [
            tmp_path / "epsilon-eu.json",
            tmp_path / "epsilon-cn.json",
            tmp_path / "epsilon-global.json",
        ]
    )
    assert all(v.ok for v in results), [v.problems for v in results]


def test_global_summary_flags_and_composes_shared_vehicles(ledgers):
    eu, cn = build_report(ledgers["eu"]), build_report(ledgers["cn"])
    plain = build_global_summary([eu, cn])
    assert not plain.overlap_checked and not plain.overlaps
    assert plain.worst_case_epsilon == pytest.approx(
        max(eu.accounting.epsilon, cn.accounting.epsilon)
    )
    ids = {"eu": ["eu-1", "eu-2", "both-1", "both-2"], "cn": ["cn-1", "both-1", "both-2"]}
    g = build_global_summary([eu, cn], ids)
    assert g.overlap_checked and len(g.overlaps) == 1
    o = g.overlaps[0]
    assert list(o.regions) == ["cn", "eu"] and o.vehicles == 2
    assert o.epsilon > max(eu.accounting.epsilon, cn.accounting.epsilon)
    assert g.worst_case_epsilon == pytest.approx(o.epsilon)
    assert "2 vehicles appear in more than one region" in g.statement
    v = verify_summary(g, [eu, cn])
    assert v.ok, v.problems


def test_non_private_ledger_reports_no_guarantee(tmp_path):
    rep = build_report(written_ledger(tmp_path / "np.jsonl", private=False))
    assert not rep.private_training and math.isinf(rep.accounting.epsilon)
    assert "NON-PRIVATE" in rep.statement
    v = verify_report(rep)
    assert not v.ok and "NON-PRIVATE" in v.problems[0]
    other = build_report(written_ledger(tmp_path / "p.jsonl", "jp", steps=5, rounds=1))
    g = build_global_summary([rep, other])
    assert math.isinf(g.worst_case_epsilon)
    assert verify_summary(g, [rep, other]).problems == [
        "region us is NON-PRIVATE: its vehicles have no DP guarantee"
    ]


def _cli(*args: str):
    """Run `fedfsd privacy ...` in-process (a subprocess would re-import torch and opacus)."""
    from typer.testing import CliRunner

    from fedfsd.cli import app

    return CliRunner().invoke(app, ["privacy", *args])


def test_cli_report_then_verify(ledgers, tmp_path):
    out = tmp_path / "eu.json"
    r = _cli("report", "--ledger", str(ledgers["eu"]), "--run", "run-1", "--out", str(out))
    assert r.exit_code == 0, r.stderr
    assert "region eu: ε =" in r.stdout and out.exists()
    r = _cli("verify", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK ") and "dp-accounting PLD" in r.stdout


def test_cli_report_bad_input_is_one_red_line(tmp_path):
    r = _cli("report", "--ledger", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x"))
    assert r.exit_code == 2
    assert "no such ledger" in r.stderr and "Traceback" not in r.stderr
    r = _cli(
        "report",
        "--ledger",
        str(tmp_path / "missing.jsonl"),
        "--format",
        "pdf",
        "--out",
        str(tmp_path / "x"),
    )
    assert r.exit_code == 2 and "--format 'pdf'" in r.stderr
