"""Dataset validation: the same checks guard `fedfsd data validate` and every load.

A bad dataset raises `DatasetError` whose message names the file (and row/column where it
applies); loaders call `read_validated` so they never half-load.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedfsd.data.schema import FLOAT_COLUMNS, MANIFEST_NAME, SCHEMA_VERSION, TRACK_COLUMNS
from fedfsd.errors import InputError

REQUIRED_KEYS = ("schema_version", "region", "fleet_id", "seed", "log_hz", "warmup_s", "files")


class DatasetError(InputError, ValueError):
    """A dataset directory is missing, malformed or corrupted (message names file/row/column)."""

    border_reason = "dataset invalid"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    """Parse and check manifest.json (keys, schema version, file list)."""
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise DatasetError(f"{root}: not a dataset directory")
    if not path.is_file():
        raise DatasetError(f"{path}: missing manifest")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(m, dict):
        raise DatasetError(f"{path}: manifest must be a JSON object")
    if "schema_version" not in m:
        raise DatasetError(f"{path}: missing key 'schema_version'")
    if m["schema_version"] != SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: unknown schema version {m['schema_version']!r} (this fedfsd reads "
            f"{SCHEMA_VERSION})"
        )
    for key in REQUIRED_KEYS:
        if key not in m:
            raise DatasetError(f"{path}: missing key '{key}'")
    _check_types(path, m)
    files = m["files"]
    if not isinstance(files, list) or not files:
        raise DatasetError(f"{path}: 'files' must be a non-empty list")
    seen: set[str] = set()
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or not {"path", "sha256", "rows"} <= set(entry):
            raise DatasetError(f"{path}: files[{i}] needs 'path', 'sha256' and 'rows'")
        rel = entry["path"]
        if not isinstance(rel, str) or not rel or "\x00" in rel:
            raise DatasetError(f"{path}: files[{i}].path must be a non-empty string")
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts:
            raise DatasetError(f"{path}: files[{i}] path {rel!r} escapes the dataset")
        if rel in seen or rel == MANIFEST_NAME:
            raise DatasetError(f"{path}: files[{i}] path {rel!r} listed twice")
        seen.add(rel)
        sha = entry["sha256"]
        if not isinstance(sha, str) or len(sha) != 64 or set(sha) - set("0123456789abcdef"):
            raise DatasetError(f"{path}: files[{i}].sha256 must be 64 lowercase hex digits")
        if not _is_int(entry["rows"]) or entry["rows"] < 0:
            raise DatasetError(f"{path}: files[{i}].rows must be a non-negative integer")
    return m


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_types(path: Path, m: dict[str, Any]) -> None:
    """Types of the keys the loader uses, so a bad manifest fails here, not deep in loading."""
    for key in ("region", "fleet_id"):
        if not isinstance(m[key], str) or not m[key]:
            raise DatasetError(f"{path}: '{key}' must be a non-empty string")
    if not _is_int(m["seed"]) or m["seed"] < 0:
        raise DatasetError(f"{path}: 'seed' must be a non-negative integer")
    if not _is_int(m["log_hz"]) or not 1 <= m["log_hz"] <= 1000:
        raise DatasetError(f"{path}: 'log_hz' must be an integer in 1..1000")
    if not _is_num(m["warmup_s"]) or m["warmup_s"] < 0:
        raise DatasetError(f"{path}: 'warmup_s' must be a number >= 0")
    if "with_bev" in m and not isinstance(m["with_bev"], bool):
        raise DatasetError(f"{path}: 'with_bev' must be true or false")
    split = m.get("split", {})
    if not isinstance(split, dict):
        raise DatasetError(f"{path}: 'split' must be an object")
    if "seed" in split and (not _is_int(split["seed"]) or split["seed"] < 0):
        raise DatasetError(f"{path}: 'split.seed' must be a non-negative integer")
    if "test_fraction" in split and not (
        _is_num(split["test_fraction"]) and 0 <= split["test_fraction"] < 1
    ):
        raise DatasetError(f"{path}: 'split.test_fraction' must be in [0, 1)")
    if "val_fraction" in split and not (
        _is_num(split["val_fraction"])
        and 0 <= split["val_fraction"] < 1
        and split["val_fraction"] + split.get("test_fraction", 0.2) < 1
    ):
        raise DatasetError(
            f"{path}: 'split.val_fraction' must be in [0, 1) and leave room for training"
        )
    if "fleet_scale" in m and not isinstance(m["fleet_scale"], dict):
        raise DatasetError(f"{path}: 'fleet_scale' must be an object")
    prof = m.get("profile")
    if prof is not None:
        if not isinstance(prof, dict):
            raise DatasetError(f"{path}: 'profile' must be an object")
        sensing = prof.get("sensing")
        if sensing is not None:
            keys = ("range_m", "noise_m", "rain_range_m", "rain_noise_m")
            if not isinstance(sensing, dict) or not all(
                _is_num(sensing.get(k)) and sensing[k] >= 0 for k in keys
            ):
                raise DatasetError(f"{path}: 'profile.sensing' needs numbers >= 0 for {keys}")


def _check_table(rel: str, table) -> dict[str, np.ndarray]:  # noqa: ANN001 - pyarrow.Table
    import pyarrow as pa

    names = table.column_names
    for name, (typ, _, _) in TRACK_COLUMNS.items():
        if name not in names:
            raise DatasetError(f"{rel}: missing column '{name}'")
        got = table.schema.field(name).type
        if pa.types.is_dictionary(got):
            got = got.value_type
        if got != typ and not (pa.types.is_large_string(got) and typ == pa.string()):
            raise DatasetError(f"{rel}: column '{name}' has type {got}, expected {typ}")
    extra = [n for n in names if n not in TRACK_COLUMNS]
    if extra:
        raise DatasetError(f"{rel}: unexpected column '{extra[0]}'")
    cols: dict[str, np.ndarray] = {}
    for name in TRACK_COLUMNS:
        col = table.column(name)
        if col.null_count:
            row = int(np.flatnonzero(np.asarray(col.is_null()))[0])
            raise DatasetError(f"{rel}: row {row}, column '{name}': null value")
        cols[name] = col.to_numpy(zero_copy_only=False)
    for name in FLOAT_COLUMNS:
        bad = ~np.isfinite(cols[name])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DatasetError(f"{rel}: row {row}, column '{name}': {cols[name][row]} (not finite)")
    _check_ranges(rel, cols)
    if len(cols["frame"]):
        key = np.char.add(cols["vehicle_id"].astype(str), "#" + cols["frame"].astype(str))
        uniq, first = np.unique(key, return_index=True)
        if len(uniq) != len(key):
            dup = np.setdiff1d(np.arange(len(key)), first)[0]
            raise DatasetError(f"{rel}: row {int(dup)}: duplicate (vehicle_id, frame)")
    return cols


MAX_FRAME_SPAN = 1_000_000  # frames in one file's episode (keeps the per-episode grid bounded)


def _check_ranges(rel: str, cols: dict[str, np.ndarray]) -> None:
    """Value checks the feature code relies on, each naming the first bad row."""
    checks = [
        ("frame", cols["frame"] < 0, "must be >= 0"),
        ("n_lanes", cols["n_lanes"] < 1, "must be >= 1"),
        ("lane", (cols["lane"] < 0) | (cols["lane"] >= cols["n_lanes"]), "must be in [0, n_lanes)"),
        ("lane_change", np.abs(cols["lane_change"]) > 1, "must be -1, 0 or 1"),
        ("length", cols["length"] <= 0, "must be > 0"),
        ("width", cols["width"] <= 0, "must be > 0"),
        ("merge_distance", cols["merge_distance"] < 0, "must be >= 0"),
        ("vehicle_id", np.char.str_len(cols["vehicle_id"].astype(str)) == 0, "must not be empty"),
    ]
    for name, bad, what in checks:
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DatasetError(f"{rel}: row {row}, column '{name}': {cols[name][row]!r} {what}")
    for ep in np.unique(cols["episode"]):
        f = cols["frame"][cols["episode"] == ep]
        if f.max() - f.min() > MAX_FRAME_SPAN:
            raise DatasetError(f"{rel}: column 'frame': episode {ep} spans > {MAX_FRAME_SPAN}")


def _read_checked(root: Path, entry: dict[str, Any]) -> dict[str, np.ndarray]:
    """One listed track file, checksummed, parsed and checked (DatasetError names the file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rel = entry["path"]
    fp = root / rel
    if not fp.is_file():
        raise DatasetError(f"{rel}: missing file")
    raw = fp.read_bytes()  # hash and parse the same bytes
    digest = hashlib.sha256(raw).hexdigest()
    try:
        table = pq.read_table(pa.BufferReader(raw))
    except Exception as err:  # pyarrow raises several types for broken files
        raise DatasetError(f"{rel}: unreadable Parquet (truncated or corrupted): {err}") from None
    if digest != entry["sha256"]:
        # Only a file that is exactly what the manifest promised is parsed any further.
        raise DatasetError(
            f"{rel}: checksum mismatch (manifest {entry['sha256'][:12]}…, file {digest[:12]}…)"
        )
    if table.num_rows != entry["rows"]:
        raise DatasetError(f"{rel}: {table.num_rows} rows, manifest says {entry['rows']}")
    return _check_table(rel, table)


def iter_validated(
    path: str | Path, manifest: dict[str, Any] | None = None
) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """Yield (manifest file entry, checked columns) file by file: memory stays one file deep.

    A consumer that must not act on a half-valid dataset finishes the iteration first (or
    discards what it built when a DatasetError is raised).
    """
    root = Path(path)
    m = read_manifest(root) if manifest is None else manifest
    for entry in m["files"]:
        yield entry, _read_checked(root, entry)


def read_validated(path: str | Path) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
    """Validate everything, then return (manifest, one column dict per track file)."""
    m = read_manifest(Path(path))
    return m, [cols for _, cols in iter_validated(path, m)]


def validate_dataset(path: str | Path) -> dict[str, Any]:
    """Raise DatasetError on the first problem; return the manifest of a good dataset."""
    m = read_manifest(Path(path))
    for _ in iter_validated(path, m):
        pass
    return m
