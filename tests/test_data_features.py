"""Features from a hand-written track table (what an operator's converted log looks like)."""

from __future__ import annotations

import numpy as np

from fedfsd.data.feature_spec import FEATURE_NAMES, LABEL_NAMES
from fedfsd.data.featurize import featurize_episode


def _tracks() -> dict[str, np.ndarray]:
    """Ego at 20 m/s in lane 1 of 3; one car ahead, one ahead-left, one behind-right; 5 Hz, 5 s."""
    hz, n_frames = 5, 25
    cars = {  # id: (fleet, x0, y, speed)
        "ego": (True, 0.0, 4.0, 20.0),
        "ahead": (False, 30.0, 4.0, 18.0),
        "left": (False, 12.0, 8.0, 22.0),
        "rear_right": (False, -15.0, 0.0, 20.0),
    }
    rows: dict[str, list] = {k: [] for k in (
        "episode", "frame", "t", "vehicle_id", "is_fleet", "x", "y", "vx", "vy", "speed",
        "heading", "accel", "steering", "lane", "n_lanes", "lane_offset", "lane_change",
        "speed_limit", "length", "width", "crashed", "scenario", "merge_distance", "rain",
    )}  # fmt: skip
    for f in range(n_frames):
        for vid, (fleet, x0, y, v) in cars.items():
            vals = dict(
                episode=0,
                frame=f,
                t=f / hz,
                vehicle_id=vid,
                is_fleet=fleet,
                x=x0 + v * f / hz,
                y=y,
                vx=v,
                vy=0.0,
                speed=v,
                heading=0.0,
                accel=0.5 if vid == "ego" else 0.0,
                steering=0.0,
                lane=int(y // 4),
                n_lanes=3,
                lane_offset=0.0,
                lane_change=0,
                speed_limit=25.0,
                length=5.0,
                width=2.0,
                crashed=False,
                scenario="highway",
                merge_distance=1000.0,
                rain=False,
            )
            for k, val in vals.items():
                rows[k].append(val)
    return {k: np.asarray(v) for k, v in rows.items()}


def test_hand_made_episode() -> None:
    ef = featurize_episode(_tracks(), log_hz=5, warmup_s=0.0, seed=0, profile=None)
    # Frames 5..9 have 1 s of history and 3 s of future (25 frames = 0..24).
    assert ef.frames.tolist() == [5, 6, 7, 8, 9] and set(ef.vehicle_ids) == {"ego"}
    f = dict(zip(FEATURE_NAMES, ef.features[0], strict=True))
    assert np.isclose(f["ego_speed"], 20 / 30) and np.isclose(f["speed_limit"], 25 / 30)
    assert np.isclose(f["lanes_left"], 1 / 4) and np.isclose(f["lanes_right"], 1 / 4)
    assert f["front_present"] == 1 and np.isclose(f["front_dx"], (48 - 20) / 100)
    assert np.isclose(f["front_dvx"], -2 / 10)
    assert f["front_left_present"] == 1 and np.isclose(f["front_left_dy"], 4 / 10)
    assert np.isclose(f["front_left_dx"], (34 - 20) / 100)
    assert f["rear_right_present"] == 1 and np.isclose(f["rear_right_dx"], -15 / 100)
    assert f["rear_present"] == 0 and f["rear_left_present"] == 0 and f["front_right_present"] == 0
    lab = dict(zip(LABEL_NAMES, ef.labels[0], strict=True))
    assert np.isclose(lab["dx_1s"], 20) and np.isclose(lab["dx_3s"], 60) and lab["dy_3s"] == 0
    assert np.isclose(lab["accel"], 0.5)


def test_sensor_range_and_noise_come_from_the_profile() -> None:
    prof = {"sensing": {"range_m": 20.0, "noise_m": 0.5, "rain_range_m": 10.0, "rain_noise_m": 1}}
    a = featurize_episode(_tracks(), 5, 0.0, seed=0, profile=prof)
    b = featurize_episode(_tracks(), 5, 0.0, seed=0, profile=prof)
    c = featurize_episode(_tracks(), 5, 0.0, seed=1, profile=prof)
    np.testing.assert_array_equal(a.features, b.features)  # seeded
    assert not np.array_equal(a.features, c.features)
    f = dict(zip(FEATURE_NAMES, a.features[0], strict=True))
    assert f["front_present"] == 0  # 26 m ahead is beyond a 20 m range
    assert f["rear_right_present"] == 1 and abs(f["rear_right_dx"] * 100 + 15) < 3
