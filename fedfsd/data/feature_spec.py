"""Feature and label definitions with FIXED physical scales shared by every region.

Per-region normalisation breaks cross-region use (speed limit and lane count are constant inside a
region, σ ≈ 0), so every feature is divided by a constant physical scale written here once.
The computation from track tables lives in `fedfsd.data.featurize`; this module only names things
so that cheap imports (tests, models) need neither pyarrow nor the simulator.
"""

from __future__ import annotations

# Neighbour slots around the ego, in the order they appear in the feature vector. "left" and
# "right" are in the logged world frame (+y is left of the direction of travel), so a mirrored
# (left-hand traffic) region genuinely changes which slot holds the overtaking lane.
NEIGHBOUR_SLOTS: tuple[str, ...] = (
    "front",
    "rear",
    "front_left",
    "rear_left",
    "front_right",
    "rear_right",
)
NEIGHBOUR_FIELDS: tuple[str, ...] = ("present", "dx", "dy", "dvx", "dvy")

EGO_FEATURES: tuple[str, ...] = (
    "ego_speed",  # m/s / 30
    "ego_vy",  # lateral velocity m/s / 5
    "ego_heading",  # heading relative to the lane, rad
    "ego_lane_offset",  # lateral offset from lane centre, m / 4 (lane width)
    "ego_speed_change_1s",  # (v(t) - v(t-1 s)) / 1 s, m/s^2 / 5
    "ego_length",  # m / 5
)
LANE_FEATURES: tuple[str, ...] = (
    "lane_count",  # lanes of the carriageway / 5
    "turn_signal",  # -1 changing lane towards -y, +1 towards +y, 0 none (the blinker)
    "lanes_left",  # lanes available on +y side / 4
    "lanes_right",  # lanes available on -y side / 4
    "speed_limit",  # m/s / 30
    "speed_over_limit",  # (v - limit) / 10
    "is_merge_road",  # 1 on a merge scenario
    "merge_distance",  # to the end of the merge lane, m / 200, clipped to [0, 1] (1 = none)
    "rain",  # 1 when it rains (wipers on: observable by the vehicle)
)

FEATURE_NAMES: list[str] = (
    list(EGO_FEATURES)
    + list(LANE_FEATURES)
    + [f"{slot}_{field}" for slot in NEIGHBOUR_SLOTS for field in NEIGHBOUR_FIELDS]
)
N_FEATURES: int = len(FEATURE_NAMES)

# Fixed scale used for each neighbour field (dx, dy metres; dvx, dvy metres/second).
NEIGHBOUR_SCALES: dict[str, float] = {
    "present": 1.0,
    "dx": 100.0,
    "dy": 10.0,
    "dvx": 10.0,
    "dvy": 5.0,
}

HORIZONS_S: tuple[int, ...] = (1, 2, 3)
LABEL_NAMES: list[str] = [f"{axis}_{h}s" for h in HORIZONS_S for axis in ("dx", "dy")] + ["accel"]
N_LABELS: int = len(LABEL_NAMES)
# Labels are stored in physical units (metres, m/s^2). These fixed scales are what a trainer may
# divide by to get O(1) targets; they are the same for every region.
LABEL_SCALES: list[float] = [30.0, 4.0, 60.0, 4.0, 90.0, 4.0, 3.0]


def constant_velocity_labels(features):  # noqa: ANN001, ANN201 - numpy in, numpy out
    """Labels predicted by constant-velocity extrapolation of the ego ([N, F] -> [N, L] float32).

    A strong physical prior for the displacement labels (dx ≈ speed × t, dy ≈ vy × t, accel 0):
    models may learn the residual `labels - constant_velocity_labels(features)` instead.
    """
    import numpy as np

    x = np.asarray(features)
    speed = x[:, FEATURE_NAMES.index("ego_speed")] * 30.0
    vy = x[:, FEATURE_NAMES.index("ego_vy")] * 5.0
    out = np.zeros((len(x), N_LABELS), dtype=np.float32)
    for h in HORIZONS_S:
        out[:, LABEL_NAMES.index(f"dx_{h}s")] = speed * h
        out[:, LABEL_NAMES.index(f"dy_{h}s")] = vy * h
    return out
