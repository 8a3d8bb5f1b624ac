"""A warning when a generated dataset's crash rate is high.

Why: a fleet vehicle that crashed in an episode never serves as an ego there
(fedfsd.data.featurize), so a high crash rate silently removes a large share of the fleet's
frames and keeps the calmer drivers: the data no longer looks like the region it stands for.
A 17 % rate went unnoticed in a walkthrough; above CRASH_RATE_WARN the commands say so.
"""

from __future__ import annotations

CRASH_RATE_WARN = 0.10  # share of fleet vehicle-episodes with a collision


def crash_warning(rate: float | None) -> str | None:
    """The warning for a crash rate, or None when it is unremarkable (or unknown)."""
    if rate is None or not rate > CRASH_RATE_WARN:
        return None
    return (
        f"crash rate {rate:.1%} is above {CRASH_RATE_WARN:.0%}: crashed vehicles' frames of those "
        "episodes are not used for training, so the dataset under-represents its region; "
        "lower the profile's traffic density or aggressiveness (docs/data-format.md), or check "
        "the simulator settings"
    )
