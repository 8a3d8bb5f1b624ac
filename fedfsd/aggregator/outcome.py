"""How a run ended, in one place: `summary.json` in the run dir and the table the CLI prints.

Why: Flower reports a run `finished:completed` whenever the ServerApp returns, whatever happened
to its rounds, and the per-round story was only in rounds.jsonl. The summary counts the rounds
asked, run and successful (a run is ok only when every asked round reached quorum), gives each
round's accepted, refused (with the region's reason), rejected and failed regions, and each
region's ε spent and left, by region name. It also holds both run ids: fedfsd's (what regions
record in their ledgers and `fedfsd privacy report --run` takes) and Flower's (what `flwr log`
and `flwr ls` take).
"""

from __future__ import annotations

import contextlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedfsd.aggregator import checkpoint as ck
from fedfsd.durable import write_atomic

SUMMARY_JSON = "summary.json"
RUN_IDS_JSON = "run.json"


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / ck.ROUNDS_JSONL
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            if line.strip():
                out.append(json.loads(line))
    return out


def _float(text: str | None) -> float | None:
    try:
        v = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return v if v is None or math.isfinite(v) else None


def region_budgets(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Each region's last reported ε, its budget and what is left (from epsilon.csv)."""
    regions: dict[str, dict[str, Any]] = {}
    for row in ck.read_csv(run_dir / ck.EPSILON_CSV):
        eps, budget = _float(row.get("epsilon")), _float(row.get("epsilon_budget"))
        entry = regions.setdefault(row["region"], {})
        if eps is not None:
            entry["epsilon"] = max(eps, entry.get("epsilon", 0.0))
            entry["round"] = int(row["round"])
        if budget:
            entry["epsilon_budget"] = budget
    for entry in regions.values():
        if "epsilon" in entry and "epsilon_budget" in entry:
            entry["epsilon_left"] = max(0.0, entry["epsilon_budget"] - entry["epsilon"])
    return regions


def summarise(
    run_dir: Path,
    *,
    rounds_asked: int,
    fedfsd_run_id: str,
    flower_run_id: int | None = None,
    ended: str = "",
    run_refused: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The run's outcome from the files in `run_dir` (rounds.jsonl, epsilon.csv)."""
    rounds = _rounds(run_dir)
    ok_rounds = [r["round"] for r in rounds if r.get("status") == "ok"]
    regions = region_budgets(run_dir)
    for r in rounds:
        for name in r.get("accepted", []):
            entry = regions.setdefault(name, {})
            entry["accepted_rounds"] = entry.get("accepted_rounds", 0) + 1
            entry["last_accepted_round"] = r["round"]
    per_round = [
        {
            "round": r["round"],
            "status": r.get("status", "?"),
            "accepted": r.get("accepted", []),
            "refused": r.get("refused_reasons") or {n: "" for n in r.get("refused", [])},
            "rejected": r.get("rejected_reasons") or {n: "" for n in r.get("rejected", [])},
            "failed": r.get("error_reasons") or {n: "" for n in r.get("errors", [])},
            "missing": r.get("missing", 0),
            "note": r.get("note", ""),
        }
        for r in rounds
    ]
    ok = len(ok_rounds) >= rounds_asked
    return {
        "fedfsd_run_id": fedfsd_run_id,
        "flower_run_id": flower_run_id,
        "run_dir": str(run_dir),
        "rounds_asked": rounds_asked,
        "rounds_run": len(rounds),
        "rounds_ok": len(ok_rounds),
        "ok": ok,
        "ended": ended or ("completed" if ok else "fewer successful rounds than asked"),
        "rounds": per_round,
        "regions": regions,
        "run_refused": dict(run_refused or {}),
        "rejected_updates": sum(len(r["rejected"]) for r in per_round),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Atomically write `run-dir/summary.json`."""
    path = Path(run_dir) / SUMMARY_JSON
    write_atomic(path, (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    return path


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json, or None when the run wrote none (it crashed or still runs)."""
    try:
        doc = json.loads((Path(run_dir) / SUMMARY_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_run_ids(run_dir: Path, fedfsd_run_id: str, flower_run_id: int | None) -> Path:
    """`run-dir/run.json`: both run ids, written as soon as the run starts."""
    path = Path(run_dir) / RUN_IDS_JSON
    doc = {"fedfsd_run_id": fedfsd_run_id, "flower_run_id": flower_run_id}
    write_atomic(path, (json.dumps(doc, sort_keys=True) + "\n").encode("utf-8"))
    return path


def _reasons(d: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" if v else k for k, v in sorted(d.items())) or "-"


def render(summary: dict[str, Any]) -> Any:
    """A rich renderable: the per-round table, the per-region table and the verdict."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rounds = Table(title="rounds", show_lines=False)
    for col in ("round", "status", "accepted", "refused (reason)", "rejected (reason)", "failed"):
        rounds.add_column(col, overflow="fold")
    for r in summary.get("rounds", []):
        failed = dict(r.get("failed", {}))
        if r.get("missing"):
            failed[f"{r['missing']} no reply"] = ""
        status = r["status"] + (f" ({r['note']})" if r.get("note") else "")
        rounds.add_row(
            str(r["round"]),
            status,
            ", ".join(r.get("accepted", [])) or "-",
            _reasons(r.get("refused", {})),
            _reasons(r.get("rejected", {})),
            _reasons(failed),
        )
    regions = Table(title="regions")
    for col in ("region", "accepted rounds", "ε spent", "ε budget", "ε left"):
        regions.add_column(col)

    def num(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, int | float) else "?"

    for name, e in sorted(summary.get("regions", {}).items()):
        regions.add_row(
            name,
            str(e.get("accepted_rounds", 0)),
            num(e.get("epsilon")),
            num(e.get("epsilon_budget")),
            num(e.get("epsilon_left")),
        )
    ok = bool(summary.get("ok"))
    verdict = Text(
        f"{summary.get('rounds_ok', 0)} of {summary.get('rounds_asked', '?')} round(s) "
        f"successful ({summary.get('ended', '')}); fedfsd run id {summary.get('fedfsd_run_id')}, "
        f"Flower run id {summary.get('flower_run_id')}",
        style="green" if ok else "bold red",
    )
    parts: list[Any] = [rounds, regions]
    for name, reason in sorted(summary.get("run_refused", {}).items()):
        parts.append(Text(f"{name} refused the run: {reason}", style="red"))
    parts.append(verdict)
    return Group(*parts)


def report_run(run_dir: Path, status: str) -> bool:
    """Print the run's summary table; True when Flower and the summary both say it succeeded."""
    from rich.console import Console

    summary = read_summary(run_dir)
    if summary is None:  # another ServerApp (--app), or ours ended before its summary
        Console(stderr=True).print(f"no {SUMMARY_JSON} in {run_dir}; Flower says {status}")
        return status == "finished:completed"
    console = Console()
    if not console.is_terminal:  # logs and pipes: keep reasons on one line
        console = Console(width=160)
    console.print(render(summary))
    return status == "finished:completed" and bool(summary.get("ok"))
