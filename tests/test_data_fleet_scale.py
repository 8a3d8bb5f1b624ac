"""Fleet-scale generation (issue 18, item 1) and the public, region-less profile.

Fleet-scale mode changes only how the fleet is sampled into episodes (all fleet, 60 per episode,
8 s): the region's road, density, driver styles, weather and sensing must stay its own.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fedfsd.cli import app
from fedfsd.data.fleet import episode_members
from fedfsd.data.fleet_scale import FleetScale, auto_episodes, fleet_scale_profile
from fedfsd.data.generate import generate_dataset
from fedfsd.data.profiles import BUILTIN_REGIONS, ProfileError, load_region
from fedfsd.data.validate import sha256_file, validate_dataset
from fedfsd.data.vehicles import load_vehicle_frames

runner = CliRunner()


@pytest.mark.parametrize("region", [*BUILTIN_REGIONS, "public"])
def test_fleet_scale_profile_keeps_the_region(region: str) -> None:
    base = load_region(region)
    fs = fleet_scale_profile(base, FleetScale())
    a, b = base.model_dump(), fs.model_dump()
    for key in ("name", "left_hand_traffic", "road", "drivers", "weather", "sensing"):
        assert a[key] == b[key], key
    assert b["traffic"]["vehicles_per_km_per_lane"] == a["traffic"]["vehicles_per_km_per_lane"]
    assert b["traffic"]["fleet_share"] == 1.0 and b["traffic"]["vehicles_per_episode"] == 60
    assert (b["episode"]["duration_s"], b["episode"]["warmup_s"]) == (8.0, 2.0)
    assert b["episode"]["sim_hz"] == a["episode"]["sim_hz"]


@pytest.mark.parametrize(("vehicles", "appearances"), [(10_000, 3.0), (1000, 2.0), (61, 3.0)])
def test_auto_episodes_give_every_vehicle_about_the_asked_appearances(vehicles, appearances):
    cfg = FleetScale(appearances=appearances)
    episodes = auto_episodes(vehicles, cfg)
    members = episode_members(vehicles, 60, episodes, seed=0)
    counts = Counter(int(v) for m in members for v in m)
    assert len(counts) == vehicles
    per = np.array(list(counts.values()))
    assert per.min() >= int(appearances) - 1 and per.max() <= int(np.ceil(appearances)) + 1
    assert abs(per.mean() - appearances) < 60 / vehicles + 1e-9 + 0.05 * appearances


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fleetscale")
    kw = {"fleet_scale": True, "appearances": 1.0, "progress": False}
    return {
        "w1": generate_dataset("eu", 120, None, 4, root / "w1", workers=1, **kw),
        "w2": generate_dataset("eu", 120, None, 4, root / "w2", workers=2, **kw),
    }


def test_fleet_scale_dataset(fleet) -> None:
    m = validate_dataset(fleet["w1"])
    assert m["episodes"] == 2 and m["vehicles"] == 120
    assert m["fleet_scale"] == {
        "enabled": True,
        "vehicles_per_episode": 60,
        "duration_s": 8.0,
        "warmup_s": 2.0,
        "appearances": 1.0,
    }
    assert m["profile"]["traffic"]["fleet_share"] == 1.0 and m["warmup_s"] == 2.0
    seen: Counter = Counter()
    for f in m["files"]:
        t = pq.read_table(fleet["w1"] / f["path"]).to_pydict()
        assert all(t["is_fleet"])  # no unlogged background traffic
        assert max(t["t"]) == pytest.approx(8.0)
        seen.update(set(t["vehicle_id"]))
    assert len(seen) == 120 and set(seen.values()) == {1}  # 120 vehicles, 60 per episode
    al = load_vehicle_frames(fleet["w1"], "all")
    per_v = al.frames_per_vehicle()
    assert al.n_vehicles > 110 and np.median(per_v) == 16  # t in [2 s, 5 s] at 5 Hz


def test_fleet_scale_is_byte_identical_whatever_workers(fleet) -> None:
    a, b = fleet["w1"], fleet["w2"]
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    for f in json.loads((a / "manifest.json").read_text())["files"]:
        assert sha256_file(a / f["path"]) == sha256_file(b / f["path"]) == f["sha256"]


def test_fleet_scale_and_stock_datasets_are_different_fleets(tmp_path) -> None:
    stock = json.loads(
        (
            generate_dataset("eu", 120, 1, 4, tmp_path / "s", workers=1, progress=False)
            / "manifest.json"
        ).read_text()
    )
    assert stock["fleet_scale"] == {"enabled": False}
    fs = fleet_scale_profile(load_region("eu"), FleetScale())
    assert stock["profile"] != fs.model_dump(mode="json")


def test_episodes_required_without_fleet_scale(tmp_path) -> None:
    with pytest.raises(ValueError, match="episodes is required"):
        generate_dataset("eu", 10, None, 0, tmp_path / "x", progress=False)


def test_cli_fleet_scale_without_episodes(tmp_path) -> None:
    out = tmp_path / "us"
    args = ["data", "generate", "--region", "us", "--vehicles", "60", "--fleet-scale"]
    more = ["--appearances", "1", "--fleet-warmup", "3", "--workers", "1", "--out", str(out)]
    res = runner.invoke(app, [*args, *more])
    assert res.exit_code == 0, res.output
    assert "fleet-scale" in res.output
    m = validate_dataset(out)
    assert m["episodes"] == 1 and m["fleet_scale"]["enabled"] is True
    assert (m["fleet_scale"]["warmup_s"], m["fleet_scale"]["duration_s"]) == (3.0, 9.0)
    assert m["warmup_s"] == 3.0
    fr = load_vehicle_frames(out, "all")
    assert np.median(fr.frames_per_vehicle()) == 16  # t in [3 s, 6 s]


def test_public_profile_mixes_roads_and_belongs_to_no_region(tmp_path) -> None:
    from fedfsd.data.profiles import RegionProfile

    pub = load_region("public")
    assert pub.name not in BUILTIN_REGIONS and not pub.left_hand_traffic
    assert set(pub.road.lanes_mix) == {2, 3, 4} and len(pub.road.speed_limits_kmh) >= 3
    d = pub.model_dump(mode="json")  # small and highway-only, so n_lanes is the lane count
    d["road"]["scenario_mix"] = {"highway": 1.0}
    d["traffic"]["vehicles_per_episode"] = 8
    d["episode"].update({"duration_s": 7.0, "warmup_s": 2.0})
    ds = generate_dataset(
        RegionProfile.model_validate(d), 12, 10, 2, tmp_path / "pub", workers=1, progress=False
    )
    m = validate_dataset(ds)
    assert m["region"] == "public"
    lanes, limits = set(), set()
    for f in m["files"]:
        t = pq.read_table(ds / f["path"], columns=["n_lanes", "speed_limit"])
        lanes |= set(np.asarray(t["n_lanes"]).tolist())
        limits |= {round(float(v) * 3.6) for v in np.asarray(t["speed_limit"])}
    assert len(lanes) >= 2 and lanes <= {2, 3, 4}
    assert len(limits) >= 2 and limits <= {90, 100, 110, 120, 130}
    assert load_vehicle_frames(ds, "train").n_frames > 0


def test_region_profiles_without_variation_are_unchanged() -> None:
    for r in BUILTIN_REGIONS:
        road = load_region(r).road
        assert not road.lanes_mix and not road.speed_limits_kmh


def test_bad_lanes_mix_is_refused(tmp_path) -> None:
    import tomli_w

    from fedfsd.data.profiles import load_profile_file

    d = load_region("public").model_dump(mode="json")
    d["road"]["lanes_mix"] = {"2": 0.5, "9": 0.5}
    p = tmp_path / "bad.toml"
    p.write_text(tomli_w.dumps(d))
    with pytest.raises(ProfileError, match="road"):
        load_profile_file(p)
