"""Track table of one episode -> ego-centric object-list features and future-motion labels.

Runs at load time, so an operator who converts their own logs into the track format gets the same
features. Every scale is a fixed physical constant from `feature_spec.py`; sensing noise and range
come from the dataset's profile (rain shortens range and adds noise) and are seeded per episode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfsd.data.feature_spec import (
    EGO_FEATURES,
    HORIZONS_S,
    LANE_FEATURES,
    N_FEATURES,
    NEIGHBOUR_FIELDS,
    NEIGHBOUR_SCALES,
    NEIGHBOUR_SLOTS,
)
from fedfsd.data.schema import NO_MERGE

LANE_WIDTH = 4.0
# Lateral bands (log frame, metres relative to the ego) that define the neighbour slots.
SAME_LANE_HALF = 2.0
SIDE_LANE_FAR = 6.0
_N_EGO, _N_LANE = len(EGO_FEATURES), len(LANE_FEATURES)
_N_NB = len(NEIGHBOUR_FIELDS)


@dataclass
class Sensing:
    """Object-list sensor model: objects beyond range_m are not seen; positions get N(0, noise)."""

    range_m: float = 1e9
    noise_m: float = 0.0

    @classmethod
    def from_profile(cls, profile: dict | None, rain: bool) -> Sensing:
        s = (profile or {}).get("sensing")
        if not s:
            return cls()
        if rain:
            return cls(range_m=float(s["rain_range_m"]), noise_m=float(s["rain_noise_m"]))
        return cls(range_m=float(s["range_m"]), noise_m=float(s["noise_m"]))


@dataclass
class EpisodeFrames:
    features: np.ndarray  # [n, F] float32
    labels: np.ndarray  # [n, L] float32
    vehicle_ids: np.ndarray  # [n] object (str)
    frames: np.ndarray  # [n] int64
    ego_rows: np.ndarray  # [n] row index of the ego in the episode table
    past_rows: np.ndarray  # [n] row of the ego 1 s earlier


def _grid(vid: np.ndarray, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Row index matrix [vehicle, frame - f0] (-1 where absent), unique ids, and f0."""
    uniq, inv = np.unique(vid, return_inverse=True)
    f0 = int(frame.min())
    grid = np.full((len(uniq), int(frame.max()) - f0 + 1), -1, dtype=np.int64)
    grid[inv, frame - f0] = np.arange(len(vid))
    return grid, uniq, f0


def featurize_episode(
    cols: dict[str, np.ndarray],
    log_hz: int,
    warmup_s: float,
    seed: int,
    profile: dict | None,
) -> EpisodeFrames:
    """Features and labels for every usable (fleet vehicle, frame) of one episode.

    A frame is usable when the vehicle is a fleet vehicle that never crashed in this episode, the
    frame is at or after warm-up, and the vehicle is logged 1 s before and 1/2/3 s after it.
    """
    vid = np.asarray(cols["vehicle_id"]).astype(str)
    frame = np.asarray(cols["frame"], dtype=np.int64)
    episode = int(cols["episode"][0])
    ego, past, fut = _usable_rows(cols, vid, frame, int(log_hz), warmup_s)
    n = len(ego)
    f32 = {k: np.asarray(cols[k], dtype=np.float64) for k in _FLOAT_COLUMNS}
    feats = np.zeros((n, N_FEATURES), dtype=np.float64)
    if n:
        _ego_features(feats, f32, ego, past)
        _lane_features(feats, cols, f32, ego)
        rain = bool(np.asarray(cols["rain"])[0])
        _neighbours(
            feats,
            ego,
            frame,
            f32,
            Sensing.from_profile(profile, rain),
            np.random.default_rng([seed, 3, episode]),
        )
    return EpisodeFrames(
        features=feats.astype(np.float32),
        labels=_labels(f32, ego, fut).astype(np.float32),
        vehicle_ids=vid[ego],
        frames=frame[ego],
        ego_rows=ego,
        past_rows=past,
    )


_FLOAT_COLUMNS = (
    "x",
    "y",
    "vx",
    "vy",
    "speed",
    "heading",
    "accel",
    "lane_offset",
    "speed_limit",
    "length",
    "merge_distance",
)


def _usable_rows(
    cols: dict[str, np.ndarray], vid: np.ndarray, frame: np.ndarray, hz: int, warmup_s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the usable frames: (ego row, the row 1 s before, the rows at each horizon)."""
    grid, uniq, f0 = _grid(vid, frame)
    n_f = grid.shape[1]
    crashed_any = np.zeros(len(uniq), dtype=bool)
    np.logical_or.at(crashed_any, np.searchsorted(uniq, vid), np.asarray(cols["crashed"]))
    fleet = np.zeros(len(uniq), dtype=bool)
    fleet[np.searchsorted(uniq, vid)] = np.asarray(cols["is_fleet"])
    first = int(np.ceil(warmup_s * hz - 1e-9))
    ego_rows, past_rows, fut_rows = [], [], []
    for u in np.flatnonzero(fleet & ~crashed_any):
        for fi in range(n_f):
            r = grid[u, fi]
            if r < 0 or fi + f0 < first or fi < hz or fi + 3 * hz >= n_f:
                continue
            past = grid[u, fi - hz]
            fut = [grid[u, fi + h * hz] for h in HORIZONS_S]
            if past < 0 or min(fut) < 0:
                continue
            ego_rows.append(r)
            past_rows.append(past)
            fut_rows.append(fut)
    return (
        np.asarray(ego_rows, dtype=np.int64),
        np.asarray(past_rows, dtype=np.int64),
        np.asarray(fut_rows, dtype=np.int64).reshape(-1, len(HORIZONS_S)),
    )


def _ego_features(
    feats: np.ndarray, f32: dict[str, np.ndarray], ego: np.ndarray, past: np.ndarray
) -> None:
    """The ego vehicle's own state, at fixed physical scales."""
    sp = f32["speed"]
    feats[:, 0] = sp[ego] / 30.0
    feats[:, 1] = f32["vy"][ego] / 5.0
    feats[:, 2] = f32["heading"][ego]
    feats[:, 3] = f32["lane_offset"][ego] / LANE_WIDTH
    feats[:, 4] = (sp[ego] - sp[past]) / 1.0 / 5.0
    feats[:, 5] = f32["length"][ego] / 5.0


def _lane_features(
    feats: np.ndarray, cols: dict[str, np.ndarray], f32: dict[str, np.ndarray], ego: np.ndarray
) -> None:
    """The road around the ego vehicle: lanes, speed limit, merge, rain."""
    lane = np.asarray(cols["lane"], dtype=np.float64)[ego]
    n_lanes = np.asarray(cols["n_lanes"], dtype=np.float64)[ego]
    sp = f32["speed"]
    k = _N_EGO
    feats[:, k + 0] = n_lanes / 5.0
    feats[:, k + 1] = np.asarray(cols["lane_change"], dtype=np.float64)[ego]
    feats[:, k + 2] = np.clip(n_lanes - 1 - lane, 0, None) / 4.0
    feats[:, k + 3] = np.clip(lane, 0, None) / 4.0
    feats[:, k + 4] = f32["speed_limit"][ego] / 30.0
    feats[:, k + 5] = (sp[ego] - f32["speed_limit"][ego]) / 10.0
    feats[:, k + 6] = (np.asarray(cols["scenario"])[ego] == "merge").astype(np.float64)
    md = f32["merge_distance"][ego]
    feats[:, k + 7] = np.where(md >= NO_MERGE, 1.0, np.clip(md / 200.0, 0.0, 1.0))
    feats[:, k + 8] = np.asarray(cols["rain"], dtype=np.float64)[ego]


def _labels(f32: dict[str, np.ndarray], ego: np.ndarray, fut: np.ndarray) -> np.ndarray:
    """Future displacement at each horizon (metres) and the acceleration now."""
    n = len(ego)
    labels = np.zeros((n, 2 * len(HORIZONS_S) + 1), dtype=np.float64)
    for j in range(len(HORIZONS_S)):
        labels[:, 2 * j] = f32["x"][fut[:, j]] - f32["x"][ego] if n else 0
        labels[:, 2 * j + 1] = f32["y"][fut[:, j]] - f32["y"][ego] if n else 0
    if n:
        labels[:, -1] = f32["accel"][ego]
    return labels


def _neighbours(feats, ego, frame, f, sensing: Sensing, rng: np.random.Generator) -> None:
    """Fill the six neighbour slots (nearest in each lateral band, ahead and behind)."""
    base = _N_EGO + _N_LANE
    ego_frames = frame[ego]
    order = np.argsort(frame, kind="stable")
    fr_sorted = frame[order]
    for fv in np.unique(ego_frames):
        lo, hi = np.searchsorted(fr_sorted, [fv, fv + 1])
        others = order[lo:hi]
        which = np.flatnonzero(ego_frames == fv)
        e = ego[which]
        dx = f["x"][others][None, :] - f["x"][e][:, None]
        dy = f["y"][others][None, :] - f["y"][e][:, None]
        dvx = f["vx"][others][None, :] - f["vx"][e][:, None]
        dvy = f["vy"][others][None, :] - f["vy"][e][:, None]
        if sensing.noise_m > 0:
            dx = dx + rng.normal(0, sensing.noise_m, dx.shape)
            dy = dy + rng.normal(0, sensing.noise_m, dy.shape)
            dvx = dvx + rng.normal(0, 0.5 * sensing.noise_m, dvx.shape)
            dvy = dvy + rng.normal(0, 0.5 * sensing.noise_m, dvy.shape)
        visible = (others[None, :] != e[:, None]) & (np.hypot(dx, dy) <= sensing.range_m)
        same = np.abs(dy) < SAME_LANE_HALF
        left = (dy >= SAME_LANE_HALF) & (dy < SIDE_LANE_FAR)
        right = (dy <= -SAME_LANE_HALF) & (dy > -SIDE_LANE_FAR)
        ahead = dx > 0
        bands = {
            "front": same & ahead,
            "rear": same & ~ahead,
            "front_left": left & ahead,
            "rear_left": left & ~ahead,
            "front_right": right & ahead,
            "rear_right": right & ~ahead,
        }
        for si, slot in enumerate(NEIGHBOUR_SLOTS):
            m = bands[slot] & visible
            dist = np.where(m, np.abs(dx), np.inf)
            j = np.argmin(dist, axis=1)
            has = np.isfinite(dist[np.arange(len(e)), j])
            rows = which[has]
            jj = j[has]
            ii = np.flatnonzero(has)
            col = base + si * _N_NB
            feats[rows, col + 0] = 1.0
            feats[rows, col + 1] = dx[ii, jj] / NEIGHBOUR_SCALES["dx"]
            feats[rows, col + 2] = dy[ii, jj] / NEIGHBOUR_SCALES["dy"]
            feats[rows, col + 3] = dvx[ii, jj] / NEIGHBOUR_SCALES["dvx"]
            feats[rows, col + 4] = dvy[ii, jj] / NEIGHBOUR_SCALES["dvy"]
