"""A tiny in-memory fleet with a learnable signal, for fast tests that need no simulator.

Pure numpy. Labels are a fixed linear function of the features plus a small per-vehicle offset
and noise, so a model can learn them and DP tests can see a loss go down.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedfsd.data.feature_spec import N_FEATURES, N_LABELS
from fedfsd.data.vehicles import VehicleFrames

FRAMES_PER_EPISODE = 10


def make_synthetic_frames(
    n_vehicles: int,
    frames_per_vehicle: int,
    seed: int,
    n_features: int | None = None,
    with_bev: bool = False,
    region: str = "synthetic",
) -> VehicleFrames:
    """Build `n_vehicles` × `frames_per_vehicle` frames, deterministic for `seed`.

    Episodes are blocks of `FRAMES_PER_EPISODE` frames of one vehicle (ids unique per vehicle).
    With `with_bev`, a 2 × 16 × 32 uint8 raster whose brightness encodes the first label is added.
    """
    if n_vehicles < 1 or frames_per_vehicle < 1:
        raise ValueError("n_vehicles and frames_per_vehicle must be >= 1")
    f = N_FEATURES if n_features is None else int(n_features)
    rng = np.random.default_rng(seed)
    n = n_vehicles * frames_per_vehicle
    x = rng.normal(0.0, 1.0, size=(n, f)).astype(np.float32)
    # A fixed "physics" shared by every vehicle (seeded separately so it does not depend on sizes).
    w = np.random.default_rng(12345).normal(0.0, 1.0 / np.sqrt(f), size=(f, N_LABELS))
    vehicle_of_row = np.repeat(np.arange(n_vehicles), frames_per_vehicle)
    vehicle_bias = rng.normal(0.0, 0.1, size=(n_vehicles, N_LABELS))
    y = x @ w + vehicle_bias[vehicle_of_row] + rng.normal(0.0, 0.05, size=(n, N_LABELS))
    per_vehicle_eps = -(-frames_per_vehicle // FRAMES_PER_EPISODE)
    episodes = vehicle_of_row * per_vehicle_eps + np.tile(
        np.arange(frames_per_vehicle) // FRAMES_PER_EPISODE, n_vehicles
    )
    bev = None
    if with_bev:
        level = np.clip(128 + 60 * y[:, 0], 0, 255).astype(np.uint8)
        bev = np.zeros((n, 2, 16, 32), dtype=np.uint8)
        bev[:, :, 4:12, 8:24] = level[:, None, None, None]
    return VehicleFrames(
        region=region,
        features=x,
        labels=y.astype(np.float32),
        offsets=np.arange(n_vehicles + 1, dtype=np.int64) * frames_per_vehicle,
        vehicle_ids=[f"{region}-v{i:05d}" for i in range(n_vehicles)],
        episodes=episodes.astype(np.int64),
        bev=bev,
        fleet_id=f"{region}-synthetic-{seed}",
    )


def generate_fleets(
    root: Path,
    regions: Sequence[str],
    *,
    vehicles: int,
    episodes: int,
    seeds: Sequence[int] | None = None,
    timeout: float = 300,
) -> dict[str, Path]:
    """Small simulator fleets under `root/data/<region>`, one `fedfsd data generate` per region.

    For the end-to-end tests and experiments that start a real federation: the regions are
    generated side by side (one process each, one worker), like separate data centres would.
    Raises RuntimeError with the failing region's stderr tail.
    """
    seeds = list(seeds) if seeds is not None else [1] * len(regions)
    out = {r: root / "data" / r for r in regions}
    gens = {
        r: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedfsd.cli",
                "data",
                "generate",
                "--out",
                str(out[r]),
                "--region",
                r,
                "--vehicles",
                str(vehicles),
                "--episodes",
                str(episodes),
                "--seed",
                str(seed),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for r, seed in zip(regions, seeds, strict=True)
    }
    failed = []
    for r, gen in gens.items():
        _, err = gen.communicate(timeout=timeout)
        if gen.returncode != 0:
            failed.append(f"{r}: {err.decode()[-2000:]}")
    if failed:
        raise RuntimeError("fleet generation failed: " + "; ".join(failed))
    return out
