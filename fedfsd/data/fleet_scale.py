"""Fleet-scale mode: many vehicles per CPU-second, each still driven by its own IDM/MOBIL style.

Why: vehicle-level DP noise per step falls with the number of vehicles per step, so the studies
need regions of 10^4-10^5 vehicles. The stock profiles spend most simulation time on vehicles
that are not logged as fleet vehicles (40% background traffic) and on long episodes. This mode
keeps the region's road, density, speed limit, driver-style distributions, weather and sensing,
and changes only how the fleet is sampled into episodes:

- every simulated vehicle is a fleet vehicle (fleet_share = 1), so no simulation time is spent
  on unlogged traffic;
- more vehicles per episode (60, a longer stretch of road at the region's own density);
- short episodes (8 s, 2 s warm-up): each appearance yields up to 16 usable frames, and a
  vehicle appears in about `appearances` episodes (the episode count follows from it).

docs/data-format.md says what this does to realism.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from fedfsd.data.profiles import RegionProfile

DEFAULT_APPEARANCES = 3.0


class FleetScale(BaseModel):
    """How a fleet-scale dataset samples its fleet into episodes (recorded in the manifest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vehicles_per_episode: int = Field(60, ge=2, le=80)
    duration_s: float = Field(8.0, gt=0, le=300)
    warmup_s: float = Field(2.0, ge=1, le=60)
    appearances: float = Field(DEFAULT_APPEARANCES, gt=0, le=100)


def fleet_scale_profile(profile: RegionProfile, cfg: FleetScale) -> RegionProfile:
    """The region's profile with only the episode sampling changed (all fleet, short, dense)."""
    data = profile.model_dump(mode="json")
    data["traffic"].update(vehicles_per_episode=cfg.vehicles_per_episode, fleet_share=1.0)
    data["episode"].update(duration_s=cfg.duration_s, warmup_s=cfg.warmup_s)
    return RegionProfile.model_validate(data)


def auto_episodes(vehicles: int, cfg: FleetScale) -> int:
    """Episodes so that every vehicle drives in about `cfg.appearances` of them."""
    per_episode = min(cfg.vehicles_per_episode, vehicles)
    return max(1, math.ceil(vehicles * cfg.appearances / per_episode))
