"""Dataset validation: the same checks guard `fedfsd data validate` and every load.

A bad dataset raises `DatasetError` whose message names the file (and row/column where it
applies); loaders call `read_validated` so they never half-load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedfsd.data.schema import FLOAT_COLUMNS, MANIFEST_NAME, SCHEMA_VERSION, TRACK_COLUMNS

REQUIRED_KEYS = ("schema_version", "region", "fleet_id", "seed", "log_hz", "warmup_s", "files")


class DatasetError(ValueError):
    """A dataset directory is missing, malformed or corrupted (message names file/row/column)."""


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
    files = m["files"]
    if not isinstance(files, list) or not files:
        raise DatasetError(f"{path}: 'files' must be a non-empty list")
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or not {"path", "sha256", "rows"} <= set(entry):
            raise DatasetError(f"{path}: files[{i}] needs 'path', 'sha256' and 'rows'")
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise DatasetError(f"{path}: files[{i}] path {entry['path']!r} escapes the dataset")
    if not isinstance(m["log_hz"], int) or m["log_hz"] < 1:
        raise DatasetError(f"{path}: 'log_hz' must be a positive integer")
    return m


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
    if len(cols["frame"]):
        key = np.char.add(cols["vehicle_id"].astype(str), "#" + cols["frame"].astype(str))
        uniq, first = np.unique(key, return_index=True)
        if len(uniq) != len(key):
            dup = np.setdiff1d(np.arange(len(key)), first)[0]
            raise DatasetError(f"{rel}: row {int(dup)}: duplicate (vehicle_id, frame)")
    return cols


def read_validated(path: str | Path) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
    """Validate everything, then return (manifest, one column dict per track file)."""
    import pyarrow.parquet as pq

    root = Path(path)
    m = read_manifest(root)
    tables = []
    for entry in m["files"]:
        rel = entry["path"]
        fp = root / rel
        if not fp.is_file():
            raise DatasetError(f"{rel}: missing file")
        digest = sha256_file(fp)
        try:
            table = pq.read_table(fp)
        except Exception as err:  # pyarrow raises several types for broken files
            raise DatasetError(
                f"{rel}: unreadable Parquet (truncated or corrupted): {err}"
            ) from None
        cols = _check_table(rel, table)
        if digest != entry["sha256"]:
            raise DatasetError(
                f"{rel}: checksum mismatch (manifest {entry['sha256'][:12]}…, file {digest[:12]}…)"
            )
        if table.num_rows != entry["rows"]:
            raise DatasetError(f"{rel}: {table.num_rows} rows, manifest says {entry['rows']}")
        tables.append(cols)
    return m, tables


def validate_dataset(path: str | Path) -> dict[str, Any]:
    """Raise DatasetError on the first problem; return the manifest of a good dataset."""
    m, _ = read_validated(path)
    return m
