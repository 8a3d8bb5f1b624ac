"""Fuzz pass over the fleet-log validator and loader with generated bad datasets (hypothesis).

A region's data directory is the one input nobody upstream checks. Starting from one tiny real
dataset (simulated once per module), each case damages a copy (truncation, byte flips, manifest
edits, schema edits with a consistent checksum so only the schema check can catch them) and
checks that `validate_dataset` / `load_vehicle_frames` either accept it or raise `DatasetError`
naming the file, never another exception and never a half-loaded result.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedfsd.data.schema import TRACK_COLUMNS
from fedfsd.data.validate import DatasetError, sha256_file, validate_dataset
from fedfsd.data.vehicles import load_vehicle_frames

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=8,
)


def report(capsys, name: str, seen: dict) -> None:
    with capsys.disabled():
        print(f"\n[fuzz] {name}: {seen['cases']} cases tried {seen}")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A real 4-vehicle, 2-episode dataset from the simulator (a few seconds, once)."""
    from fedfsd.data.generate import generate_dataset

    out = tmp_path_factory.mktemp("fuzzdata") / "eu"
    generate_dataset("eu", vehicles=4, episodes=2, seed=11, out=out, workers=1, progress=False)
    validate_dataset(out)
    return out


class Copy:
    """A throwaway copy of the dataset for one hypothesis case."""

    def __init__(self, src: Path) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fedfsd-fuzz-")
        self.root = Path(self._tmp.name) / "ds"
        shutil.copytree(src, self.root)
        self.manifest = json.loads((self.root / "manifest.json").read_text())

    def track(self, i: int) -> tuple[dict, Path]:
        entry = self.manifest["files"][i % len(self.manifest["files"])]
        return entry, self.root / entry["path"]

    def save_manifest(self) -> None:
        (self.root / "manifest.json").write_text(json.dumps(self.manifest))

    def __enter__(self) -> Copy:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


def _expect_error(root: Path, mentions: str | None = None, load: bool = False) -> str:
    with pytest.raises(DatasetError) as err:
        validate_dataset(root)
    msg = str(err.value)
    if mentions:
        assert mentions in msg, msg
    if load:
        with pytest.raises(DatasetError):
            load_vehicle_frames(root, split="all")
    return msg


def test_fuzz_truncated_and_flipped_tracks(dataset, capsys) -> None:
    """Any truncation or byte flip of a track file is a DatasetError naming that file."""
    seen = {"cases": 0, "truncated": 0, "flipped": 0}

    @FUZZ
    @given(st.integers(0, 9), st.data())
    def run(which: int, data) -> None:
        seen["cases"] += 1
        with Copy(dataset) as c:
            entry, path = c.track(which)
            blob = bytearray(path.read_bytes())
            if data.draw(st.booleans(), label="truncate"):
                seen["truncated"] += 1
                blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="keep")]
            else:
                seen["flipped"] += 1
                spots = st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=4, unique=True)
                for pos in data.draw(spots, label="flips"):
                    blob[pos] ^= data.draw(st.integers(1, 255), label="xor")
            path.write_bytes(bytes(blob))
            _expect_error(c.root, mentions=entry["path"], load=seen["cases"] % 10 == 0)

    run()
    report(capsys, "truncated/flipped track files", seen)


def test_fuzz_manifest_edits(dataset, capsys) -> None:
    """Arbitrary values, deleted keys or garbage manifests: DatasetError or a clean accept."""
    seen = {"cases": 0, "rejected": 0, "accepted": 0}

    @FUZZ
    @given(st.data())
    def run(data) -> None:
        seen["cases"] += 1
        with Copy(dataset) as c:
            kind = data.draw(st.sampled_from(["value", "delete", "garbage", "file-entry"]))
            keys = sorted(c.manifest)
            if kind == "value":
                c.manifest[data.draw(st.sampled_from(keys))] = data.draw(JSON)
                c.save_manifest()
            elif kind == "delete":
                del c.manifest[data.draw(st.sampled_from(keys))]
                c.save_manifest()
            elif kind == "file-entry":
                entry = c.manifest["files"][0]
                field = data.draw(st.sampled_from(["path", "sha256", "rows"]))
                entry[field] = data.draw(
                    JSON | st.sampled_from(["../../etc/passwd", "/etc/passwd", "tracks/none"])
                )
                c.save_manifest()
            else:
                (c.root / "manifest.json").write_bytes(data.draw(st.binary(max_size=64)))
            try:
                validate_dataset(c.root)
            except DatasetError as err:
                seen["rejected"] += 1
                assert str(err)
                return
            seen["accepted"] += 1

    run()
    assert seen["rejected"] > 0
    report(capsys, "manifest edits", seen)


def _schema_edit(table: pa.Table, data) -> tuple[pa.Table, str]:
    """One schema-level defect; returns the table and the column it concerns."""
    name = data.draw(st.sampled_from(list(TRACK_COLUMNS)), label="column")
    kind = data.draw(st.sampled_from(["drop", "rename", "retype", "null", "nan", "dup", "extra"]))
    i = table.column_names.index(name)
    col = table.column(name)
    if kind == "drop":
        return table.remove_column(i), name
    if kind == "rename":
        return table.rename_columns(
            [n + "_x" if n == name else n for n in table.column_names]
        ), name
    if kind == "retype":  # float32 -> float64, string -> int64, int/bool -> string
        if pa.types.is_floating(col.type):
            new = col.cast(pa.float64())
        elif pa.types.is_string(col.type):
            new = pa.array(np.arange(len(col), dtype=np.int64))
        else:
            new = pa.array([str(v) for v in col.to_pylist()])
        return table.set_column(i, name, new), name
    row = data.draw(st.integers(0, table.num_rows - 1), label="row")
    if kind == "null":
        vals = col.to_pylist()
        vals[row] = None
        return table.set_column(i, pa.field(name, col.type), pa.array(vals, col.type)), name
    if kind == "nan":
        fname = data.draw(st.sampled_from(["x", "y", "speed", "accel", "t"]), label="fcol")
        j = table.column_names.index(fname)
        vals = np.asarray(table.column(fname).to_numpy(), dtype=np.float32).copy()
        vals[row] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return table.set_column(j, fname, pa.array(vals, pa.float32())), fname
    if kind == "dup":
        return pa.concat_tables([table, table.slice(row, 1)]), "duplicate"
    return table.append_column("gps_trace", pa.array(np.zeros(table.num_rows))), "gps_trace"


def test_fuzz_wrong_schema(dataset, capsys) -> None:
    """Schema defects with a *matching* checksum and row count (only the schema check can catch
    them) are DatasetErrors naming the file; the loader never half-loads them."""
    seen = {"cases": 0}

    @FUZZ
    @given(st.integers(0, 9), st.data())
    def run(which: int, data) -> None:
        seen["cases"] += 1
        with Copy(dataset) as c:
            entry, path = c.track(which)
            table, concern = _schema_edit(pq.read_table(path), data)
            pq.write_table(table, path)
            entry["sha256"] = sha256_file(path)
            entry["rows"] = table.num_rows
            c.save_manifest()
            msg = _expect_error(c.root, mentions=entry["path"], load=seen["cases"] % 10 == 0)
            assert concern.split("_x")[0] in msg or "duplicate" in msg, msg

    run()
    report(capsys, "wrong schema", seen)
