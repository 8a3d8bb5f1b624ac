"""Crash-safe run state in `run-dir`: the checkpoint, metric tables and the rejection log.

The checkpoint is replaced atomically (write a temporary file, fsync, rename, fsync the
directory), so after a crash `run-dir/checkpoint.npz` is always either the previous or the new
round, never half of one. It also carries a sha256 of every array (dtype, shape and bytes) and of
its metadata, checked on load: a flipped bit (an array's shape header, a central-directory entry
that drops an array, a byte of data) refuses with one line instead of loading different weights.

The CSV and JSONL logs are appended and fsync'd per round; on resume,
rows of rounds after the checkpoint (written just before a crash) are dropped so no round is
counted twice.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfsd.durable import atomic_file, write_atomic
from fedfsd.errors import IntegrityError

CHECKPOINT = "checkpoint.npz"
GLOBAL_MODEL = "global_model.npz"
METRICS_CSV = "metrics.csv"
EPSILON_CSV = "epsilon.csv"
REJECTED_JSONL = "rejected.jsonl"
ROUNDS_JSONL = "rounds.jsonl"
METRICS_PNG = "metrics.png"
METRICS_HEADER = ("round", "region", "metric", "value")
EPSILON_HEADER = ("round", "region", "epsilon", "epsilon_rdp", "epsilon_budget", "delta")
SCHEMA = 2  # 2: per-array and metadata sha256 digests
RUN_FILES = (CHECKPOINT, ROUNDS_JSONL, METRICS_CSV, EPSILON_CSV, REJECTED_JSONL, GLOBAL_MODEL)
_META_MAX_BYTES = 16 << 20


class CheckpointError(IntegrityError, ValueError):
    """The checkpoint exists but cannot be trusted (corrupt, truncated, foreign schema)."""


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
    with atomic_file(path) as f:  # disk full: DiskFullError naming `path`, no temp left
        np.savez(f, allow_pickle=False, **arrays)


def array_digest(a: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and C-order bytes (a shape change alters it)."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}|{list(a.shape)}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Atomically replace `run-dir/checkpoint.npz` (with digests of every array)."""
    arrays: dict[str, np.ndarray] = {f"w/{k}": np.asarray(v) for k, v in ckpt.weights.items()}
    arrays.update({f"m/{k}": np.asarray(v) for k, v in ckpt.strategy_state.items()})
    listing = {
        k: {"dtype": v.dtype.str, "shape": list(v.shape), "sha256": array_digest(v)}
        for k, v in arrays.items()
    }
    meta = {
        "schema": SCHEMA,
        "round": ckpt.round,
        "run_id": ckpt.run_id,
        **ckpt.meta,
        "arrays": listing,
    }
    meta_bytes = json.dumps(meta).encode("utf-8")  # keeps state_dict order
    arrays["meta"] = np.frombuffer(meta_bytes, dtype=np.uint8)
    digest = hashlib.sha256(meta_bytes).hexdigest().encode("ascii")
    arrays["digest"] = np.frombuffer(digest, dtype=np.uint8)
    path = Path(run_dir) / CHECKPOINT
    atomic_write_npz(path, arrays)
    return path


def _read_member(zf: zipfile.ZipFile, name: str, dtype: str, shape: list[int]) -> np.ndarray:
    """One array, its header checked against the listing BEFORE its data is read."""
    info = zf.getinfo(f"{name}.npy")
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            hdr_shape, fortran, hdr_dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            hdr_shape, fortran, hdr_dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise CheckpointError(f"array {name!r}: unknown .npy version {version}")
        if list(hdr_shape) != list(shape) or hdr_dtype.str != dtype or fortran:
            raise CheckpointError(
                f"array {name!r}: header says {hdr_dtype.str}{list(hdr_shape)}, "
                f"the digest listing {dtype}{list(shape)}"
            )
        nbytes = int(np.prod(shape, dtype=np.int64)) * hdr_dtype.itemsize
        if info.file_size != fh.tell() + nbytes:
            raise CheckpointError(f"array {name!r}: {info.file_size} bytes stored, expected more")
        data = fh.read(nbytes)
    if len(data) != nbytes:
        raise CheckpointError(f"array {name!r}: truncated")
    return np.frombuffer(data, dtype=hdr_dtype).reshape(shape).copy()


def _load_verified(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        for small in ("meta", "digest"):
            if f"{small}.npy" not in names:
                raise CheckpointError(f"no {small!r} entry (schema 1, or a dropped entry)")
            if zf.getinfo(f"{small}.npy").file_size > _META_MAX_BYTES:
                raise CheckpointError(f"{small!r} entry is implausibly large")
        with zf.open("meta.npy") as fh:
            meta_bytes = np.lib.format.read_array(fh, allow_pickle=False).tobytes()
        with zf.open("digest.npy") as fh:
            digest = np.lib.format.read_array(fh, allow_pickle=False).tobytes().decode("ascii")
        if hashlib.sha256(meta_bytes).hexdigest() != digest:
            raise CheckpointError("metadata digest mismatch")
        meta = json.loads(meta_bytes.decode("utf-8"))
        if meta.get("schema") != SCHEMA:
            raise CheckpointError(f"unsupported checkpoint schema {meta.get('schema')}")
        listing: dict[str, dict[str, Any]] = meta.pop("arrays")
        expected = {f"{k}.npy" for k in listing} | {"meta.npy", "digest.npy"}
        if names != expected:
            missing, extra = sorted(expected - names), sorted(names - expected)
            raise CheckpointError(f"entries missing {missing}, unexpected {extra}")
        arrays: dict[str, np.ndarray] = {}
        for name, spec in listing.items():
            a = _read_member(zf, name, spec["dtype"], spec["shape"])
            if array_digest(a) != spec["sha256"]:
                raise CheckpointError(f"array {name!r}: sha256 mismatch")
            arrays[name] = a
    return meta, arrays


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last completed round's state, or None when the run has none yet.

    Raises CheckpointError (one line, naming the file) when the file exists but any digest,
    header or entry disagrees with what was written.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        meta, arrays = _load_verified(path)
        rnd, run_id = int(meta.pop("round")), str(meta.pop("run_id"))
    except CheckpointError as err:
        raise CheckpointError(f"{path}: corrupt checkpoint refused: {err}") from None
    except Exception as err:  # any other parse failure of a damaged file
        raise CheckpointError(
            f"{path}: corrupt checkpoint refused: {type(err).__name__}: {err}".splitlines()[0]
        ) from None
    meta.pop("schema")
    weights = {k[2:]: v for k, v in arrays.items() if k.startswith("w/")}
    state = {k[2:]: v for k, v in arrays.items() if k.startswith("m/")}
    return Checkpoint(round=rnd, run_id=run_id, weights=weights, strategy_state=state, meta=meta)


def holds_a_run(run_dir: Path) -> list[str]:
    """The run files already in `run_dir` (empty: the directory holds no run)."""
    return [n for n in RUN_FILES if (Path(run_dir) / n).exists()]


def check_same_layout(
    weights: Mapping[str, np.ndarray], model: Mapping[str, np.ndarray], what: str
) -> None:
    """Refuse weights whose names, shapes or dtypes differ from the model's."""
    got = {k: (np.asarray(v).shape, np.asarray(v).dtype.str) for k, v in weights.items()}
    want = {k: (np.asarray(v).shape, np.asarray(v).dtype.str) for k, v in model.items()}
    if got != want:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        changed = sorted(k for k in set(got) & set(want) if got[k] != want[k])
        raise CheckpointError(
            f"{what} does not match the model: missing {missing}, extra {extra}, "
            f"different shape/dtype {changed}"
        )


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
    write_atomic(path, text.encode("utf-8"))


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
