"""Fleet-data generation throughput: frames/s (wall) and frames per CPU-second, per region.

    .venv/bin/python experiments/bench_generate.py --quick     # the demo's sizes (cn, eu, us)
    .venv/bin/python experiments/bench_generate.py           # cn eu us jp, 200 vehicles, 20 ep
    .venv/bin/python experiments/bench_generate.py --fleet-scale   # eu, 1,000 and 10,000 vehicles
    .venv/bin/python experiments/bench_generate.py --fleet-scale --sizes 1000 --regions cn eu
    .venv/bin/python experiments/bench_generate.py --realism DIR [DIR ...]   # compare datasets
    .venv/bin/python experiments/bench_generate.py --load-replicas DIR 10    # load at 10x scale

With --fleet-scale: one row per (region, size) with vehicles, episodes, wall s, CPU s,
vehicles per wall-second and per CPU-second, usable train frames per vehicle, the share of
vehicles with train frames, train-split load time and peak memory, then a 100,000-vehicle row
projected from the largest measured size's CPU-s per vehicle (labelled as a projection). The
load average before and after is printed: wall times on a shared machine are inflated by it.

"frames/CPU-s" is the per-core throughput. "frames" are usable training frames (fleet vehicle,
after warm-up, with 3 s of future), the number a DP trainer sees; rows are all logged vehicle
states (fleet and background traffic).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _cpu() -> float:
    """CPU seconds of this process plus its finished worker processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="demo sizes: cn eu us, 60 vehicles, 4 ep")
    ap.add_argument("--regions", nargs="+", default=None)
    ap.add_argument("--vehicles", type=int, default=None)
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bev", action="store_true", help="also time loading with BEV rasters")
    ap.add_argument("--fleet-scale", action="store_true", help="fleet-scale mode (see above)")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1000, 10_000])
    ap.add_argument("--appearances", type=float, default=3.0)
    ap.add_argument("--keep", default=None, help="--fleet-scale: keep datasets under this dir")
    ap.add_argument("--json", default=None, help="--fleet-scale: also write the rows here")
    ap.add_argument("--realism", nargs="+", default=None, help="datasets to compare (see docs)")
    ap.add_argument(
        "--load-replicas",
        nargs=2,
        metavar=("DIR", "N"),
        default=None,
        help="time loading N copies of DIR's tracks as one region (N x the vehicles)",
    )
    a = ap.parse_args()
    if a.realism:
        realism(a.realism)
        return
    if a.load_replicas:
        load_replicas(Path(a.load_replicas[0]), int(a.load_replicas[1]))
        return
    if a.fleet_scale:
        fleet_scale_bench(a)
        return
    regions = a.regions or (["cn", "eu", "us"] if a.quick else ["cn", "eu", "us", "jp"])
    vehicles = a.vehicles or (60 if a.quick else 200)
    episodes = a.episodes or (4 if a.quick else 20)

    from fedfsd.data.generate import generate_dataset
    from fedfsd.data.vehicles import load_vehicle_frames

    table = Table(
        "region",
        "vehicles",
        "episodes",
        "workers",
        "rows",
        "frames",
        "vehicles w/ frames",
        "crash %",
        "generate s",
        "load s",
        "CPU s",
        "frames/s",
        "frames/CPU-s",
        title=f"fleet generation throughput ({os.cpu_count()} CPUs visible)",
    )
    tmp = Path(tempfile.mkdtemp(prefix="fedfsd-bench-"))
    total_frames, total_gen, total_cpu = 0, 0.0, 0.0
    try:
        for r in regions:
            cpu0 = _cpu()
            t0 = time.perf_counter()
            path = generate_dataset(
                r,
                vehicles,
                episodes,
                a.seed,
                tmp / r,
                workers=a.workers,
                with_bev=a.bev,
                progress=False,
            )
            gen = time.perf_counter() - t0
            t0 = time.perf_counter()
            fr = load_vehicle_frames(path, "all")
            load = time.perf_counter() - t0
            cpu = _cpu() - cpu0
            c = fr.manifest["counts"]
            w = min(a.workers, episodes)
            total_frames += fr.n_frames
            total_gen += gen + load
            total_cpu += cpu
            table.add_row(
                r,
                str(vehicles),
                str(episodes),
                str(w),
                str(c["rows"]),
                str(fr.n_frames),
                str(fr.n_vehicles),
                f"{100 * c['crash_rate']:.1f}",
                f"{gen:.1f}",
                f"{load:.1f}",
                f"{cpu:.1f}",
                f"{fr.n_frames / (gen + load):.0f}",
                f"{fr.n_frames / cpu:.0f}",
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    con = Console(width=150)
    con.print(table)
    con.print(
        f"all regions: {total_frames} frames in {total_gen:.1f} s wall, {total_cpu:.1f} CPU-s "
        f"(generate + load; CPU-s counts this process and its workers, so it does not depend on "
        f"other load on the machine)"
    )


def gb(fr: object) -> float:
    """GB held by a VehicleFrames' feature and label arrays."""
    return (fr.features.nbytes + fr.labels.nbytes) / 2**30


def load_replicas(src: Path, n: int) -> None:
    """Loading time and memory at n x the size of a generated region, without simulating it.

    Copies the tracks n times (vehicle ids suffixed per copy, episodes renumbered), so the loader
    sees a region of n x the vehicles and files; the frames repeat, the cost does not.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from fedfsd.data.validate import sha256_file
    from fedfsd.data.vehicles import load_vehicle_frames

    m = json.loads((src / "manifest.json").read_text())
    dst = Path(tempfile.mkdtemp(prefix="fedfsd-replicas-"))
    try:
        (dst / "tracks").mkdir()
        files = []
        n_eps = m["episodes"]
        for k in range(n):
            for entry in m["files"]:
                t = pq.read_table(src / entry["path"])
                ids = [f"{v}-r{k}" for v in t.column("vehicle_id").to_pylist()]
                ep = pa.array(t.column("episode").to_numpy() + k * n_eps, pa.int32())
                t = t.set_column(
                    t.schema.get_field_index("vehicle_id"),
                    t.schema.field("vehicle_id"),
                    pa.array(ids),
                )
                t = t.set_column(t.schema.get_field_index("episode"), t.schema.field("episode"), ep)
                rel = f"tracks/r{k}_{Path(entry['path']).name}"
                pq.write_table(t, dst / rel, compression="zstd", write_statistics=False)
                files.append(
                    {
                        "path": rel,
                        "episode": entry["episode"] + k * n_eps,
                        "rows": t.num_rows,
                        "sha256": sha256_file(dst / rel),
                    }
                )
        m.update(files=files, episodes=n_eps * n, vehicles=m["vehicles"] * n)
        (dst / "manifest.json").write_text(json.dumps(m))
        for split in ("train",):
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            cpu0, t0 = _cpu(), time.perf_counter()
            fr = load_vehicle_frames(dst, split)
            wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            Console(width=170).print(
                f"{n} replicas of {src.name}: {m['vehicles']:,} vehicles, {len(files)} files; "
                f"load {split}: {wall:.1f} s wall, {cpu:.1f} CPU-s, {fr.n_vehicles:,} vehicles, "
                f"{fr.n_frames:,} frames, arrays {gb(fr):.2f} GB, peak RSS {rss:.2f} GB "
                f"(before {rss0:.2f} GB); load average {os.getloadavg()[0]:.1f}"
            )
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def realism(paths: list[str]) -> None:
    """Statistics that show what a sampling mode does to the data (docs/data-format.md)."""
    import json

    import numpy as np
    import pyarrow.parquet as pq

    from fedfsd.data.feature_spec import FEATURE_NAMES, LABEL_NAMES
    from fedfsd.data.vehicles import load_vehicle_frames

    table = Table(
        "dataset",
        "frames",
        "vehicles",
        "mean |accel|",
        "CV FDE@3s m",
        "lane-change frames",
        "median headway s",
        "speed m/s",
        "near merge",
        "crash rate",
        title="what the data look like (all splits)",
    )
    for path in paths:
        fr = load_vehicle_frames(path, "all")
        f = {n: fr.features[:, i] for i, n in enumerate(FEATURE_NAMES)}
        y = {n: fr.labels[:, i] for i, n in enumerate(LABEL_NAMES)}
        speed = f["ego_speed"] * 30.0
        ahead = f["front_present"] > 0
        headway = f["front_dx"][ahead] * 100.0 / np.maximum(speed[ahead], 1.0)
        cv = np.hypot(y["dx_3s"] - 3 * speed, y["dy_3s"] - 3 * f["ego_vy"] * 5.0)
        m = json.loads((Path(path) / "manifest.json").read_text())
        table.add_row(
            str(path),
            str(fr.n_frames),
            str(fr.n_vehicles),
            f"{np.abs(y['accel']).mean():.2f}",
            f"{cv.mean():.2f}",
            f"{(f['turn_signal'] != 0).mean():.2%}",
            f"{np.median(headway):.2f}",
            f"{speed.mean():.1f} ± {speed.std():.1f}",
            f"{(f['merge_distance'] < 1).mean():.1%}",
            f"{m['counts']['crash_rate']:.1%}",
        )
        t, acc = [], []
        for entry in m["files"][:40]:
            cols = pq.read_table(Path(path) / entry["path"], columns=["t", "accel"]).to_pydict()
            t += cols["t"]
            acc += cols["accel"]
        t, acc = np.asarray(t), np.abs(np.asarray(acc))
        secs = [s for s in range(int(t.max()) + 1) if ((t >= s) & (t < s + 1)).any()]
        Console(width=170).print(
            f"{path}: mean |accel| of all logged vehicles by second since spawn: "
            + " ".join(f"{s}s {acc[(t >= s) & (t < s + 1)].mean():.2f}" for s in secs)
        )
    Console(width=170).print(table)


def fleet_scale_bench(a: argparse.Namespace) -> None:
    """Generate and load fleet-scale regions of each size; print the table and a projection."""
    import json

    import numpy as np

    from fedfsd.data.generate import generate_dataset
    from fedfsd.data.validate import validate_dataset
    from fedfsd.data.vehicles import load_vehicle_frames

    con = Console(width=170)
    regions = a.regions or ["eu"]
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="fedfsd-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    rows = []
    try:
        for r in regions:
            for v in sorted(a.sizes):
                out = root / f"{r}-fs-v{v}-s{a.seed}"
                cpu0, t0 = _cpu(), time.perf_counter()
                generate_dataset(
                    r,
                    v,
                    None,
                    a.seed,
                    out,
                    workers=a.workers,
                    progress=False,
                    overwrite=True,
                    fleet_scale=True,
                    appearances=a.appearances,
                )
                gen_wall, gen_cpu = time.perf_counter() - t0, _cpu() - cpu0
                t0 = time.perf_counter()
                m = validate_dataset(out)
                val_wall = time.perf_counter() - t0
                t0 = time.perf_counter()
                train = load_vehicle_frames(out, "train")
                load_wall = time.perf_counter() - t0
                per_v = np.zeros(v)
                per_v[: train.n_vehicles] = train.frames_per_vehicle()
                rows.append(
                    {
                        "region": r,
                        "vehicles": v,
                        "episodes": m["episodes"],
                        "generate_wall_s": gen_wall,
                        "generate_cpu_s": gen_cpu,
                        "vehicles_per_wall_s": v / gen_wall,
                        "vehicles_per_cpu_s": v / gen_cpu,
                        "train_frames_per_vehicle": float(per_v.mean()),
                        "vehicles_with_train_frames": train.n_vehicles / v,
                        "validate_wall_s": val_wall,
                        "load_train_wall_s": load_wall,
                        "train_frames": train.n_frames,
                        "train_mb": (train.features.nbytes + train.labels.nbytes) / 2**20,
                        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                        "crash_rate": m["counts"]["crash_rate"],
                        "measured": True,
                    }
                )
                del train
                con.print(f"[dim]measured: {rows[-1]}[/]")  # survives an interrupted run
                if not a.keep:
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    load1 = os.getloadavg()
    for r in regions:
        big = max((x for x in rows if x["region"] == r), key=lambda x: x["vehicles"])
        if big["vehicles"] < 100_000:
            k = 100_000 / big["vehicles"]
            cpu = big["generate_cpu_s"] * k
            rows.append(
                {
                    **{key: None for key in big},
                    "region": r,
                    "vehicles": 100_000,
                    "episodes": int(np.ceil(100_000 * a.appearances / 60)),
                    "generate_cpu_s": cpu,
                    "generate_wall_s": cpu / a.workers,
                    "vehicles_per_cpu_s": big["vehicles_per_cpu_s"],
                    "vehicles_per_wall_s": 100_000 / (cpu / a.workers),
                    "train_frames_per_vehicle": big["train_frames_per_vehicle"],
                    "load_train_wall_s": big["load_train_wall_s"] * k,
                    "train_mb": big["train_mb"] * k,
                    "measured": False,
                }
            )
    table = Table(
        "region",
        "vehicles",
        "episodes",
        "wall s",
        "CPU s",
        "vehicles/s",
        "vehicles/CPU-s",
        "train frames/vehicle",
        "vehicles w/ train",
        "load s (train)",
        "train MB",
        "peak RSS GB",
        "",
        title=f"fleet-scale generation ({a.workers} workers, appearances {a.appearances}, "
        f"{os.cpu_count()} CPUs visible)",
    )

    def f(x: float | None, nd: int = 1) -> str:
        return "-" if x is None else f"{x:.{nd}f}"

    for x in rows:
        table.add_row(
            x["region"],
            f"{x['vehicles']:,}",
            str(x["episodes"]),
            f(x["generate_wall_s"]),
            f(x["generate_cpu_s"]),
            f(x["vehicles_per_wall_s"]),
            f(x["vehicles_per_cpu_s"]),
            f(x["train_frames_per_vehicle"]),
            "-"
            if x["vehicles_with_train_frames"] is None
            else f"{x['vehicles_with_train_frames']:.1%}",
            f(x["load_train_wall_s"]),
            f(x["train_mb"], 0),
            f(x["peak_rss_gb"], 2),
            "measured"
            if x["measured"]
            else "PROJECTION (CPU-s/vehicle × size; wall = CPU / workers)",
        )
    con.print(table)
    con.print(
        "PROJECTED rows are not measured: CPU s = the largest measured size's CPU-s per vehicle "
        "x 100,000; wall s = CPU s / workers on otherwise idle cores; load and MB scale linearly."
    )
    con.print(
        f"load average (1/5/15 min) before {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, after "
        f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} on {os.cpu_count()} CPUs: wall times are "
        "inflated by other work when the load exceeds the CPU count; CPU s (this process and "
        "its workers) are not."
    )
    if a.json:
        Path(a.json).write_text(
            json.dumps({"load_before": load0, "load_after": load1, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
