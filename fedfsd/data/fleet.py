"""Persistent fleets: V vehicles, each with its own driver style drawn from the region profile."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from fedfsd.data.profiles import Dist, RegionProfile

DRIVER_PARAMS = (
    "desired_speed_ratio",
    "time_headway_s",
    "min_gap_m",
    "comfort_acc",
    "comfort_brake",
    "politeness",
    "lane_change_gain",
    "keep_side_bias",
)


def _truncnorm(d: Dist, n: int, rng: np.random.Generator) -> np.ndarray:
    """Truncated normal by resampling (exact truncation, deterministic for the rng)."""
    out = rng.normal(d.mean, d.std, size=n) if d.std > 0 else np.full(n, d.mean)
    for _ in range(100):
        bad = (out < d.min) | (out > d.max)
        if not bad.any():
            break
        out[bad] = rng.normal(d.mean, d.std, size=int(bad.sum()))
    return np.clip(out, d.min, d.max)


def draw_drivers(profile: RegionProfile, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw n driver styles: {param: [n] float64}, one column per DRIVER_PARAMS entry."""
    return {p: _truncnorm(getattr(profile.drivers, p), n, rng) for p in DRIVER_PARAMS}


def fleet_id(profile: RegionProfile, vehicles: int, seed: int) -> str:
    """A stable identifier of (profile, size, seed): ledgers are keyed by it."""
    dump = profile.model_dump(mode="json")
    for key in ("lanes_mix", "speed_limits_kmh"):  # unused variation: ids as before it existed
        if not dump["road"][key]:
            del dump["road"][key]
    blob = json.dumps([dump, vehicles, seed], sort_keys=True)
    return f"{profile.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def vehicle_ids(fid: str, vehicles: int) -> list[str]:
    """Stable ids of the fleet's vehicles, e.g. eu-1a2b3c4d5e6f-v00017."""
    return [f"{fid}-v{i:05d}" for i in range(vehicles)]


def episode_members(vehicles: int, per_episode: int, episodes: int, seed: int) -> list[np.ndarray]:
    """Which fleet vehicles drive in each episode: cycles through random permutations so every
    vehicle gets about the same number of episodes."""
    m = min(per_episode, vehicles)
    rng = np.random.default_rng([seed, 1])
    order: list[int] = []
    out = []
    pos = 0
    for _ in range(episodes):
        chosen: list[int] = []
        while len(chosen) < m:
            if pos == len(order):
                order.extend(rng.permutation(vehicles).tolist())
            v = order[pos]
            pos += 1
            if v not in chosen:
                chosen.append(v)
        out.append(np.array(sorted(chosen), dtype=np.int64))
    return out
