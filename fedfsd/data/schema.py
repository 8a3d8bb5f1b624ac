"""On-disk track schema: one row per logged vehicle per frame (see docs/data-format.md).

Coordinate frame of every row: x metres along the road (direction of travel), y metres to the
LEFT of the direction of travel (ISO 8855: x forward, y left), heading radians counter-clockwise
from +x. Left-hand-traffic regions are logged in the same frame, so their roads are the mirror
image of right-hand ones.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TRACKS_DIR = "tracks"

# name -> (arrow type, unit, meaning). Order is the file's column order.
TRACK_COLUMNS: dict[str, tuple[pa.DataType, str, str]] = {
    "episode": (pa.int32(), "-", "episode index inside the dataset"),
    "frame": (pa.int32(), "-", "log frame index, t = frame / log_hz"),
    "t": (pa.float32(), "s", "time since the episode started"),
    "vehicle_id": (pa.string(), "-", "stable fleet id (same across episodes) or bg-<ep>-<n>"),
    "is_fleet": (pa.bool_(), "-", "true for fleet vehicles (the privacy unit), false for traffic"),
    "x": (pa.float32(), "m", "position along the road"),
    "y": (pa.float32(), "m", "lateral position, + = left of travel"),
    "vx": (pa.float32(), "m/s", "velocity along x"),
    "vy": (pa.float32(), "m/s", "velocity along y"),
    "speed": (pa.float32(), "m/s", "speed"),
    "heading": (pa.float32(), "rad", "heading, counter-clockwise from +x"),
    "accel": (pa.float32(), "m/s^2", "longitudinal acceleration commanded at this frame"),
    "steering": (pa.float32(), "rad", "front-wheel steering angle, + = left"),
    "lane": (pa.int8(), "-", "lane index counted from the lane with the smallest y (0)"),
    "n_lanes": (pa.int8(), "-", "lanes of the cross-section at x (an entry lane counts)"),
    "lane_offset": (pa.float32(), "m", "lateral offset from the lane centre, + = left"),
    "lane_change": (pa.int8(), "-", "+1 changing towards +y, -1 towards -y, 0 keeping lane"),
    "speed_limit": (pa.float32(), "m/s", "posted speed limit"),
    "length": (pa.float32(), "m", "vehicle length"),
    "width": (pa.float32(), "m", "vehicle width"),
    "crashed": (pa.bool_(), "-", "vehicle has collided (its rows are never used as egos)"),
    "scenario": (pa.string(), "-", "road type: highway | merge"),
    "merge_distance": (pa.float32(), "m", "to the end of the merge lane ahead; 1000 = none"),
    "rain": (pa.bool_(), "-", "it rains during this episode"),
}
FLOAT_COLUMNS = [n for n, (t, _, _) in TRACK_COLUMNS.items() if pa.types.is_floating(t)]
TRACK_SCHEMA = pa.schema([pa.field(n, t, nullable=False) for n, (t, _, _) in TRACK_COLUMNS.items()])
NO_MERGE = 1000.0
