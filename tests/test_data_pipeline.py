"""Simulated fleet datasets end to end: reproducibility, validation, grouping, splits, BEV, CLI.

Sizes are tiny (8 vehicles per episode, 9 s episodes); datasets are generated once per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomli_w
from typer.testing import CliRunner

from fedfsd.cli import app
from fedfsd.data.feature_spec import FEATURE_NAMES, LABEL_NAMES
from fedfsd.data.generate import generate_dataset
from fedfsd.data.profiles import RegionProfile, load_region
from fedfsd.data.validate import DatasetError, sha256_file, validate_dataset
from fedfsd.data.vehicles import load_vehicle_frames

runner = CliRunner()


def tiny(region: str, **episode) -> RegionProfile:
    d = load_region(region).model_dump(mode="json")
    d["traffic"]["vehicles_per_episode"] = 8
    d["episode"].update({"duration_s": 9.0, "warmup_s": 2.0, **episode})
    return RegionProfile.model_validate(d)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fleet")
    out = {}
    out["w1"] = generate_dataset(tiny("cn"), 10, 4, 11, root / "w1", workers=1, progress=False)
    out["w2"] = generate_dataset(tiny("cn"), 10, 4, 11, root / "w2", workers=2, progress=False)
    out["seed12"] = generate_dataset(tiny("cn"), 10, 4, 12, root / "s12", workers=1, progress=False)
    out["bev"] = generate_dataset(
        tiny("eu"), 6, 2, 5, root / "bev", workers=1, with_bev=True, progress=False
    )
    return out


def _checksums(path: Path) -> list[str]:
    return [f["sha256"] for f in json.loads((path / "manifest.json").read_text())["files"]]


def test_same_seed_same_bytes_whatever_workers(datasets) -> None:
    a, b, c = datasets["w1"], datasets["w2"], datasets["seed12"]
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    for f in json.loads((a / "manifest.json").read_text())["files"]:
        assert sha256_file(a / f["path"]) == sha256_file(b / f["path"]) == f["sha256"]
    assert set(_checksums(a)).isdisjoint(_checksums(c))


def test_manifest_contents(datasets) -> None:
    m = validate_dataset(datasets["w1"])
    assert m["schema_version"] == 1 and m["region"] == "cn" and m["seed"] == 11
    assert m["profile"]["name"] == "cn" and m["vehicles"] == 10 and len(m["files"]) == 4
    assert 0.0 <= m["counts"]["crash_rate"] <= 1.0 and m["fleet_id"].startswith("cn-")


def test_grouping_by_vehicle_and_episode_split(datasets) -> None:
    path = datasets["w1"]
    tr = load_vehicle_frames(path, "train")
    va = load_vehicle_frames(path, "val")
    te = load_vehicle_frames(path, "test")
    al = load_vehicle_frames(path, "all")
    ep_tr, ep_va, ep_te = (set(f.episodes.tolist()) for f in (tr, va, te))
    assert ep_tr.isdisjoint(ep_te) and ep_tr.isdisjoint(ep_va) and ep_va.isdisjoint(ep_te)
    assert ep_tr | ep_va | ep_te == set(range(4))
    assert tr.n_frames + va.n_frames + te.n_frames == al.n_frames
    assert tr.features.shape == (tr.n_frames, len(FEATURE_NAMES))
    assert tr.labels.shape == (tr.n_frames, len(LABEL_NAMES))
    assert np.isfinite(al.features).all() and np.isfinite(al.labels).all()
    assert len(set(al.vehicle_ids)) == al.n_vehicles <= 10
    assert all(v.startswith(al.fleet_id) for v in al.vehicle_ids)
    # Each vehicle's frames come from episodes where that vehicle drove as a fleet vehicle.
    tracks = {}
    for f in al.manifest["files"]:
        t = pq.read_table(path / f["path"]).to_pydict()
        for vid, fleet, ep in zip(t["vehicle_id"], t["is_fleet"], t["episode"], strict=True):
            if fleet:
                tracks.setdefault(vid, set()).add(ep)
    for v, vid in enumerate(al.vehicle_ids):
        lo, hi = al.offsets[v], al.offsets[v + 1]
        assert hi > lo and set(al.episodes[lo:hi].tolist()) <= tracks[vid]
    # The K cap holds on real data too.
    x, y, mask = al.sample(np.arange(al.n_vehicles), 7, np.random.default_rng(0))
    assert mask.sum(1).max() == 7 and x.shape[:2] == (al.n_vehicles, 7)


def test_labels_are_physical(datasets) -> None:
    fr = load_vehicle_frames(datasets["w1"], "all")
    speed = fr.features[:, FEATURE_NAMES.index("ego_speed")] * 30.0
    dx1 = fr.labels[:, LABEL_NAMES.index("dx_1s")]
    dx3 = fr.labels[:, LABEL_NAMES.index("dx_3s")]
    assert np.median(np.abs(dx1 - speed)) < 1.5  # ~ speed × 1 s
    assert np.all(dx3 >= dx1 - 1e-3)


def test_bev_frames_are_not_blank(datasets) -> None:
    fr = load_vehicle_frames(datasets["bev"], "all")
    assert fr.bev is not None and fr.bev.shape == (fr.n_frames, 2, 48, 128)
    assert fr.bev.dtype == np.uint8
    flat = fr.bev.reshape(fr.n_frames, 2, -1)
    assert (flat[:, 0].max(axis=1) == 255).all()  # every frame shows at least the ego
    assert (flat[:, 1].max(axis=1) == 255).mean() > 0.9  # ... and where it was 1 s ago
    assert (flat.std(axis=2) > 0).all()
    assert (fr.bev[:, 0] != fr.bev[:, 1]).any(axis=(1, 2)).mean() > 0.9  # traffic moved in 1 s
    x, _, mask = fr.sample(np.array([0]), 3, np.random.default_rng(1), modality="bev")
    assert x.shape == (1, 3, 2, 48, 128) and x[mask].max() == 1.0


# ---------------------------------------------------------------- validation failures


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(src, dst)
    return dst


def _rewrite(ds: Path, table: pa.Table, fix_checksum: bool = True) -> str:
    m = json.loads((ds / "manifest.json").read_text())
    rel = m["files"][0]["path"]
    pq.write_table(table, ds / rel)
    if fix_checksum:
        m["files"][0]["sha256"] = sha256_file(ds / rel)
        (ds / "manifest.json").write_text(json.dumps(m))
    return rel


def _first_table(ds: Path) -> pa.Table:
    rel = json.loads((ds / "manifest.json").read_text())["files"][0]["path"]
    return pq.read_table(ds / rel)


def _expect_bad(ds: Path, *needles: str) -> None:
    with pytest.raises(DatasetError) as err:
        validate_dataset(ds)
    for n in needles:
        assert n in str(err.value), (n, str(err.value))
    with pytest.raises(DatasetError):
        load_vehicle_frames(ds, "all")  # loading never half-loads a bad dataset
    res = runner.invoke(app, ["data", "validate", str(ds)])
    assert res.exit_code != 0
    assert needles[0] in " ".join(res.output.split())


def test_validate_good(datasets) -> None:
    res = runner.invoke(app, ["data", "validate", str(datasets["w1"])])
    assert res.exit_code == 0, res.output


def test_missing_file(datasets, tmp_path) -> None:
    ds = _copy(datasets["w1"], tmp_path)
    (ds / "tracks" / "episode_00002.parquet").unlink()
    _expect_bad(ds, "tracks/episode_00002.parquet", "missing file")


def test_truncated_file(datasets, tmp_path) -> None:
    ds = _copy(datasets["w1"], tmp_path)
    p = ds / "tracks" / "episode_00001.parquet"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    _expect_bad(ds, "tracks/episode_00001.parquet")


def test_corrupted_file(datasets, tmp_path) -> None:
    ds = _copy(datasets["w1"], tmp_path)
    p = ds / "tracks" / "episode_00003.parquet"
    raw = bytearray(p.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[i] ^= 0xFF
    p.write_bytes(bytes(raw))
    _expect_bad(ds, "tracks/episode_00003.parquet")


def test_checksum_mismatch(datasets, tmp_path) -> None:
    ds = _copy(datasets["w1"], tmp_path)
    t = _first_table(ds)
    x = t.column("x").to_numpy().copy()
    x[3] += 1.0
    rel = _rewrite(ds, t.set_column(t.schema.get_field_index("x"), "x", pa.array(x)), False)
    _expect_bad(ds, rel, "checksum mismatch")


def test_missing_column(datasets, tmp_path) -> None:
    ds = _copy(datasets["w1"], tmp_path)
    rel = _rewrite(ds, _first_table(ds).drop_columns(["vy"]))
    _expect_bad(ds, rel, "missing column 'vy'")


def test_wrong_column_type_and_extra_column(datasets, tmp_path) -> None:
    ds = _copy(datasets["w1"], tmp_path)
    t = _first_table(ds)
    i = t.schema.get_field_index("speed")
    rel = _rewrite(ds, t.set_column(i, "speed", t.column("speed").cast(pa.string())))
    _expect_bad(ds, rel, "column 'speed'")
    rel = _rewrite(ds, t.append_column("extra", pa.array(np.zeros(t.num_rows))))
    _expect_bad(ds, rel, "unexpected column 'extra'")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf(datasets, tmp_path, bad) -> None:
    ds = _copy(datasets["w1"], tmp_path)
    t = _first_table(ds)
    v = t.column("vx").to_numpy().copy()
    v[17] = bad
    i = t.schema.get_field_index("vx")
    rel = _rewrite(ds, t.set_column(i, pa.field("vx", pa.float32(), False), pa.array(v)))
    _expect_bad(ds, rel, "row 17", "column 'vx'")


def test_unknown_schema_version_and_missing_manifest(datasets, tmp_path) -> None:
    ds = _copy(datasets["w1"], tmp_path)
    m = json.loads((ds / "manifest.json").read_text())
    m["schema_version"] = 99
    (ds / "manifest.json").write_text(json.dumps(m))
    _expect_bad(ds, "manifest.json", "unknown schema version 99")
    (ds / "manifest.json").unlink()
    _expect_bad(ds, "manifest.json", "missing manifest")


# ---------------------------------------------------------------- profiles, mirror, CLI


def test_jp_is_an_exact_lateral_mirror() -> None:
    from fedfsd.data.fleet import draw_drivers
    from fedfsd.data.simulate import simulate_episode

    lht = tiny("jp")
    rht = RegionProfile.model_validate({**lht.model_dump(), "left_hand_traffic": False})
    drivers = draw_drivers(lht, 4, np.random.default_rng(0))
    ids = [f"v{i}" for i in range(4)]
    a = simulate_episode(lht, 1, 3, ids, drivers).columns
    b = simulate_episode(rht, 1, 3, ids, drivers).columns
    assert a["scenario"][0] == "merge"  # the layout where handedness matters
    np.testing.assert_array_equal(a["x"], b["x"])
    for k in ("y", "vy", "heading", "steering", "lane_offset", "lane_change"):
        np.testing.assert_array_equal(a[k], -b[k])
    np.testing.assert_array_equal(a["lane"], a["n_lanes"] - 1 - b["lane"])
    # Right-hand traffic drives its merge lane on the right (-y), left-hand on the left (+y).
    ramp_r = b["merge_distance"] < 1000
    assert (b["y"][ramp_r].min() < 0) and (a["y"][ramp_r].max() > 0)


def test_profile_errors_name_the_field(tmp_path) -> None:
    d = load_region("eu").model_dump(mode="json")
    d["road"]["lanes"] = 0
    bad = tmp_path / "bad.toml"
    bad.write_text(tomli_w.dumps(d))
    res = runner.invoke(
        app, ["data", "generate", "--profile", str(bad), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code != 0 and "road.lanes" in res.output
    assert "Traceback" not in res.output
    d = load_region("eu").model_dump(mode="json")
    d["drivers"]["politeness"]["oops"] = 1
    bad.write_text(tomli_w.dumps(d))
    res = runner.invoke(
        app, ["data", "generate", "--profile", str(bad), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code != 0 and "drivers.politeness.oops" in res.output
    res = runner.invoke(app, ["data", "generate", "--region", "xx", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "unknown region" in res.output


def test_cli_generate_from_profile_file_and_stats(tmp_path) -> None:
    prof = tmp_path / "tiny.toml"
    prof.write_text(tomli_w.dumps(tiny("us").model_dump(mode="json")))
    out = tmp_path / "us"
    args = ["data", "generate", "--profile", str(prof), "--vehicles", "5", "--episodes", "2"]
    res = runner.invoke(app, [*args, "--seed", "1", "--workers", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["data", "stats", str(out)])
    assert res.exit_code == 0 and "ego_speed" in res.output and "vehicles" in res.output
    res = runner.invoke(app, [*args, "--seed", "1", "--out", str(out)])
    assert res.exit_code != 0 and "not empty" in res.output


def test_out_of_range_value_and_bad_manifest_types(datasets, tmp_path) -> None:
    ds = _copy(datasets["w1"], tmp_path)
    t = _first_table(ds)
    lane = t.column("lane").to_numpy().copy()
    lane[9] = 7
    i = t.schema.get_field_index("lane")
    rel = _rewrite(ds, t.set_column(i, pa.field("lane", pa.int8(), False), pa.array(lane)))
    _expect_bad(ds, rel, "row 9", "column 'lane'")
    ds2 = _copy(datasets["w1"], tmp_path / "b")
    m = json.loads((ds2 / "manifest.json").read_text())
    m["seed"] = "seven"
    (ds2 / "manifest.json").write_text(json.dumps(m))
    _expect_bad(ds2, "manifest.json", "'seed'")
