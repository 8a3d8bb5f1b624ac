"""Model card: what an exported model is, what it was trained on, under what privacy guarantee.

Written beside the export as `FILE.card.json` (for tools) and `FILE.card.md` (for people). Every
number is read from files, never typed in: the architecture and weights digest from the model
file, the rounds, regions and ε per region from the aggregator's sidecar (`global_model.json`)
or, for older runs, from the run directory the model sits in (rounds.jsonl, epsilon.csv,
ledger_heads.json), evaluation results from `fedfsd model evaluate --json` outputs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from fedfsd.modelhub.files import jsonable
from fedfsd.modelhub.meta import LoadedModel

CARD_VERSION = 1


def code_version() -> dict[str, str]:
    """fedfsd's package version and, when run from a git checkout, its commit."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("fedfsd")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        pkg = "unknown"
    out = {"fedfsd": pkg}
    try:
        rev = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if rev.returncode == 0:
            out["git_commit"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _run_info(model: LoadedModel) -> dict[str, Any] | None:
    """Rounds, regions and ε per region: from the sidecar, else from the run directory."""
    if isinstance(model.sidecar.get("run"), dict):
        return {**model.sidecar["run"], "source": "global_model.json (written by the aggregator)"}
    run_dir = model.path.parent
    if (run_dir / "rounds.jsonl").exists():
        from fedfsd.aggregator.model_meta import run_summary

        return {**run_summary(run_dir), "source": f"run directory {run_dir}"}
    return None


def _privacy(model: LoadedModel, run: dict[str, Any] | None) -> str:
    kind = model.sidecar.get("kind", "")
    if kind == "public-pretrained":
        return "trained on public simulated data only: outside every region's ε"
    if run and run.get("epsilon"):
        return (
            "vehicle-level (ε, δ)-DP per region (unit of privacy: one vehicle's data); "
            "each region's ε below is what its signed update manifest stated"
        )
    return "unknown: the model file states no run and no privacy guarantee"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_card(
    model: LoadedModel, export: dict[str, Any], evaluations: list[dict[str, Any]], out: Path
) -> dict[str, Any]:
    """The card as a JSON-able dict."""
    run = _run_info(model)
    schema = model.feature_schema
    return jsonable(
        {
            "card_version": CARD_VERSION,
            "model": {
                "file": str(model.path),
                "weights_sha256": model.weights_sha256,
                "architecture": model.architecture,
                "parameters": int(sum(np.asarray(v).size for v in model.weights.values())),
                "kind": model.sidecar.get("kind", "unknown"),
            },
            "feature_schema": (
                {
                    "name": schema["name"],
                    "version": schema["version"],
                    "sha256": schema.get("sha256"),
                    "source": model.schema_source,
                    "features": schema["features"],
                    "feature_scales": schema["feature_scales"],
                    "feature_units": schema.get("feature_units"),
                    "clipped": schema.get("clipped", {}),
                    "labels": schema["labels"],
                    "label_scales": schema["label_scales"],
                }
                if schema
                else {"name": model.describe_schema(), "source": model.schema_source}
            ),
            "training": {
                "rounds": run.get("rounds") if run else None,
                "rounds_ok": run.get("rounds_ok") if run else None,
                "regions": run.get("regions", []) if run else [],
                "run_id": run.get("run_id") if run else None,
                "source": run.get("source") if run else None,
                "pretraining_sources": model.sidecar.get("sources"),
            },
            "privacy": {
                "guarantee": _privacy(model, run),
                "epsilon_per_region": (run or {}).get("epsilon", {}),
            },
            "evaluation": evaluations,
            "federation_metrics": (run or {}).get("released_metrics"),
            "export": {**export, "sha256": file_sha256(out)},
            "code_version": code_version(),
        }
    )


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_markdown(card: dict[str, Any]) -> str:
    """The same card for people."""
    m, fs, tr, pv, ex = (
        card[k] for k in ("model", "feature_schema", "training", "privacy", "export")
    )
    lines = [
        f"# Model card: {Path(m['file']).name}",
        "",
        f"- architecture: `{m['architecture']['name']}` {json.dumps(m['architecture'])}",
        f"- parameters: {m['parameters']:,}",
        f"- weights sha256: `{m['weights_sha256']}`",
        f"- feature schema: {fs['name']}"
        + (f" v{fs['version']} (sha256 `{str(fs.get('sha256'))[:16]}…`)" if "version" in fs else "")
        + f"; source: {fs['source']}",
        f"- code: fedfsd {card['code_version'].get('fedfsd')}"
        + (
            f", commit `{card['code_version']['git_commit']}`"
            if "git_commit" in card["code_version"]
            else ""
        ),
        "",
        "## Training",
        "",
        f"- rounds: {_fmt(tr['rounds'])} ({_fmt(tr['rounds_ok'])} reached quorum); "
        f"regions: {', '.join(tr['regions']) or '-'}; run id: {_fmt(tr['run_id'])}",
        f"- from: {_fmt(tr['source'])}",
        "",
        "## Privacy",
        "",
        pv["guarantee"],
        "",
    ]
    if pv["epsilon_per_region"]:
        lines += [
            "| region | ε | ε (RDP) | budget | δ | round | from |",
            "|---|---|---|---|---|---|---|",
        ]
        for region, e in sorted(pv["epsilon_per_region"].items()):
            lines.append(
                f"| {region} | {_fmt(e.get('epsilon'))} | {_fmt(e.get('epsilon_rdp'))} | "
                f"{_fmt(e.get('epsilon_budget'))} | {_fmt(e.get('delta'))} | "
                f"{_fmt(e.get('round'))} | {e.get('source', '-')}"
                + (f"; ledger head `{str(e['ledger_head'])[:16]}…`" if e.get("ledger_head") else "")
                + " |"
            )
        lines.append("")
    lines += ["## Evaluation", ""]
    if not card["evaluation"]:
        lines += ["No evaluation given (`fedfsd model evaluate --json` → `--evaluation FILE`).", ""]
    for ev in card["evaluation"]:
        d = ev.get("dataset", {})
        lines += [
            f"{d.get('region')} / {d.get('fleet_id')} ({d.get('split')} split, "
            f"{ev.get('frames')} frames, {ev.get('vehicles')} vehicles):",
            "",
            "| | ADE (m) | FDE@3s (m) | accel MAE (m/s²) | loss |",
            "|---|---|---|---|---|",
        ]
        for who in ("model", "constant_velocity"):
            r = ev.get(who, {})
            lines.append(
                f"| {who.replace('_', '-')} | {_fmt(r.get('ade'))} | {_fmt(r.get('fde'))} | "
                f"{_fmt(r.get('accel_mae'))} | {_fmt(r.get('loss'))} |"
            )
        lines.append("")
    fed = card.get("federation_metrics")
    if fed:
        lines += [
            f"Released by the regions during the run (round {fed['round']}, differentially "
            "private, each on its own test episodes): "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(fed["metrics"].items())),
            "",
        ]
    par = ex["parity"]
    lines += [
        "## Export",
        "",
        f"- {ex['format']} `{ex['file']}` (sha256 `{ex['sha256']}`), input `{ex['input']['name']}` "
        f"{ex['input']['shape']} {ex['input']['dtype']}: {ex['input']['meaning']}",
        f"- output `predictions` [n, {ex['output']['shape'][1]}] in physical units "
        "(dx/dy at 1, 2, 3 s in metres, accel in m/s²)",
        f"- parity with the torch model ({par['runtime']}, {par['frames']} {par['source']}): "
        f"max abs difference {par['max_abs_diff']:.3g}",
        "",
    ]
    return "\n".join(lines)


def write_card(card: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """`FILE.card.json` and `FILE.card.md` beside the export."""
    from fedfsd.durable import write_atomic

    js, md = Path(f"{out}.card.json"), Path(f"{out}.card.md")
    write_atomic(js, (json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())
    write_atomic(md, render_markdown(card).encode())
    return js, md
