"""Helpers shared by the privacy–utility, federation-cost and scale experiments.

Why one module: every study needs the same things done the same way: fleet data that is
generated once and reused (validated on reuse), a synthetic stand-in for tiny smoke runs, region
policies written like an operator would, a JSON table + PNG next to a printed rich table, and a
record of the machine the numbers came from. Only the experiment scripts import this.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import resource
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

# One torch/OpenMP thread per process: the machines these run on have 2 shared cores, and
# several processes (regions, Ray workers) train at once. Override by exporting OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
OUT_ROOT = ROOT / "experiments" / "out"
DATA_CACHE = ROOT / ".fedfsd" / "exp-data"
console = Console(width=160)


# -- fleets ----------------------------------------------------------------------------------------
def dataset_dir(
    cache: Path,
    region: str,
    vehicles: int,
    episodes: int | None,
    seed: int,
    *,
    fleet_scale: bool = False,
    appearances: float = 3.0,
) -> Path:
    """Where a generated fleet of these sizes lives in the cache (one directory per setting).

    Fleet-scale datasets (short all-fleet episodes) get their own names: same sizes, other data;
    so does a fleet-scale dataset whose vehicles appear in other than 3 episodes each.
    """
    if fleet_scale:
        eps = "auto" if episodes is None else str(episodes)
        app = "" if appearances == 3.0 else f"-a{appearances:g}"
        return Path(cache) / f"{region}-fs-v{vehicles}-e{eps}{app}-s{seed}"
    if episodes is None:
        raise ValueError("episodes is required unless fleet_scale is on")
    return Path(cache) / f"{region}-v{vehicles}-e{episodes}-s{seed}"


def ensure_dataset(
    cache: Path,
    region: str,
    vehicles: int,
    episodes: int | None,
    seed: int,
    *,
    fleet_scale: bool = False,
    workers: int | None = None,
    appearances: float = 3.0,
) -> Path:
    """Generate a region's fleet logs once; reuse a cached copy only if it still validates.

    A cached copy that predates validation splits is regenerated (it has no "val" split).
    With `fleet_scale`, `episodes` may be None (every vehicle in about `appearances` episodes).
    """
    import shutil

    from fedfsd.data.generate import generate_dataset
    from fedfsd.data.validate import DatasetError, validate_dataset

    out = dataset_dir(
        cache, region, vehicles, episodes, seed, fleet_scale=fleet_scale, appearances=appearances
    )
    if (out / "manifest.json").exists():
        try:
            manifest = validate_dataset(out)
            if "val_fraction" not in manifest.get("split", {}):
                raise DatasetError("it predates validation splits")
            console.print(f"[dim]reusing fleet data {out}[/]")
            return out
        except DatasetError as err:
            console.print(f"[yellow]cached {out} invalid ({err}); regenerating[/]")
            shutil.rmtree(out)
    mode = " (fleet-scale)" if fleet_scale else ""
    console.print(
        f"generating {region}{mode}: {vehicles} vehicles × {episodes or 'auto'} episodes → {out}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    return generate_dataset(
        region,
        vehicles,
        episodes,
        seed,
        out,
        workers=workers,
        progress=False,
        overwrite=True,
        fleet_scale=fleet_scale,
        appearances=appearances,
    )


def load_region(path: Path, split: str) -> Any:
    """One split (episode-level) of a generated dataset."""
    from fedfsd.data.vehicles import load_vehicle_frames

    return load_vehicle_frames(path, split=split)


def synthetic_region(region: str, vehicles: int, frames: int, seed: int) -> tuple[Any, Any]:
    """(train, test) synthetic fleets for smoke runs: the test fleet comes from another seed."""
    from fedfsd.data.testing import make_synthetic_frames

    train = make_synthetic_frames(vehicles, frames, seed, region=region)
    test = make_synthetic_frames(max(4, vehicles // 4), frames, seed + 10_000, region=region)
    return train, test


def pool_frames(parts: Sequence[Any], region: str = "pooled") -> Any:
    """Concatenate several regions' frames into one fleet (the centralised, non-private limit).

    Vehicles stay distinct (ids are prefixed with their region), so per-vehicle sampling still
    works on the pool.
    """
    from fedfsd.data.vehicles import VehicleFrames

    offsets = [np.zeros(1, dtype=np.int64)]
    base = 0
    for p in parts:
        offsets.append(p.offsets[1:] + base)
        base += p.n_frames
    return VehicleFrames(
        region=region,
        features=np.concatenate([p.features for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        offsets=np.concatenate(offsets),
        vehicle_ids=[f"{p.region}/{v}" for p in parts for v in p.vehicle_ids],
        episodes=np.concatenate([p.episodes + 1_000_000 * i for i, p in enumerate(parts)]),
        fleet_id="+".join(p.fleet_id or p.region for p in parts),
    )


# -- policies --------------------------------------------------------------------------------------
def make_policy(
    region: str,
    *,
    n_vehicles: int,
    epsilon_budget: float,
    noise_multiplier: float,
    clip_norm: float,
    update_norm_bound: float,
    local_steps: int,
    vehicles_per_step: int,
    frames_per_vehicle: int,
    delta: float | None = None,
) -> Any:
    """A region policy as an operator would write it for this experiment (δ < 1/vehicles)."""
    from fedfsd.config import RegionPolicy

    return RegionPolicy(
        region=region,
        epsilon_budget=epsilon_budget,
        delta=delta if delta is not None else default_delta(n_vehicles),
        min_noise_multiplier=max(noise_multiplier, 1e-6),
        max_clip_norm=clip_norm,
        update_norm_bound=update_norm_bound,
        max_local_steps=local_steps,
        max_vehicles_per_step=vehicles_per_step,
        max_frames_per_vehicle=frames_per_vehicle,
        allowed_metrics=[],  # nothing but updates leave; experiments score models locally
        weighting="equal",
    )


def default_delta(n_vehicles: int) -> float:
    """δ = 1e-5, or smaller when the fleet is large enough that 1e-5 is not ≪ 1/vehicles."""
    return min(1e-5, 0.1 / max(n_vehicles, 1))


def policy_toml(policy: Any) -> str:
    """The TOML file a region operator would keep for `policy`."""
    import tomli_w

    return tomli_w.dumps(policy.model_dump(exclude_none=True))


# -- privacy calibration --------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def calibrate_sigma(target_eps: float, delta: float, q: float, steps: int) -> float:
    """σ for `steps` steps at rate q to spend at most `target_eps` (PRV), checked with fedfsd.

    The search lives in the planner (fedfsd.privacy.planner.calibrate_sigma): within 0.5% of
    the smallest σ whose ledger ε (fedfsd's compute_epsilon) is ≤ the target.
    """
    from fedfsd.privacy.planner import calibrate_sigma as plan_sigma

    return plan_sigma(target_eps, delta, q, steps)


# -- outputs ---------------------------------------------------------------------------------------
def out_dir(name: str, given: str | None) -> Path:
    """`--out` or experiments/out/<name>/ (git-ignored), created."""
    path = Path(given).resolve() if given else OUT_ROOT / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine() -> dict[str, Any]:
    """What the numbers ran on (they are not comparable across machines)."""
    import torch

    return {
        "cpus_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Write `doc` as indented JSON (NaN → null, ∞ → "inf": strict JSON readers accept it).

    Its numbers also go to `tensorboard/` beside it, as the aggregator logs a run.
    """
    from fedfsd.aggregator.tracking import log_document

    path.write_text(json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n")
    log_document(path.parent / "tensorboard", path.stem, doc)
    return path


def rich_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A rich table; the first column left-aligned, numbers right-aligned."""
    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def fmt(v: Any) -> str:
    """Short text for a table cell."""
    if isinstance(v, float):
        if not math.isfinite(v):
            return "∞" if v > 0 else "–"
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.1e}"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident memory of this process (or of its waited-for children), MiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def sized_preset(
    sizes: dict[str, dict[str, Any]], quick: bool, tiny: bool, **overrides: float | None
) -> dict[str, Any]:
    """The size preset (--quick, --tiny or full) with every given override (> 0) applied."""
    if quick and tiny:
        bad_option("choose one of --quick and --tiny")
    preset = dict(sizes["tiny" if tiny else "quick" if quick else "full"])
    for key, val in overrides.items():
        if val is not None:
            if val <= 0:
                bad_option(f"--{key.replace('_', '-')} must be > 0")
            preset[key] = val
    return preset


def bad_option(msg: str) -> None:
    """One red line and exit code 2 (no traceback) for bad command-line input."""
    console.print(f"[red]error:[/] {msg}")
    raise SystemExit(2)
