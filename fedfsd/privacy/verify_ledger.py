"""Hold an ε report against the region's ledger and the aggregator's receipts.

`verify_report` checks that a report agrees with itself; a report and ledger rewritten together
(another σ, recomputed ε) would pass it. What a region cannot rewrite alone is the aggregator's
record of what it received: every accepted manifest, signed with the region's key and naming the
ledger line (id, number, hash) of its release (`<run dir>/receipts.jsonl`). Here a reviewer checks

- the ledger: hash chain and signatures (loading names the first broken line), that the
  report's `ledger_sha256` is the hash of the ledger as it was when the report was written,
  and that the report's releases are exactly the ledger's releases up to the report's last one;
- each release: σ not below the policy floor the ledger recorded, no fixed seed;
- ε recomputed from the LEDGER's accountant history (Opacus and dp-accounting), not the report's;
- each receipt of this region: signed by the key the ledger names, for a ledger line that exists
  with that hash and the same digest and parameters (for a secure round's receipt also the
  trust model, the checked norm within its signed bound, and both ε); and each release of the
  receipts' run has a receipt (or an aggregator rejection explaining why it has none).

Every discrepancy names the ledger line or receipts line it is about.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from fedfsd.privacy import signing
from fedfsd.privacy.ledger import SPENDING, Ledger, LedgerError
from fedfsd.privacy.report import history_of, is_metric
from fedfsd.privacy.report_checks import (
    EXACT_RTOL,
    Verification,
    _check_epsilon,
    _close,
    _merge,
    check_distributed,
)
from fedfsd.proto.fedfsd.v1 import report_pb2 as pb

RECEIPTS = "receipts.jsonl"
REJECTED = "rejected.jsonl"
# Manifest field -> ledger line field, compared exactly (floats travel as float64 both ways).
MANIFEST_VS_LINE = (
    ("sha256", "update_sha256"),
    ("noise_multiplier", "noise_multiplier"),
    ("sample_rate", "sample_rate"),
    ("steps", "steps"),
    ("frames_per_vehicle", "frames_per_vehicle"),
    ("clip_norm", "clip_norm"),
    ("epsilon", "epsilon_prv"),
    ("delta", "delta"),
    ("fleet_id", "fleet_id"),
)
# And for a secure round's manifest (trust_model set): its bound check and both ε.
SECURE_MANIFEST_VS_LINE = (
    ("trust_model", "trust_model"),
    ("epsilon_distributed", "epsilon_distributed"),
    ("epsilon_own_noise", "epsilon_own_noise"),
)


def _prefix_hashes(path: Path) -> dict[str, int]:
    """sha256 of the file up to each line end -> lines in that prefix (a report of a shorter
    ledger names one of these)."""
    h = hashlib.sha256()
    out = {h.hexdigest(): 0}
    n = 0
    with open(path, "rb") as f:
        for line in f:
            h.update(line)
            if line.endswith(b"\n"):
                n += 1
                out[h.hexdigest()] = n
    out.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), n)
    return out


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError:
            rows.append((i, {"_corrupt": line[:80]}))
    return rows


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b) or (math.isinf(float(a)) and math.isinf(float(b)))
        except (TypeError, ValueError):
            return False
    return a == b


def _report_release_matches(v: Verification, i: int, rel: pb.Release, rec: dict) -> None:
    where = f"ledger line {i} (run {rec.get('run_id')!r} round {rec.get('round')})"
    pairs = (
        ("noise_multiplier", rel.noise_multiplier),
        ("sample_rate", rel.sample_rate),
        ("steps", rel.steps),
        ("clip_norm", rel.clip_norm),
        ("frames_per_vehicle", rel.frames_per_vehicle),
        ("update_sha256", rel.update_sha256),
    )
    for key, got in pairs:
        v.check(
            _same(got, rec.get(key)),
            f"{where}: report says {key} = {got!r}, the ledger says {rec.get(key)!r}",
        )
    if rec.get("epsilon_prv") is not None:
        v.check(
            _close(rel.epsilon_prv, float(rec["epsilon_prv"]), EXACT_RTOL),
            f"{where}: report ε {rel.epsilon_prv:.6g} != ledger ε {rec['epsilon_prv']:.6g}",
        )


def _check_release_rules(v: Verification, i: int, rec: dict, header: dict) -> None:
    where = f"ledger line {i} (run {rec.get('run_id')!r} round {rec.get('round')})"
    floor = rec.get("min_noise_multiplier", header.get("min_noise_multiplier"))
    if rec.get("private", True):
        recorded = v.check(floor is not None, f"{where}: no policy noise floor recorded")
        if recorded and floor is not None:
            v.check(
                float(rec["noise_multiplier"]) >= float(floor),
                f"{where}: σ = {rec['noise_multiplier']:g} is below the policy floor {floor:g}",
            )
    v.check(
        "seeded with" not in str(rec.get("rng", "")),
        f"{where}: the noise used a fixed seed ({rec.get('rng')}): not private in production",
    )


def verify_with_ledger(
    rep: pb.EpsilonReport, ledger_path: str | Path, receipts_dir: str | Path | None = None
) -> Verification:
    """Every check of the module doc for one region's report; problems name their line."""
    path = Path(ledger_path)
    v = Verification(subject=f"region {rep.region or '?'} report vs ledger {path}")
    led = Ledger(path)
    try:
        records = led.records()
    except LedgerError as e:
        v.check(False, f"ledger: {e}")
        return v
    header = records[0]
    if not v.check(not led.legacy, f"{path}: legacy ledger without hash chain or signatures"):
        return v
    v.check(
        header.get("region") == rep.region and header.get("fleet_id") == rep.fleet_id,
        f"{path}: ledger is for {header.get('region')}/{header.get('fleet_id')}, the report for "
        f"{rep.region}/{rep.fleet_id}",
    )
    if led.torn_tail is not None:
        v.check(False, f"{path}:{len(records) + 1}: the ledger ends in a torn line")
    prefixes = _prefix_hashes(path)
    got = rep.provenance.ledger_sha256
    v.check(
        got in prefixes,
        f"report ledger_sha256 {got[:16]}… is not the hash of this ledger (nor of any earlier "
        "state of it): the report was made from another or an edited ledger",
    )
    lines = [(i, r) for i, r in enumerate(records, start=1) if r["kind"] == "release"]
    # The report covers the ledger's update releases up to its last one, in order. Its metric
    # releases are checked through the chain, the signatures and the ε recomputed from the
    # ledger's history, which includes them.
    updates = [r for r in rep.releases if not is_metric(r)]
    n = len(updates)
    covered = lines[:n]
    if not v.check(
        len(covered) == n,
        f"the report lists {n} releases, the ledger has only {len(lines)}",
    ):
        return v
    for rel, (i, rec) in zip(updates, covered, strict=True):
        same_id = rec.get("run_id") == rel.run_id and int(rec.get("round", -1)) == rel.round
        if v.check(
            same_id,
            f"ledger line {i}: release run {rec.get('run_id')!r} round {rec.get('round')} is "
            f"not the report's run {rel.run_id!r} round {rel.round} (deleted or reordered)",
        ):
            _report_release_matches(v, i, rel, rec)
        _check_release_rules(v, i, rec, header)
    # The report's history ends with the last spending line it lists (an update or a metric
    # release): that line's cumulative history is what ε is recomputed from.
    spending = [(i, r) for i, r in enumerate(records, start=1) if r["kind"] in SPENDING]
    if rep.private_training and covered and len(rep.releases) <= len(spending):
        i, last = spending[len(rep.releases) - 1]
        hist = _merge([tuple(h) for h in last["accountant_history"]])
        rep_hist = _merge(history_of(rep.accounting.history))
        v.check(
            hist == rep_hist,
            f"ledger line {i}: accountant history differs from the report's",
        )
        delta = float(header["delta"])
        v.check(
            delta == rep.accounting.delta,
            f"{path}:1: ledger δ {delta:g} != report δ {rep.accounting.delta:g}",
        )
        dist_lines = [r for _, r in spending[: len(rep.releases)] if r.get("trust_model")]
        if dist_lines or rep.HasField("distributed"):
            if v.check(
                bool(dist_lines) and rep.HasField("distributed"),
                f"ledger line {i}: the ledger and the report disagree on whether releases used "
                "distributed noise",
            ):
                ledger_hist = dist_lines[-1].get("distributed_history", [])
                check_distributed(v, f"ledger line {i}", rep, hist, delta, ledger_hist)
        else:
            _check_epsilon(
                v,
                f"ledger line {i}",
                hist,
                delta,
                rep.accounting.epsilon,
                rep.accounting.epsilon_rdp,
            )
    check_distributed_lines(v, records)
    if receipts_dir is not None:
        _check_receipts(v, led, records, Path(receipts_dir), rep, len(covered))
    return v


def _check_receipts(
    v: Verification,
    led: Ledger,
    records: list[dict],
    run_dir: Path,
    rep: pb.EpsilonReport,
    n_covered: int,
) -> None:
    rpath = run_dir / RECEIPTS
    if not v.check(rpath.exists(), f"{rpath}: no receipts file"):
        return
    hashes = led.line_hashes()
    key_hex = led.public_key
    pub = signing.parse_public_key(key_hex)
    mine = []
    for j, r in _read_jsonl(rpath):
        where = f"{rpath}:{j}"
        if "_corrupt" in r:
            v.check(False, f"{where}: corrupt receipt")
            continue
        m = r.get("manifest", {})
        if r.get("region") != rep.region and m.get("region") != rep.region:
            continue
        mine.append((j, r, m))
        if not v.check(
            r.get("public_key") == key_hex,
            f"{where}: the aggregator checked this release against key "
            f"{str(r.get('public_key'))[:16]}…, the ledger's key is {key_hex[:16]}… "
            "(release signed by another key, or a rewritten ledger)",
        ):
            continue
        v.check(
            signing.verify(pub, signing.manifest_payload(m), str(m.get("signature", ""))),
            f"{where}: bad signature on the received manifest",
        )
        seq = int(m.get("ledger_seq", 0))
        ok = v.check(
            m.get("ledger_id") == hashes[0] and 2 <= seq <= len(records),
            f"{where}: receipt of run {m.get('run_id')!r} round {m.get('round')} has no release "
            f"on this ledger (ledger id/line {seq} not found)",
        )
        if not ok:
            continue
        rec = records[seq - 1]
        if not v.check(
            hashes[seq - 1] == m.get("ledger_head") and rec.get("kind") == "release",
            f"{where}: receipt names ledger line {seq}, whose hash differs (the line was edited "
            "or replaced): receipt without its release",
        ):
            continue
        secure = SECURE_MANIFEST_VS_LINE if m.get("trust_model") else ()
        if secure:
            # A secure manifest signs "norm ≤ bound" (its update_norm is the bound, not the
            # region's own norm); the ledger line holds the norm the region checked.
            v.check(
                float(rec.get("update_norm", math.inf)) <= float(m.get("update_norm_bound", 0.0)),
                f"{where}: ledger line {seq} has norm {rec.get('update_norm')!r}, over the "
                f"signed bound {m.get('update_norm_bound')!r}",
            )
        for mk, lk in (*MANIFEST_VS_LINE, *secure):
            v.check(
                _same(m.get(mk), rec.get(lk)),
                f"{where}: receipt {mk} = {m.get(mk)!r} but ledger line {seq} has "
                f"{lk} = {rec.get(lk)!r}",
            )
        v.check(
            (m.get("run_id"), int(m.get("round", -1)))
            == (rec.get("run_id"), int(rec.get("round", -2))),
            f"{where}: receipt run/round differ from ledger line {seq}",
        )
    # Vice versa: each release of the receipts' run (covered by the report) has a receipt.
    runs = {m.get("run_id") for _, _, m in mine}
    got = {(m.get("run_id"), int(m.get("round", -1))) for _, _, m in mine}
    rejected = {
        (int(r.get("round", -1)), r.get("region")) for _, r in _read_jsonl(run_dir / REJECTED)
    }
    count = 0
    for i, rec in enumerate(records, start=1):
        if rec["kind"] != "release" or "update_sha256" not in rec:
            continue
        count += 1
        if count > n_covered or rec.get("run_id") not in runs:
            continue
        key = (rec.get("run_id"), int(rec["round"]))
        if key in got:
            continue
        if (int(rec["round"]), rep.region) in rejected:
            v.notes.append(
                f"ledger line {i}: release of round {rec['round']} was rejected by the "
                "aggregator (rejected.jsonl): ε spent, update not used"
            )
            continue
        v.check(
            False,
            f"ledger line {i}: release of run {key[0]!r} round {key[1]} has no receipt in {rpath}",
        )


# ---- distributed releases (issue 15) ----------------------------------------------------------

DIST_RTOL = 1e-6  # the same deterministic RDP code on the same numbers: agreement to rounding


def check_distributed_lines(v: Verification, records: list[dict[str, Any]]) -> None:
    """Each distributed release line: share size from (σ, s, C, t), σ and t within the rules,
    and both ε recomputed from the ledger's recorded parameters (not the line's ε fields).

    A local release or metric line on a mixed ledger (it carries `enforce_on` and the
    distributed history) gets the same ε recomputation: its ε composes both kinds of release.
    """
    from fedfsd.privacy.distributed_accounting import STATEMENTS, epsilons
    from fedfsd.privacy.ledger import SPENDING, is_distributed

    header = records[0]
    delta = float(header.get("delta", 0.0))
    for i, rec in enumerate(records, start=1):
        if rec.get("kind") not in SPENDING:
            continue
        if not is_distributed(rec):
            if rec.get("enforce_on") is not None or rec.get("distributed_history"):
                _check_mixed_local_line(v, i, rec, delta)
            continue
        where = f"ledger line {i} (run {rec.get('run_id')!r} round {rec.get('round')}, distributed)"
        t = int(rec.get("min_honest_regions", 0))
        v.check(t >= 2, f"{where}: min_honest_regions = {t} must be ≥ 2")
        sigma, s, c = (
            float(rec.get(k, 0.0)) for k in ("noise_multiplier", "quantisation_scale", "clip_norm")
        )
        want_mu = (sigma * s * c) ** 2 / max(t, 1)
        v.check(
            _close_rel(float(rec.get("noise_share_variance", 0.0)), want_mu),
            f"{where}: noise_share_variance {rec.get('noise_share_variance')!r} is not "
            f"(σ·s·C)²/t = ({sigma:g}·{s:g}·{c:g})²/{t} = {want_mu:.6g}",
        )
        enforce = rec.get("enforce_on")
        if not v.check(
            enforce in ("distributed", "own_noise"), f"{where}: enforce_on {enforce!r} unknown"
        ):
            continue
        got = epsilons(rec.get("distributed_history", []), delta, rec.get("accountant_history", []))
        v.recomputed.update({f"{where}:{k}": x for k, x in got.items()})
        for key, assumption in (
            ("epsilon_distributed", "distributed"),
            ("epsilon_own_noise", "own_noise"),
        ):
            said = float(rec.get(key, math.nan))
            text = STATEMENTS[assumption].format(t=t)
            v.check(
                _close_rel(said, got[assumption]),
                f"{where}: {key} is recorded as {said:.6g} but recomputes to "
                f"{got[assumption]:.6g} from the recorded parameters ({text})",
            )
        enforced = got[str(enforce)]
        for key in ("epsilon_prv", "epsilon_rdp"):
            v.check(
                _close_rel(float(rec.get(key) or math.nan), enforced),
                f"{where}: {key} = {rec.get(key)!r} is not the enforced ε ({enforce}) "
                f"{enforced:.6g}",
            )
        v.check(
            enforced <= float(rec.get("epsilon_budget", math.inf)) * (1 + 1e-9),
            f"{where}: enforced ε {enforced:.6g} exceeds the budget {rec.get('epsilon_budget')}",
        )


def _close_rel(a: float, b: float) -> bool:
    return (
        math.isfinite(a)
        and math.isfinite(b)
        and math.isclose(a, b, rel_tol=DIST_RTOL, abs_tol=1e-12)
    )


def verify_ledger_alone(ledger_path: str | Path) -> Verification:
    """A ledger without a report: chain, signatures, the release rules and, for distributed
    releases, both ε recomputed from the recorded parameters."""
    path = Path(ledger_path)
    v = Verification(subject=f"ledger {path}")
    try:
        records = Ledger(path).records()
    except LedgerError as e:
        v.check(False, f"ledger: {e}")
        return v
    for i, rec in enumerate(records, start=1):
        if rec["kind"] == "release":
            _check_release_rules(v, i, rec, records[0])
    check_distributed_lines(v, records)
    return v


def _check_mixed_local_line(v: Verification, i: int, rec: dict[str, Any], delta: float) -> None:
    """A Gaussian line on a ledger that also holds distributed releases: both ε it records, and
    its epsilon_prv/epsilon_rdp (the enforced one), recompute from the histories it carries."""
    from fedfsd.privacy.distributed_accounting import epsilons

    where = f"ledger line {i} (run {rec.get('run_id')!r} round {rec.get('round')}, {rec['kind']}"
    where += " on a mixed ledger)"
    enforce = rec.get("enforce_on")
    if not v.check(
        enforce in ("distributed", "own_noise"), f"{where}: enforce_on {enforce!r} unknown"
    ):
        return
    got = epsilons(rec.get("distributed_history") or [], delta, rec.get("accountant_history", []))
    v.recomputed.update({f"{where}:{k}": x for k, x in got.items()})
    for key, assumption in (
        ("epsilon_distributed", "distributed"),
        ("epsilon_own_noise", "own_noise"),
    ):
        said = float(rec.get(key, math.nan))
        v.check(
            _close_rel(said, got[assumption]),
            f"{where}: {key} is recorded as {said:.6g} but recomputes to {got[assumption]:.6g} "
            "from the Gaussian and distributed histories the line carries",
        )
    enforced = got[str(enforce)]
    for key in ("epsilon_prv", "epsilon_rdp"):
        v.check(
            _close_rel(float(rec.get(key) or math.nan), enforced),
            f"{where}: {key} = {rec.get(key)!r} is not the enforced composed ε ({enforce}) "
            f"{enforced:.6g}",
        )
