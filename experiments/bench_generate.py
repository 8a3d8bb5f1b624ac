"""Fleet-data generation throughput: frames/s (wall) and frames per CPU-second, per region.

    .venv/bin/python experiments/bench_generate.py --quick     # the demo's sizes (cn, eu, us)
    .venv/bin/python experiments/bench_generate.py           # cn eu us jp, 200 vehicles, 20 ep

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
    a = ap.parse_args()
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


if __name__ == "__main__":
    main()
