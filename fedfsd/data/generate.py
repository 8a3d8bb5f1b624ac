"""Generate a region's fleet dataset: episodes in parallel processes, Parquet + manifest.

Each episode is seeded from (seed, episode) alone and written to its own file, so the bytes (and
checksums) do not depend on the number of workers. The directory appears atomically: files are
written to a temporary sibling that is renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fedfsd.data.feature_spec import HORIZONS_S
from fedfsd.data.fleet import draw_drivers, episode_members, fleet_id, vehicle_ids
from fedfsd.data.fleet_scale import (
    DEFAULT_APPEARANCES,
    FleetScale,
    auto_episodes,
    fleet_scale_profile,
)
from fedfsd.data.profiles import RegionProfile, load_profile_file, load_region
from fedfsd.data.schema import MANIFEST_NAME, SCHEMA_VERSION, TRACK_SCHEMA, TRACKS_DIR
from fedfsd.data.splits import TEST_FRACTION, VAL_FRACTION

GENERATOR = "fedfsd simulate (highway-env 1.12.1 IDM/MOBIL)"


def resolve_profile(region_or_profile: str | Path | RegionProfile) -> RegionProfile:
    """A RegionProfile, a built-in region name, or a path to a profile TOML."""
    if isinstance(region_or_profile, RegionProfile):
        return region_or_profile
    text = str(region_or_profile)
    if text.endswith(".toml") or os.sep in text:
        return load_profile_file(text)
    return load_region(text)


def _episode_task(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: simulate one episode and write its Parquet file (runs in a child process)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fedfsd.data.simulate import simulate_episode
    from fedfsd.data.validate import sha256_file

    profile = RegionProfile.model_validate(task["profile"])
    res = simulate_episode(
        profile,
        task["episode"],
        task["seed"],
        task["ids"],
        {k: np.asarray(v) for k, v in task["drivers"].items()},
    )
    table = pa.Table.from_pydict(res.columns, schema=TRACK_SCHEMA)
    path = Path(task["tmp"]) / task["rel"]
    pq.write_table(table, path, compression="zstd", write_statistics=False)
    return {
        "path": task["rel"],
        "episode": task["episode"],
        "rows": table.num_rows,
        "fleet_rows": int(np.asarray(res.columns["is_fleet"]).sum()),
        "scenario": str(res.columns["scenario"][0]),
        "rain": bool(res.columns["rain"][0]),
        "fleet_vehicle_episodes": res.fleet_vehicle_episodes,
        "crashed_fleet_vehicle_episodes": res.crashed_fleet_vehicle_episodes,
        "sha256": sha256_file(path),
    }


def generate_dataset(
    region: str | Path | RegionProfile,
    vehicles: int,
    episodes: int | None,
    seed: int,
    out: str | Path,
    workers: int | None = None,
    with_bev: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    fleet_scale: bool | FleetScale = False,
    appearances: float = DEFAULT_APPEARANCES,
) -> Path:
    """Simulate `episodes` episodes of a `vehicles`-vehicle fleet and write the dataset to `out`.

    `region` is a built-in name (cn, eu, us, jp, public), a profile TOML path or a RegionProfile.
    `with_bev` records that BEV rasters are to be rendered (from the tracks, at load time).
    `fleet_scale` samples the fleet into short, all-fleet episodes (see `fleet_scale.py`);
    `episodes` may then be None: chosen so every vehicle drives in about `appearances` episodes.
    A `FleetScale` instead of True sets the mode's episode shape too (its `appearances` wins).
    Returns the dataset directory. Raises FileExistsError if `out` is non-empty (unless
    `overwrite`), ProfileError for a bad profile, ValueError for bad sizes.
    """
    profile = resolve_profile(region)
    if isinstance(fleet_scale, FleetScale):
        scale: FleetScale | None = fleet_scale
    else:
        scale = FleetScale(appearances=appearances) if fleet_scale else None
    if scale is not None:
        profile = fleet_scale_profile(profile, scale)
        if episodes is None and vehicles >= 1:
            episodes = auto_episodes(vehicles, scale)
    if episodes is None:
        raise ValueError("episodes is required unless fleet_scale is on")
    if vehicles < 1 or episodes < 1:
        raise ValueError("vehicles and episodes must be >= 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use overwrite)")
    workers = max(1, min(workers or os.cpu_count() or 1, episodes))
    fid = fleet_id(profile, vehicles, seed)
    ids = vehicle_ids(fid, vehicles)
    drivers = draw_drivers(profile, vehicles, np.random.default_rng([seed, 0]))
    per_ep = max(1, round(profile.traffic.vehicles_per_episode * profile.traffic.fleet_share))
    members = episode_members(vehicles, per_ep, episodes, seed)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / TRACKS_DIR).mkdir(parents=True)
    pdump = profile.model_dump(mode="json")
    tasks = [
        {
            "profile": pdump,
            "episode": e,
            "seed": seed,
            "ids": [ids[i] for i in members[e]],
            "drivers": {k: v[members[e]].tolist() for k, v in drivers.items()},
            "tmp": str(tmp),
            "rel": f"{TRACKS_DIR}/episode_{e:05d}.parquet",
        }
        for e in range(episodes)
    ]
    try:
        results = _run_tasks(tasks, workers, progress, profile.name)
        manifest = _manifest(profile, pdump, fid, vehicles, episodes, seed, with_bev, results)
        manifest["fleet_scale"] = (
            {"enabled": True, **scale.model_dump(mode="json")} if scale else {"enabled": False}
        )
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _run_tasks(tasks, workers: int, progress: bool, name: str) -> list[dict[str, Any]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    results: list[dict[str, Any]] = []
    with Progress(
        "[bold]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not progress,
        transient=False,
    ) as bar:
        job = bar.add_task(f"{name}: episodes", total=len(tasks))
        if workers == 1:
            for t in tasks:
                results.append(_episode_task(t))
                bar.advance(job)
        else:
            import multiprocessing as mp

            import highway_env.road.road  # noqa: F401 - imported once here, inherited by forks

            # fork: no re-import of the caller's __main__ (scripts without a main guard work) and
            # children start in milliseconds; they use numpy/highway-env only, never torch/gRPC.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
                for r in pool.map(_episode_task, tasks):
                    results.append(r)
                    bar.advance(job)
    return sorted(results, key=lambda r: r["episode"])


def _manifest(profile, pdump, fid, vehicles, episodes, seed, with_bev, results) -> dict[str, Any]:
    fve = sum(r["fleet_vehicle_episodes"] for r in results)
    crashed = sum(r["crashed_fleet_vehicle_episodes"] for r in results)
    return {
        "schema_version": SCHEMA_VERSION,
        "format": "fedfsd-tracks",
        "region": profile.name,
        "fleet_id": fid,
        "seed": seed,
        "vehicles": vehicles,
        "episodes": episodes,
        "log_hz": profile.episode.log_hz,
        "sim_hz": profile.episode.sim_hz,
        "warmup_s": profile.episode.warmup_s,
        "horizons_s": list(HORIZONS_S),
        "left_hand_traffic": profile.left_hand_traffic,
        "with_bev": bool(with_bev),
        "bev": {"channels": 2, "height": 48, "width": 128, "m_per_row": 0.5, "m_per_col": 1.0},
        "split": {
            "by": "episode",
            "val_fraction": VAL_FRACTION,
            "test_fraction": TEST_FRACTION,
            "seed": seed,
        },
        "generator": GENERATOR,
        "profile": pdump,
        "counts": {
            "rows": sum(r["rows"] for r in results),
            "fleet_rows": sum(r["fleet_rows"] for r in results),
            "fleet_vehicle_episodes": fve,
            "crashed_fleet_vehicle_episodes": crashed,
            "crash_rate": crashed / fve if fve else 0.0,
            "rain_episodes": sum(r["rain"] for r in results),
            "merge_episodes": sum(r["scenario"] == "merge" for r in results),
        },
        "files": [
            {"path": r["path"], "episode": r["episode"], "rows": r["rows"], "sha256": r["sha256"]}
            for r in results
        ],
    }
