"""What `fedfsd privacy report` and `fedfsd privacy verify` do (the typer wrappers live in cli.py).

Kept apart from the command declarations so the CLI module stays light and these can be called
and tested as functions that return an exit code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedfsd.errors import exit_code

FORMATS = ("json", "md", "html")


def _err(msg: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[red]error:[/red] {escape(msg)}", soft_wrap=True)


def _vehicle_ids(specs: Sequence[str]) -> dict[str, list[str]] | None:
    """Parse `REGION=PATH` specs: PATH is a fleet data directory or a file of ids, one a line."""
    if not specs:
        return None
    out: dict[str, list[str]] = {}
    for spec in specs:
        region, sep, path = spec.partition("=")
        if not sep or not region or not path:
            raise ValueError(f"--vehicles {spec!r}: expected REGION=PATH")
        p = Path(path)
        if p.is_dir():
            from fedfsd.data.vehicles import load_vehicle_frames

            out[region] = list(load_vehicle_frames(p, split="all").vehicle_ids)
        elif p.is_file():
            out[region] = [x.strip() for x in p.read_text().splitlines() if x.strip()]
        else:
            raise ValueError(f"--vehicles {spec!r}: {p} does not exist")
    return out


def run_report(
    ledgers: Sequence[str],
    out: str,
    fmt: str = "json",
    run_id: str | None = None,
    vehicles: Sequence[str] = (),
) -> int:
    """Write one report (one ledger: `out` is the file) or several (`out` is a directory)."""
    from fedfsd.privacy.accounting import AccountantError
    from fedfsd.privacy.ledger import LedgerError
    from fedfsd.privacy.report import (
        ReportError,
        build_global_summary,
        build_report,
        write_report,
    )

    if fmt not in FORMATS:
        _err(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
        return 2
    if not ledgers:
        _err("give at least one --ledger")
        return 2
    try:
        ids = _vehicle_ids(vehicles)
        reports = [build_report(p, run_id) for p in ledgers]
        if len(reports) == 1 and ids is None:
            written = [write_report(reports[0], out, fmt)]
        else:
            d = Path(out)
            if d.exists() and not d.is_dir():
                raise ReportError(f"--out {d}: with several ledgers --out must be a directory")
            summary = build_global_summary(reports, ids)
            written = [write_report(r, d / f"epsilon-{r.region}.{fmt}", fmt) for r in reports]
            written.append(write_report(summary, d / f"epsilon-global.{fmt}", fmt))
    except (ReportError, LedgerError, AccountantError, ValueError, OSError) as e:
        _err(str(e))
        return exit_code(e)  # bad input 2, a ledger that does not verify 4, else 1
    for rep in reports:
        a = rep.accounting
        print(
            f"region {rep.region}: ε = {a.epsilon:.4g} (PRV; RDP {a.epsilon_rdp:.4g}) at "
            f"δ = {a.delta:g}, {len(rep.releases)} releases, budget {rep.budget.epsilon_budget:g}"
        )
    for p in written:
        print(f"wrote {p}")
    return 0


def run_verify(
    paths: Sequence[str], ledgers: Sequence[str] = (), receipts: str | None = None
) -> int:
    """0 when every file verifies; 1 listing every discrepancy; 2 for an unreadable file.

    With `ledgers` each region report is also held against its ledger (matched by region),
    and with `receipts` (an aggregator run directory) against what the aggregator received.
    """
    from fedfsd.privacy.report import ReportError, load_json
    from fedfsd.privacy.report_checks import Verification, confirmation, verify_files
    from fedfsd.proto.fedfsd.v1 import report_pb2 as pb

    missing = [p for p in paths if not Path(p).is_file()]
    if not paths and ledgers and receipts is None:
        return _verify_ledgers_alone(ledgers)
    if not paths or missing:
        _err(f"no such report file: {', '.join(missing)}" if missing else "give a REPORT.json")
        return 2
    if missing := [p for p in ledgers if not Path(p).is_file()]:
        _err(f"no such ledger file: {', '.join(missing)}")
        return 2
    if receipts is not None and not ledgers:
        _err("--receipts needs --ledger (receipts are checked against the region's ledger)")
        return 2
    if receipts is not None and not Path(receipts).is_dir():
        _err(f"--receipts {receipts}: not an aggregator run directory")
        return 2
    try:
        results = verify_files(paths)
        extra = _ledger_checks(paths, ledgers, receipts, load_json, pb) if ledgers else []
    except ReportError as e:
        _err(str(e))
        return 2
    if isinstance(extra, str):
        _err(extra)
        return 2
    results = [*results, *extra]
    failed = 0
    for v in results:
        assert isinstance(v, Verification)
        if v.ok:
            print(confirmation(v))
        else:
            failed += 1
            print(f"FAILED {v.subject}: {len(v.problems)} discrepancies ({v.checks} checks)")
            for msg in v.problems:
                print(f"  - {msg}")
        for note in v.notes:
            print(f"  note: {note}")
    if not ledgers:
        print(
            "checked the report(s) alone: internal consistency and ε recomputed from the "
            "report's own history; add --ledger LEDGER.jsonl --receipts RUN_DIR to hold them "
            "against the region's ledger and the aggregator's receipts"
        )
    return 1 if failed else 0


def _verify_ledgers_alone(ledgers: Sequence[str]) -> int:
    """`verify --ledger L` without a report: the ledger's chain and rules, and both ε of every
    distributed release recomputed from its recorded parameters."""
    from fedfsd.privacy.report_checks import confirmation
    from fedfsd.privacy.verify_ledger import verify_ledger_alone

    if missing := [p for p in ledgers if not Path(p).is_file()]:
        _err(f"no such ledger file: {', '.join(missing)}")
        return 2
    failed = 0
    for lp in ledgers:
        v = verify_ledger_alone(lp)
        if v.ok:
            print(confirmation(v))
        else:
            failed += 1
            print(f"FAILED {v.subject}: {len(v.problems)} discrepancies ({v.checks} checks)")
            for msg in v.problems:
                print(f"  - {msg}")
    return 1 if failed else 0


def _ledger_checks(paths, ledgers, receipts, load_json, pb) -> list | str:
    """One ledger verification per region report; the ledger is chosen by region and fleet."""
    from fedfsd.privacy.ledger import Ledger, LedgerError
    from fedfsd.privacy.report_checks import Verification
    from fedfsd.privacy.verify_ledger import verify_with_ledger

    by_region: dict[tuple[str, str], str] = {}
    out: list = []
    for lp in ledgers:
        try:
            h = Ledger(lp).header
        except LedgerError as e:
            v = Verification(subject=f"ledger {lp}")
            v.check(False, str(e))
            out.append(v)
            continue
        by_region[(str(h.get("region")), str(h.get("fleet_id")))] = lp
    for p in paths:
        doc = load_json(p)
        if not isinstance(doc, pb.EpsilonReport):
            continue
        lp = by_region.get((doc.region, doc.fleet_id))
        if lp is None:
            v = Verification(subject=f"{p} (region {doc.region})")
            v.check(False, f"no --ledger given for region {doc.region} fleet {doc.fleet_id}")
            out.append(v)
            continue
        v = verify_with_ledger(doc, lp, receipts)
        v.subject = f"{p} vs {lp}" + (f" and receipts in {receipts}" if receipts else "")
        out.append(v)
    return out
