"""`fedfsd aggregator status`: what the aggregator is doing, by region name, in one view.

Why: the state of a federation was spread over Flower's node list (node ids only), `flwr ls`,
and several files per run dir. This joins them: registered and connected regions by name (the
names `fedfsd region register` and the ServerApp learnt), the current or last run with both run
ids and its last round, each region's last accepted round and ε, rejected updates, the runs
regions refused, and the SuperNode keys the SuperLink refused (from DIR/security.jsonl).
Nothing here changes state; the SuperLink is asked through `flwr` only.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from fedfsd.aggregator import checkpoint as ck
from fedfsd.aggregator.outcome import RUN_IDS_JSON, read_summary, summarise
from fedfsd.errors import EnvironmentFault

REGIONS_JSON = "regions.json"  # node id -> region name, written by `fedfsd region register`
RUNS_JSONL = "runs.jsonl"  # one line per `fedfsd aggregator run`: both ids and the run dir


class NoAggregator(EnvironmentFault, RuntimeError):
    """No aggregator was started in this directory, or its SuperLink does not answer."""


def remember_region(root: Path, node_id: int, name: str) -> None:
    """Record a registered key's region name (its file name without .pub) for its node id."""
    path = Path(root) / REGIONS_JSON
    names = _read_json(path) or {}
    names[str(node_id)] = name
    path.write_text(json.dumps(names, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def remember_run(root: Path, flower_run_id: int, fedfsd_run_id: str, run_dir: Path) -> None:
    """Append a started run to DIR/runs.jsonl (status finds run dirs outside DIR/runs)."""
    ck.append_jsonl(
        Path(root) / RUNS_JSONL,
        {"flower_run_id": flower_run_id, "fedfsd_run_id": fedfsd_run_id, "run_dir": str(run_dir)},
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _runs(root: Path) -> list[dict[str, Any]]:
    path = Path(root) / RUNS_JSONL
    out: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _node_names(root: Path, runs: list[dict[str, Any]]) -> dict[str, str]:
    """node id -> region name: from registration, then from the runs' checkpoints."""
    names: dict[str, str] = {}
    for r in runs:
        with contextlib.suppress(ck.CheckpointError, OSError):
            state = ck.load_checkpoint(Path(r["run_dir"]))
            if state is not None:
                names.update({str(k): v for k, v in state.meta.get("node_regions", {}).items()})
    names.update({str(k): str(v) for k, v in (_read_json(Path(root) / REGIONS_JSON) or {}).items()})
    return names


def refused_nodes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per refused SuperNode key (security log `node_refused`): first and last
    attempt, attempts logged, and the region it was once registered as, if any."""
    rows: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("event") != "node_refused":
            continue
        fp = str(e.get("fingerprint", "?"))
        row = rows.setdefault(fp, {"fingerprint": fp, "first": e.get("time"), "attempts": 0})
        row["last"] = e.get("time")
        row["attempts"] += 1
        if e.get("region"):
            row["region"] = e["region"]
    return list(rows.values())


def collect(root: Path, control: Any) -> dict[str, Any]:
    """The status document (what `--json` prints). Raises NoAggregator when none runs here."""
    from fedfsd.deploy.control import CONNECTION_NAME, json_from_output

    root = Path(root)
    if not (root / "flwr_home" / "config.toml").is_file():
        raise NoAggregator(
            f"no aggregator in {root}: start one with `fedfsd aggregator start --dir {root}`"
        )
    res = control.flwr("supernode", "ls", CONNECTION_NAME, "--format", "json", timeout=60)
    try:
        nodes_doc = json_from_output(res.stdout)
    except ValueError:
        nodes_doc = {}
    if not nodes_doc.get("success"):
        raise NoAggregator(
            f"the SuperLink of {root} does not answer (is `fedfsd aggregator start --dir {root}` "
            f"running?): {str(nodes_doc.get('error-message', res.stderr or res.stdout))[-300:]}"
        )
    runs = _runs(root)
    names = _node_names(root, runs)
    regions = [
        {
            "region": names.get(str(n["node-id"]), f"node-{n['node-id']}"),
            "node_id": int(n["node-id"]),
            "status": n.get("status", "?"),
            "connected": n.get("status") == "online",
        }
        for n in nodes_doc.get("nodes", [])
    ]
    from fedfsd.audit import SECURITY_LOG, read_events

    events = read_events(root / SECURITY_LOG)
    refused_apps = [e for e in events if e.get("event") == "serverapp_refused"]
    doc: dict[str, Any] = {
        "dir": str(root),
        "regions": regions,
        "run": None,
        "refused_serverapps": refused_apps,
        "refused_nodes": refused_nodes(events),
    }
    if runs:
        last = runs[-1]
        run_dir = Path(last["run_dir"])
        ls = control.flwr(
            "ls", CONNECTION_NAME, "--run-id", str(last["flower_run_id"]), "--format", "json"
        )
        status = "unknown"
        with contextlib.suppress(ValueError, KeyError, IndexError):
            status = str(json_from_output(ls.stdout)["runs"][0]["status"])
        ids = _read_json(run_dir / RUN_IDS_JSON) or {}
        summary = read_summary(run_dir)
        if summary is None:  # still running: the same view from the files so far
            asked = 0
            with contextlib.suppress(ck.CheckpointError, OSError):
                state = ck.load_checkpoint(run_dir)
                asked = int(state.round) if state else 0
            summary = summarise(
                run_dir,
                rounds_asked=asked,
                fedfsd_run_id=str(ids.get("fedfsd_run_id", last.get("fedfsd_run_id", ""))),
                flower_run_id=last.get("flower_run_id"),
                ended="running" if status.startswith(("running", "starting", "pending")) else "",
            )
        rounds = summary.get("rounds", [])
        doc["run"] = {
            "flower_run_id": last.get("flower_run_id"),
            "fedfsd_run_id": summary.get("fedfsd_run_id"),
            "run_dir": str(run_dir),
            "status": status,
            "round": rounds[-1]["round"] if rounds else 0,
            "rounds_ok": summary.get("rounds_ok", 0),
            "rounds_asked": summary.get("rounds_asked"),
            "regions": summary.get("regions", {}),
            "rejected_updates": summary.get("rejected_updates", 0),
            "run_refused": summary.get("run_refused", {}),
        }
    return doc


def render(doc: dict[str, Any]) -> Any:
    """Rich tables of the status document."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    nodes = Table(title=f"regions of the aggregator in {doc['dir']}")
    for col in ("region", "node id", "status"):
        nodes.add_column(col)
    for r in sorted(doc["regions"], key=lambda r: r["region"]):
        nodes.add_row(r["region"], str(r["node_id"]), r["status"])
    parts: list[Any] = [nodes]
    for e in doc.get("refused_serverapps", []):
        parts.append(
            Text(f"refused ServerApp of Flower run {e.get('flower_run_id')}: {e.get('reason')}")
        )
    if doc.get("refused_nodes"):
        refused = Table(title="refused SuperNode keys (not registered)")
        for col in ("fingerprint", "once registered as", "attempts", "last"):
            refused.add_column(col)
        for r in doc["refused_nodes"]:
            refused.add_row(r["fingerprint"], r.get("region", "-"), str(r["attempts"]), r["last"])
        parts.append(refused)
    run = doc.get("run")
    if run is None:
        parts.append(Text("no run started from this directory yet"))
        return Group(*parts)
    parts.append(
        Text(
            f"run {run['flower_run_id']} (fedfsd run id {run['fedfsd_run_id']}) {run['status']}: "
            f"round {run['round']}, {run['rounds_ok']} of {run['rounds_asked']} successful, "
            f"{run['rejected_updates']} rejected update(s); run dir {run['run_dir']}"
        )
    )
    eps = Table(title="per region")
    for col in ("region", "last accepted round", "ε spent", "ε left"):
        eps.add_column(col)
    for name, e in sorted(run["regions"].items()):
        eps.add_row(
            name,
            str(e.get("last_accepted_round", "-")),
            f"{e['epsilon']:.3f}" if "epsilon" in e else "?",
            f"{e['epsilon_left']:.3f}" if "epsilon_left" in e else "?",
        )
    parts.append(eps)
    for name, reason in sorted(run["run_refused"].items()):
        parts.append(Text(f"{name} refused the run: {reason}", style="red"))
    return Group(*parts)
