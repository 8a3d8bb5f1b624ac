"""Tiny real fleet datasets for the bed's regions, canary planting, and deliberate corruption."""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def make_region_data(region: str, out: Path, vehicles: int = 4, episodes: int = 2,
                     seed: int = 5) -> Path:  # fmt: skip
    """Simulate a tiny dataset with highway-env (a few seconds per region)."""
    from fedfsd.data.generate import generate_dataset

    return generate_dataset(region, vehicles=vehicles, episodes=episodes, seed=seed, out=out,
                            workers=1, progress=False, overwrite=True)  # fmt: skip


def _rewrite(root: Path, fn) -> None:  # noqa: ANN001 - fn(pa.Table) -> pa.Table
    """Apply `fn` to every track table and keep the manifest's checksums and row counts true."""
    import pyarrow.parquet as pq

    from fedfsd.data.validate import sha256_file

    mpath = root / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for entry in manifest["files"]:
        path = root / entry["path"]
        table = fn(pq.read_table(path))
        pq.write_table(table, path)
        entry["sha256"] = sha256_file(path)
        entry["rows"] = table.num_rows
    mpath.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Canary:
    vehicle_id: str
    coords: list[float]  # float32-exact x/y values planted in the canary vehicle's rows


def plant_canary(root: Path) -> Canary:
    """Rename one fleet vehicle to a unique id and give a few of its rows unique x/y values.

    The values stay physically plausible (the original position plus a distinctive fraction), so
    the dataset still validates and trains. The recorded values are the float32 ones written.
    The fractions use the whole mantissa: k/1024 fractions left two zero bytes in a coordinate
    near 0 (0.1220703125 = 3D FA 00 00), a needle that once matched by chance in downlink weights.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    vid = f"CANARY-VEH-{secrets.token_hex(6)}"
    fractions = [0.31740617, 0.67091393, 0.12208943]  # no run of zero bits in float32
    coords: list[float] = []
    victim: dict[str, str] = {}

    def fn(table: pa.Table) -> pa.Table:
        ids = table.column("vehicle_id").to_pylist()
        fleet = table.column("is_fleet").to_pylist()
        if not victim:
            victim["id"] = next(i for i, f in zip(ids, fleet, strict=True) if f)
        rows = [k for k, i in enumerate(ids) if i == victim["id"]]
        if not rows:
            return table
        new_ids = [vid if i == victim["id"] else i for i in ids]
        x = np.asarray(table.column("x").to_numpy(), dtype=np.float32).copy()
        y = np.asarray(table.column("y").to_numpy(), dtype=np.float32).copy()
        if not coords:
            r0, r1 = rows[len(rows) // 2], rows[len(rows) // 2 + 1]
            x[r0] = np.float32(np.floor(x[r0]) + fractions[0])
            x[r1] = np.float32(np.floor(x[r1]) + fractions[1])
            y[r0] = np.float32(np.floor(y[r0]) + fractions[2])
            coords.extend([float(x[r0]), float(x[r1]), float(y[r0])])
        table = table.set_column(table.column_names.index("vehicle_id"), "vehicle_id",
                                 pa.array(new_ids, pa.string()))  # fmt: skip
        table = table.set_column(table.column_names.index("x"), "x", pa.array(x, pa.float32()))
        table = table.set_column(table.column_names.index("y"), "y", pa.array(y, pa.float32()))
        assert pc.sum(pc.equal(table.column("vehicle_id"), vid)).as_py() == len(rows)
        return table

    _rewrite(root, fn)
    return Canary(vid, coords)


def truncate_track(root: Path, keep: float = 0.5) -> str:
    """Cut the first track file short (a crash mid-copy); returns its relative path."""
    manifest = json.loads((root / "manifest.json").read_text())
    rel = manifest["files"][0]["path"]
    path = root / rel
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return rel


def wrong_schema(root: Path) -> str:
    """Store `x` as float64 in every track file, checksums kept true (only the schema is off)."""
    import pyarrow as pa

    def fn(table: pa.Table) -> pa.Table:
        i = table.column_names.index("x")
        return table.set_column(i, "x", table.column("x").cast(pa.float64()))

    _rewrite(root, fn)
    return "x"


def copy_dataset(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst
