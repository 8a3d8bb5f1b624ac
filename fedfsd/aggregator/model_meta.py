"""`global_model.json`: what the aggregator knows about the global model it writes.

`global_model.npz` stays a bare state-dict (every reader of it keeps working); this sidecar says
what it is: the architecture to rebuild it, the run that made it (rounds, regions, each region's
last ε as its signed manifest stated it, with the receipt that holds that manifest) and the sha256
of the weights. The aggregator never sees the data schema, so the feature schema is stated as
the feature count only; `fedfsd model evaluate|export` (region side) resolve it. Same sidecar
layout as `fedfsd.modelhub.files.save_model` (`MODEL.npz` → `MODEL.json`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedfsd.aggregator import checkpoint as ck
from fedfsd.durable import write_atomic
from fedfsd.wire import array_digest

MODEL_FORMAT = "fedfsd-model"
MODEL_FORMAT_VERSION = 1
GLOBAL_MODEL_META = "global_model.json"


def architecture(settings: Any) -> dict[str, Any]:
    """How to rebuild the model (`fedfsd.models.build_model` arguments) from run settings."""
    arch: dict[str, Any] = {
        "name": settings.model,
        "n_features": int(settings.n_features),
        "n_labels": int(settings.n_labels),
        "seed": int(settings.model_seed),
    }
    if settings.model == "bev_cnn":
        arch["in_channels"] = int(settings.bev_channels)
    return arch


def _finite(text: str) -> float | None:
    """A finite number from a CSV cell; None for an empty cell (ε unknown: a refused round)."""
    if not str(text).strip():
        return None
    v = float(text)
    return v if math.isfinite(v) else None


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Rounds, regions and each region's last ε, from the run directory's own files."""
    rounds = []
    p = run_dir / ck.ROUNDS_JSONL
    if p.exists():
        rounds = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    ok = [r for r in rounds if r.get("status") == "ok"]
    regions = sorted({a for r in rounds for a in r.get("accepted", [])})
    eps: dict[str, dict[str, Any]] = {}
    for row in ck.read_csv(run_dir / ck.EPSILON_CSV):
        eps[row["region"]] = {
            **{k: _finite(row[k]) for k in ("epsilon", "epsilon_rdp", "epsilon_budget", "delta")},
            "round": int(row["round"]),
            "source": f"{ck.EPSILON_CSV} round {row['round']}: the region's signed update "
            f"manifest (receipts.jsonl); the region's own report: fedfsd privacy report",
        }
    heads_path = run_dir / "ledger_heads.json"
    if heads_path.exists():
        for region, head in json.loads(heads_path.read_text()).items():
            if region in eps:
                eps[region]["ledger_head"] = head.get("ledger_head")
                eps[region]["ledger_id"] = head.get("ledger_id")
    scored = [r for r in rounds if r.get("metrics")]
    return {
        "released_metrics": (  # the regions' DP releases of the last scored round, if any
            {"round": scored[-1]["round"], "metrics": scored[-1]["metrics"]} if scored else None
        ),
        "rounds": len(rounds),
        "rounds_ok": len(ok),
        "regions": regions,
        "epsilon": eps,
        "run_id": _run_id(run_dir),
    }


def _run_id(run_dir: Path) -> str:
    """The run id the checkpoint holds ("" when there is no readable checkpoint)."""
    try:
        state = ck.load_checkpoint(run_dir)
    except (ck.CheckpointError, OSError, ValueError):
        return ""
    return state.run_id if state is not None else ""


def write_global_model_meta(
    run_dir: Path, settings: Any, weights: Mapping[str, np.ndarray], run_id: str
) -> Path:
    """Write `run_dir/global_model.json` beside `global_model.npz` (atomically)."""
    summary = run_summary(run_dir)
    summary["run_id"] = run_id
    doc = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "kind": "federated-global",
        "architecture": architecture(settings),
        "feature_schema": {"n_features": int(settings.n_features)},
        "run": summary,
        "file": ck.GLOBAL_MODEL,
        "weights_sha256": array_digest(
            {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        ),
    }
    path = Path(run_dir) / GLOBAL_MODEL_META
    text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_atomic(path, text.encode())
    return path
