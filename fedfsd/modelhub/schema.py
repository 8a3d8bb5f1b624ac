"""The object-list feature schema a model was trained on, as metadata a model file can carry.

Why here: `global_model.npz` is a bare state-dict, so nothing said which features (and which
fixed scales) its inputs are. A model card, `fedfsd model evaluate` and an exported graph need
them: the exported graph takes features in physical units (docs/data-format.md, "Features and
labels") and divides by these scales itself. The scales are the constants of
`fedfsd.data.featurize`; `tests/test_model_handoff.py` recomputes features from a track table to
check that they agree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Version of the feature vector (names, order, scales). Bump it whenever features.py changes
# names or scales: a model trained on another version is refused by `fedfsd model evaluate`.
FEATURE_SCHEMA_VERSION = 1
SCHEMA_NAME = "object-list"

# Physical scale and unit of every EGO and LANE feature, in FEATURE_NAMES order (the neighbour
# scales are NEIGHBOUR_SCALES). The feature is `raw / scale`.
_EGO_LANE_SCALES: dict[str, tuple[float, str]] = {
    "ego_speed": (30.0, "m/s"),
    "ego_vy": (5.0, "m/s"),
    "ego_heading": (1.0, "rad"),
    "ego_lane_offset": (4.0, "m"),
    "ego_speed_change_1s": (5.0, "m/s^2"),
    "ego_length": (5.0, "m"),
    "lane_count": (5.0, "lanes"),
    "turn_signal": (1.0, "-1/0/+1"),
    "lanes_left": (4.0, "lanes"),
    "lanes_right": (4.0, "lanes"),
    "speed_limit": (30.0, "m/s"),
    "speed_over_limit": (10.0, "m/s"),
    "is_merge_road": (1.0, "0/1"),
    "merge_distance": (200.0, "m (>= 200 or 1000 = none)"),
    "rain": (1.0, "0/1"),
}
_NEIGHBOUR_UNITS = {"present": "0/1", "dx": "m", "dy": "m", "dvx": "m/s", "dvy": "m/s"}
# Features clipped after scaling (featurize clips merge_distance / 200 to [0, 1]).
CLIPPED: dict[str, tuple[float, float]] = {"merge_distance": (0.0, 1.0)}


def feature_scales() -> tuple[list[float], list[str]]:
    """(scale, unit) of every feature in FEATURE_NAMES order."""
    from fedfsd.data.feature_spec import FEATURE_NAMES, NEIGHBOUR_FIELDS, NEIGHBOUR_SCALES

    scales, units = [], []
    for name in FEATURE_NAMES:
        if name in _EGO_LANE_SCALES:
            s, u = _EGO_LANE_SCALES[name]
        else:
            field = next(f for f in NEIGHBOUR_FIELDS if name.endswith("_" + f))
            s, u = NEIGHBOUR_SCALES[field], _NEIGHBOUR_UNITS[field]
        scales.append(float(s))
        units.append(u)
    return scales, units


def feature_schema() -> dict[str, Any]:
    """The current object-list schema: names, scales, units, clipping, labels; with a digest."""
    from fedfsd.data.feature_spec import FEATURE_NAMES, LABEL_NAMES, LABEL_SCALES

    scales, units = feature_scales()
    body = {
        "name": SCHEMA_NAME,
        "version": FEATURE_SCHEMA_VERSION,
        "features": list(FEATURE_NAMES),
        "feature_scales": scales,
        "feature_units": units,
        "clipped": {k: list(v) for k, v in CLIPPED.items()},
        "labels": list(LABEL_NAMES),
        "label_scales": [float(s) for s in LABEL_SCALES],
        "label_units": ["m"] * (len(LABEL_NAMES) - 1) + ["m/s^2"],
    }
    return {**body, "sha256": schema_digest(body)}


def schema_digest(schema: dict[str, Any]) -> str:
    """sha256 over what fixes the meaning of the inputs and outputs (names, scales, clipping)."""
    keys = ("name", "version", "features", "feature_scales", "clipped", "labels", "label_scales")
    text = json.dumps({k: schema.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def describe(schema: dict[str, Any] | None, n_features: int | None = None) -> str:
    """One short name for messages: `object-list v1 (45 features)`."""
    if not schema:
        return f"unknown schema ({n_features} features)" if n_features else "unknown schema"
    n = len(schema.get("features", [])) or n_features
    return f"{schema.get('name', '?')} v{schema.get('version', '?')} ({n} features)"
