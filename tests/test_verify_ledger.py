"""`fedfsd privacy verify REPORT --ledger LEDGER --receipts RUN_DIR` (issue 12 item 6): each
forgery the audit found (σ rewritten consistently in report and ledger, deleted, reordered or
edited lines, a receipt without a release, another key) fails, naming the line."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfsd.aggregator.receipts import ReceiptBook
from fedfsd.cli import app
from fedfsd.config import TrainRequest, parse_policy
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.models import build_model, get_weights
from fedfsd.privacy import signing
from fedfsd.privacy.accounting import compute_epsilon, normalise_history
from fedfsd.privacy.ledger import Ledger
from fedfsd.privacy.local_round import run_local_round
from fedfsd.privacy.report import build_report, to_json
from fedfsd.region.egress import guard_update, release_manifest

POLICY = parse_policy(
    """
region = "eu"
epsilon_budget = 50.0
delta = 1e-3
min_noise_multiplier = 1.0
max_clip_norm = 1.0
update_norm_bound = 0.5
"""
)
REQ = TrainRequest(
    local_steps=2, lr=0.05, noise_multiplier=1.0, vehicles_per_step=10, frames_per_vehicle=4
)
RUN = "run-v"


def _release(frames, weights, led, rnd, seed=None):
    res = run_local_round(frames, POLICY, led, weights, REQ, RUN, rnd, "mlp", seed=seed)
    rel = guard_update(weights, res.new_weights, POLICY.update_norm_bound)
    return release_manifest(
        led,
        region="eu",
        run_id=RUN,
        round_idx=rnd,
        release=rel,
        record=res.record,
        update_norm_bound=POLICY.update_norm_bound,
        epsilon=res.epsilon,
        epsilon_rdp=res.epsilon_rdp,
        epsilon_budget=res.budget,
        delta=POLICY.delta,
        steps=res.steps,
    )


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """3 released rounds: the region's ledger, the aggregator's run dir, the report."""
    d = tmp_path_factory.mktemp("honest")
    frames = make_synthetic_frames(60, 4, seed=0, region="eu")
    weights = get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))
    led = d / "eu.jsonl"
    run_dir = d / "run"
    key = signing.generate_key(d / "eu.jsonl.key")  # `fedfsd region keygen`, registered
    book = ReceiptBook(run_dir, {"eu": key.public_key()})
    for rnd in (1, 2, 3):
        m = _release(frames, weights, led, rnd)
        assert book.check(m) is None
        book.record(m, rnd)
    report = d / "epsilon-eu.json"
    report.write_text(to_json(build_report(led)))
    return d, led, run_dir, report


def verify(*args) -> tuple[int, str]:
    r = CliRunner().invoke(app, ["privacy", "verify", *map(str, args)])
    return r.exit_code, r.output


def workspace(honest, tmp_path) -> tuple[Path, Path, Path]:
    d, led, run_dir, _ = honest
    for p in d.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp_path / p.name)
    return tmp_path / led.name, tmp_path / run_dir.name, tmp_path / "epsilon-eu.json"


def rewrite(led: Path, edit, key_path: Path | None = None) -> None:
    """Rewrite every line through `edit(record)`, re-chained and re-signed with the region's
    key (what a region operator who holds the key can do)."""
    key = signing.load_private_key(key_path or led.with_name(led.name + ".key"))
    recs = [json.loads(x) for x in led.read_text().splitlines()]
    out, prev = [], ""
    for r in recs:
        r = edit(dict(r))
        if r["kind"] == "open":
            r["public_key"] = signing.public_hex(key.public_key())
        raw = Ledger._line(r, prev, key)
        prev = hashlib.sha256(raw).hexdigest()
        out.append(raw + b"\n")
    led.write_bytes(b"".join(out))


def sigma3(r: dict) -> dict:
    """σ raised to 3 everywhere, history and ε recomputed consistently (the audit's forgery)."""
    if r["kind"] != "release":
        return r
    r["noise_multiplier"] = 3.0
    hist = normalise_history([(3.0, q, n) for _, q, n in r["accountant_history"]])
    r["accountant_history"] = [list(h) for h in hist]
    r["epsilon_prv"] = compute_epsilon(hist, r["delta"], "prv")
    r["epsilon_rdp"] = compute_epsilon(hist, r["delta"], "rdp")
    return r


def test_honest_report_verifies_with_ledger_and_receipts(honest):
    _, led, run_dir, report = honest
    code, out = verify(report, "--ledger", led, "--receipts", run_dir)
    assert code == 0, out
    assert "FAILED" not in out and out.count("OK ") == 2
    code, out = verify(report)
    assert code == 0 and "checked the report(s) alone" in out


def test_consistent_sigma_forgery_fails_on_receipts(honest, tmp_path):
    led, run_dir, report = workspace(honest, tmp_path)
    rewrite(led, sigma3)
    report.write_text(to_json(build_report(led)))
    code, out = verify(report)  # the report alone cannot tell
    assert code == 0, out
    code, out = verify(report, "--ledger", led)  # nor the re-signed ledger alone
    assert code == 0, out
    code, out = verify(report, "--ledger", led, "--receipts", run_dir)
    assert code == 1
    assert "receipts.jsonl:1: receipt names ledger line 2, whose hash differs" in out


def test_release_signed_by_another_key_fails(honest, tmp_path):
    led, run_dir, report = workspace(honest, tmp_path)
    other = tmp_path / "other.key"
    signing.generate_key(other)
    rewrite(led, sigma3, key_path=other)
    report.write_text(to_json(build_report(led)))
    code, out = verify(report, "--ledger", led, "--receipts", run_dir)
    assert code == 1 and "receipts.jsonl:1: the aggregator checked this release against key" in out


@pytest.mark.parametrize(
    ("lines", "expect"),
    [
        ([0, 1, 3], r"eu.jsonl:3: "),  # a deleted middle line
        ([0, 2, 1, 3], r"eu.jsonl:2: "),  # reordered
    ],
)
def test_deleted_or_reordered_line_fails_naming_it(honest, tmp_path, lines, expect):
    led, run_dir, report = workspace(honest, tmp_path)
    raw = led.read_bytes().splitlines(keepends=True)
    led.write_bytes(b"".join(raw[i] for i in lines))
    code, out = verify(report, "--ledger", led, "--receipts", run_dir)
    assert code == 1
    assert re.search(expect, out), out


def test_edited_line_fails_naming_it(honest, tmp_path):
    led, run_dir, report = workspace(honest, tmp_path)
    raw = led.read_text().splitlines(keepends=True)
    rec = json.loads(raw[2])
    rec["update_norm"] = 0.1  # an edit the accountant history cannot see
    raw[2] = json.dumps(rec) + "\n"
    led.write_text("".join(raw))
    code, out = verify(report, "--ledger", led, "--receipts", run_dir)
    assert code == 1 and "eu.jsonl:3: bad signature" in out


def test_deleted_last_line_leaves_a_receipt_without_a_release(honest, tmp_path):
    led, run_dir, report = workspace(honest, tmp_path)
    raw = led.read_bytes().splitlines(keepends=True)
    led.write_bytes(b"".join(raw[:-1]))  # chain still intact: only the receipts know
    report.write_text(to_json(build_report(led)))
    code, out = verify(report, "--ledger", led)
    assert code == 0, out
    code, out = verify(report, "--ledger", led, "--receipts", run_dir)
    assert code == 1
    assert "receipts.jsonl:3: receipt of run 'run-v' round 3 has no release" in out


def test_report_of_another_ledger_and_release_without_receipt(honest, tmp_path):
    led, run_dir, report = workspace(honest, tmp_path)
    lines = (run_dir / "receipts.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "receipts.jsonl").write_text(lines[0] + lines[2])
    code, out = verify(report, "--ledger", led, "--receipts", run_dir)
    assert code == 1 and "ledger line 3: release of run 'run-v' round 2 has no receipt" in out
    rep = json.loads(report.read_text())
    rep["provenance"]["ledgerSha256"] = "0" * 64
    report.write_text(json.dumps(rep))
    code, out = verify(report, "--ledger", led)
    assert code == 1 and "is not the hash of this ledger" in out


def test_fixed_seed_and_sigma_below_the_floor_fail(tmp_path):
    frames = make_synthetic_frames(60, 4, seed=0, region="eu")
    weights = get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))
    led = tmp_path / "eu.jsonl"
    _release(frames, weights, led, 1, seed=7)
    report = tmp_path / "r.json"
    report.write_text(to_json(build_report(led)))
    code, out = verify(report, "--ledger", led)
    assert code == 1 and "ledger line 2 (run 'run-v' round 1): the noise used a fixed seed" in out
    rewrite(led, lambda r: {**r, "min_noise_multiplier": 2.0} if r["kind"] == "release" else r)
    report.write_text(to_json(build_report(led)))
    code, out = verify(report, "--ledger", led)
    assert "σ = 1 is below the policy floor 2" in out


def test_flags_are_checked(honest):
    _, led, run_dir, report = honest
    code, out = verify(report, "--receipts", run_dir)
    assert code == 2 and "--receipts needs --ledger" in out
