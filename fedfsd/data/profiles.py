"""Region profiles: road layout, traffic, driver-style distributions, weather and sensing.

A profile is a TOML file validated by pydantic, so an operator can describe a new region and a
bad file fails with a message naming the field. The built-in regions ship as such files.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedfsd.errors import InputError

BUILTIN_REGIONS = ("cn", "eu", "us", "jp")
# Profiles that belong to no region: public simulated data (outside every region's ε).
PUBLIC_PROFILES = ("public",)


class ProfileError(InputError, ValueError):
    """A region profile could not be read or failed validation (the message names the field)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Dist(_Strict):
    """Truncated normal distribution of one driver parameter across a region's fleet."""

    mean: float
    std: float = Field(ge=0)
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Dist:
        if not self.min <= self.mean <= self.max:
            raise ValueError("need min <= mean <= max")
        return self


class Road(_Strict):
    lanes: int = Field(ge=1, le=5)
    speed_limit_kmh: float = Field(gt=0, le=200)
    # Share of episodes on each scenario; must sum to 1.
    scenario_mix: dict[str, float]
    # Optional per-episode variation (a generic, region-less profile mixes road types): share
    # of episodes with each lane count, and speed limits drawn uniformly per episode. Empty:
    # every episode has `lanes` and `speed_limit_kmh`.
    lanes_mix: dict[int, float] = Field(default_factory=dict)
    speed_limits_kmh: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _variation(self) -> Road:
        if self.lanes_mix:
            if any(not 1 <= k <= 5 for k in self.lanes_mix):
                raise ValueError("lanes_mix keys must be lane counts in 1..5")
            if any(v < 0 for v in self.lanes_mix.values()):
                raise ValueError("lanes_mix shares must be >= 0")
            if abs(sum(self.lanes_mix.values()) - 1.0) > 1e-6:
                raise ValueError("lanes_mix shares must sum to 1")
        if any(not 0 < v <= 200 for v in self.speed_limits_kmh):
            raise ValueError("speed_limits_kmh must be limits in (0, 200]")
        return self

    @model_validator(mode="after")
    def _mix(self) -> Road:
        unknown = set(self.scenario_mix) - {"highway", "merge"}
        if unknown:
            raise ValueError(f"unknown scenario(s) {sorted(unknown)}; known: highway, merge")
        if any(v < 0 for v in self.scenario_mix.values()):
            raise ValueError("scenario shares must be >= 0")
        if abs(sum(self.scenario_mix.values()) - 1.0) > 1e-6:
            raise ValueError("scenario shares must sum to 1")
        return self


class Traffic(_Strict):
    vehicles_per_km_per_lane: float = Field(gt=0, le=80)
    vehicles_per_episode: int = Field(ge=2, le=80)
    fleet_share: float = Field(gt=0, le=1)  # share of an episode's vehicles that are fleet ones


class Episode(_Strict):
    duration_s: float = Field(gt=0, le=300)
    warmup_s: float = Field(ge=1, le=60)  # ≥ 1 s so every logged frame has 1 s of history
    sim_hz: int = Field(ge=5, le=50)
    log_hz: int = Field(ge=1, le=50)

    @model_validator(mode="after")
    def _rates(self) -> Episode:
        if self.sim_hz % self.log_hz:
            raise ValueError("sim_hz must be a multiple of log_hz")
        if self.duration_s < self.warmup_s + 4:
            raise ValueError("duration_s must exceed warmup_s by at least 4 s (3 s of labels)")
        return self


class Drivers(_Strict):
    desired_speed_ratio: Dist  # × speed limit
    time_headway_s: Dist
    min_gap_m: Dist
    comfort_acc: Dist  # m/s^2, > 0
    comfort_brake: Dist  # m/s^2, > 0 (magnitude)
    politeness: Dist
    lane_change_gain: Dist  # MOBIL threshold, m/s^2
    keep_side_bias: Dist  # m/s^2 added to the incentive towards the slow lane

    @model_validator(mode="after")
    def _positive(self) -> Drivers:
        for name in ("desired_speed_ratio", "time_headway_s", "comfort_acc", "comfort_brake"):
            if getattr(self, name).min <= 0:
                raise ValueError(f"{name}.min must be > 0")
        return self


class Weather(_Strict):
    rain_probability: float = Field(ge=0, le=1)
    rain_speed_factor: float = Field(gt=0, le=1)
    rain_headway_factor: float = Field(ge=1, le=3)
    rain_acc_factor: float = Field(gt=0, le=1)


class Sensing(_Strict):
    range_m: float = Field(gt=0)
    noise_m: float = Field(ge=0)
    rain_range_m: float = Field(gt=0)
    rain_noise_m: float = Field(ge=0)


class RegionProfile(_Strict):
    """Everything that makes one region's driving data what it is."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    description: str = ""
    left_hand_traffic: bool = False
    road: Road
    traffic: Traffic
    episode: Episode
    drivers: Drivers
    weather: Weather
    sensing: Sensing

    @property
    def speed_limit(self) -> float:
        """Speed limit in m/s."""
        return self.road.speed_limit_kmh / 3.6


def _format(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: field '{loc}': {first['msg']}{more}"


def profile_from_dict(data: dict[str, Any], source: str = "profile") -> RegionProfile:
    """Validate a parsed profile; raises ProfileError naming the first bad field."""
    try:
        return RegionProfile.model_validate(data)
    except ValidationError as err:
        raise ProfileError(_format(err, source)) from None


def load_profile_file(path: str | Path) -> RegionProfile:
    """Read and validate a profile TOML file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{p}: no such profile file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ProfileError(f"{p}: not valid TOML: {err}") from None
    return profile_from_dict(data, str(p))


def load_region(name: str) -> RegionProfile:
    """Load a profile shipped with the package: a region (cn, eu, us, jp) or "public"."""
    known = BUILTIN_REGIONS + PUBLIC_PROFILES
    if name not in known:
        raise ProfileError(f"unknown region {name!r}; built-in: {', '.join(known)}")
    text = resources.files("fedfsd.data").joinpath(f"profiles/{name}.toml").read_text()
    return profile_from_dict(tomllib.loads(text), f"{name}.toml")
