"""Crash-safe run state in `run-dir`: the checkpoint, metric tables and the rejection log.

The checkpoint is replaced atomically (write a temporary file, fsync, rename, fsync the
directory), so after a crash `run-dir/checkpoint.npz` is always either the previous or the new
round, never half of one. The CSV and JSONL logs are appended and fsync'd per round; on resume,
rows of rounds after the checkpoint (written just before a crash) are dropped so no round is
counted twice.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfsd.durable import fsync_dir as _fsync_dir

CHECKPOINT = "checkpoint.npz"
GLOBAL_MODEL = "global_model.npz"
METRICS_CSV = "metrics.csv"
EPSILON_CSV = "epsilon.csv"
REJECTED_JSONL = "rejected.jsonl"
ROUNDS_JSONL = "rounds.jsonl"
METRICS_PNG = "metrics.png"
METRICS_HEADER = ("round", "region", "metric", "value")
EPSILON_HEADER = ("round", "region", "epsilon", "epsilon_rdp", "epsilon_budget", "delta")
SCHEMA = 1


@dataclass
class Checkpoint:
    """Everything needed to continue a run after the last completed round."""

    round: int  # last completed round (0 = initial model)
    run_id: str  # fedfsd run id sent to regions; stays the same across resumes
    weights: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable extras


def atomic_write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write an .npz so that `path` is either the old or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Atomically replace `run-dir/checkpoint.npz`."""
    meta = {"schema": SCHEMA, "round": ckpt.round, "run_id": ckpt.run_id, **ckpt.meta}
    arrays: dict[str, np.ndarray] = {
        "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    }
    arrays.update({f"w/{k}": np.asarray(v) for k, v in ckpt.weights.items()})
    arrays.update({f"m/{k}": np.asarray(v) for k, v in ckpt.strategy_state.items()})
    path = Path(run_dir) / CHECKPOINT
    atomic_write_npz(path, arrays)
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last completed round's state, or None when the run has none yet."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode("utf-8"))
        if meta.get("schema") != SCHEMA:
            raise ValueError(f"{path}: unsupported checkpoint schema {meta.get('schema')}")
        weights = {k[2:]: z[k] for k in z.files if k.startswith("w/")}
        state = {k[2:]: z[k] for k in z.files if k.startswith("m/")}
    rnd, run_id = int(meta.pop("round")), str(meta.pop("run_id"))
    meta.pop("schema")
    return Checkpoint(round=rnd, run_id=run_id, weights=weights, strategy_state=state, meta=meta)


def _append_and_sync(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def append_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Append rows (writing the header first if the file is new) and fsync."""
    path = Path(path)
    rows = list(rows)
    new = not path.exists() or path.stat().st_size == 0
    if not rows and not new:
        return
    lines: list[str] = []

    class _Sink:
        def write(self, s: str) -> None:
            lines.append(s)

    w = csv.writer(_Sink(), lineterminator="\n")
    if new:
        w.writerow(header)
    w.writerows(rows)
    _append_and_sync(path, "".join(lines))


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON record and fsync."""
    _append_and_sync(Path(path), json.dumps(dict(record), sort_keys=True) + "\n")


def read_csv(path: Path) -> list[dict[str, str]]:
    """All rows of a CSV written by `append_csv` (empty if missing)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def truncate_after_round(run_dir: Path, last_round: int) -> None:
    """Drop log rows of rounds after `last_round` (left by a crash before the checkpoint)."""
    run_dir = Path(run_dir)
    for name in (METRICS_CSV, EPSILON_CSV):
        path = run_dir / name
        if not path.exists():
            continue
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        if not lines:
            continue
        kept = [lines[0]] + [
            ln for ln in lines[1:] if ln.strip() and int(ln.split(",", 1)[0]) <= last_round
        ]
        if len(kept) != len(lines):
            _atomic_write_text(path, "".join(kept))
    for name in (REJECTED_JSONL, ROUNDS_JSONL):
        path = run_dir / name
        if not path.exists():
            continue
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("round", 0) <= last_round]
        if len(kept) != len(lines):
            _atomic_write_text(path, "".join(kept))


def save_global_model(run_dir: Path, weights: Mapping[str, np.ndarray]) -> Path:
    """The final global model as `run-dir/global_model.npz` (state_dict names → arrays)."""
    path = Path(run_dir) / GLOBAL_MODEL
    atomic_write_npz(path, dict(weights))
    return path


def plot_metric(run_dir: Path, metric: str = "loss") -> Path | None:
    """PNG of `metric` per round, one line per region, from metrics.csv (None if no data)."""
    rows = [r for r in read_csv(Path(run_dir) / METRICS_CSV) if r["metric"] == metric]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for region in sorted({r["region"] for r in rows}):
        pts = sorted((int(r["round"]), float(r["value"])) for r in rows if r["region"] == region)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=region)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(f"global model: {metric} on each region's test episodes")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(run_dir) / METRICS_PNG
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
