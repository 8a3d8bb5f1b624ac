"""Region policy and train requests.

The region operator owns a TOML policy file; the aggregator's run config arrives as a
`TrainRequest`. `RegionPolicy.effective(request)` merges the two so that the request can only
tighten the policy (DESIGN.md decision 7): nothing the global side sends can loosen σ, C, the
number of steps or the per-step sample of vehicles.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedfsd.errors import InputError
from fedfsd.run_config import TrainSchedule

KNOWN_METRICS = ("loss", "ade", "fde", "accel_mae")
# Per-vehicle bound on each metric (the vehicle's mean over its frames is clipped to [0, bound]):
# one vehicle can move a released metric sum by at most this (loss in scaled-label units, ade/fde
# in metres, accel_mae in m/s²).
DEFAULT_METRIC_CLIP: dict[str, float] = {"loss": 10.0, "ade": 10.0, "fde": 20.0, "accel_mae": 3.0}


class PolicyError(InputError, ValueError):
    """An invalid policy file, or a policy that does not fit the data it is used with."""

    border_reason = "policy invalid or does not fit the data"


class DPParams(BaseModel):
    """The mechanism parameters actually used for one local round (after tightening)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    noise_multiplier: float
    clip_norm: float
    steps: int
    vehicles_per_step: int
    frames_per_vehicle: int
    lr: float
    update_norm_bound: float


class TrainRequest(TrainSchedule):
    """What the aggregator (or an operator running `train-local`) asks a region to do.

    The seven schedule keys, their defaults and help texts are fedfsd.run_config.TrainSchedule's
    (the planner's schedule for a nominal 1,000-vehicle fleet, ε = 8, 10 rounds).
    """

    model_config = ConfigDict(extra="forbid", frozen=False)

    # sha256 of the aggregator's round-0 model file when it started from one (public
    # pretraining); the region records it in its ledger. "" = built from the model registry.
    initial_model_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")


class RegionPolicy(BaseModel):
    """The region-owned privacy policy (see docs/contracts.md, "Region policy")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    region: str = Field(min_length=1)
    epsilon_budget: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    min_noise_multiplier: float = Field(gt=0)
    max_clip_norm: float = Field(gt=0)
    update_norm_bound: float = Field(gt=0)
    max_local_steps: int = Field(200, ge=1)
    # Compute cap on expected vehicles per step. The default equals the planner's own cap
    # (fedfsd.privacy.planner.MAX_VEHICLES_PER_STEP) so a plan is not silently capped; a tighter
    # policy still caps, and the ledger records the vehicles per step actually used.
    max_vehicles_per_step: int = Field(1024, ge=1)
    max_frames_per_vehicle: int = Field(16, ge=1)
    # Nothing but the update and its manifest leaves by default; any metric listed here leaves
    # only as a differentially private, ledgered release (fedfsd.privacy.metrics).
    allowed_metrics: list[str] = Field(default_factory=list)
    metric_clip: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_METRIC_CLIP))
    metric_noise_multiplier: float = Field(5.0, ge=0.5)
    # A public, rounded-down count of the vehicles DP-SGD samples from (the training vehicles):
    # q = vehicles per step / public_fleet_size ≥ the true rate, and only this count can be
    # inferred from what leaves. None: q uses the exact count (which the manifest's ε reveals).
    public_fleet_size: int | None = Field(None, ge=1)
    weighting: Literal["equal", "bucket"] = "equal"
    allowed_app_digests: list[str] = Field(default_factory=list)
    # Largest message the executor pulls (≈25x the largest registry model, 0.32 MB): a bigger
    # one is refused before its arrays are pulled (fedfsd.region.executor.pull_message_bounded).
    max_message_bytes: int = Field(8 << 20, ge=1 << 16)
    # Who adds the DP noise (issue 15, docs/privacy.md "Distributed noise"). "local": the region
    # adds all of it (today). "distributed": under secure aggregation it adds a Skellam share so
    # that any `min_honest_regions` honest shares reach σ; ε is then ledgered under both trust
    # assumptions and the budget is enforced on `enforce_on` ("own_noise", the default, holds
    # even if every other region cheats; "distributed" trusts t honest regions and the protocol).
    trust_model: Literal["local", "distributed"] = "local"
    min_honest_regions: int | None = Field(None, ge=2)
    enforce_on: Literal["distributed", "own_noise"] = "own_noise"

    @field_validator("epsilon_budget", "delta", "min_noise_multiplier", "max_clip_norm")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    @field_validator("allowed_metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(KNOWN_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {list(KNOWN_METRICS)}")
        return v

    @field_validator("metric_clip")
    @classmethod
    def _metric_bounds(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(KNOWN_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {list(KNOWN_METRICS)}")
        for k, b in v.items():
            if not (math.isfinite(b) and b > 0):
                raise ValueError(f"bound of {k!r} must be finite and > 0, got {b}")
        return {**DEFAULT_METRIC_CLIP, **v}

    @field_validator("metric_noise_multiplier")
    @classmethod
    def _finite_sigma_m(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    @field_validator("allowed_app_digests")
    @classmethod
    def _hex_digests(cls, v: list[str]) -> list[str]:
        for d in v:
            if len(d) != 64 or any(c not in "0123456789abcdef" for c in d.lower()):
                raise ValueError(f"{d!r} is not a sha256 hex digest")
        return v

    @model_validator(mode="after")
    def _trust_fields(self) -> RegionPolicy:
        if self.trust_model == "distributed" and self.min_honest_regions is None:
            raise ValueError(
                "min_honest_regions: required when trust_model = 'distributed' (the number t ≥ 2 "
                "of honest regions whose noise shares together reach the policy's σ)"
            )
        if self.trust_model == "local":
            # A written-out default (a policy file dumped from the model) is harmless; a value
            # that only means something in distributed mode is a contradiction.
            fields = type(self).model_fields
            extra = sorted(
                f
                for f in ("min_honest_regions", "enforce_on")
                if f in self.model_fields_set and getattr(self, f) != fields[f].default
            )
            if extra:
                raise ValueError(
                    f"{', '.join(extra)}: only applies to trust_model = 'distributed' (this "
                    "policy is 'local': the region adds all the noise itself)"
                )
        return self

    def check_dataset(self, region: str, n_vehicles: int) -> None:
        """Refuse data this policy cannot protect: wrong region, or δ not below 1/vehicles."""
        if region != self.region:
            raise PolicyError(f"region: policy is for {self.region!r} but the data is {region!r}")
        if n_vehicles < 1:
            raise PolicyError("the dataset has no vehicles")
        if not self.delta < 1.0 / n_vehicles:
            raise PolicyError(
                f"delta: {self.delta:g} must be < 1/vehicles = 1/{n_vehicles} "
                f"= {1.0 / n_vehicles:.3g} (a larger δ can reveal a whole vehicle)"
            )

    def accounted_vehicles(self, n_train: int) -> int:
        """The denominator of q: the public fleet size if declared (must not exceed the truth)."""
        if self.public_fleet_size is None:
            return n_train
        if self.public_fleet_size > n_train:
            raise PolicyError(
                f"public_fleet_size: {self.public_fleet_size} exceeds the {n_train} training "
                "vehicles; it must be rounded DOWN (q = m / N_public must not under-state the "
                "true sampling rate)"
            )
        return self.public_fleet_size

    def effective(self, request: TrainRequest | None = None) -> DPParams:
        """Merge a request into this policy; the request can only tighten it."""
        r = request or TrainRequest()
        return DPParams(
            noise_multiplier=max(r.noise_multiplier, self.min_noise_multiplier),
            clip_norm=min(r.clip_norm, self.max_clip_norm),
            steps=min(r.local_steps, self.max_local_steps),
            vehicles_per_step=min(r.vehicles_per_step, self.max_vehicles_per_step),
            frames_per_vehicle=min(r.frames_per_vehicle, self.max_frames_per_vehicle),
            lr=r.lr,
            update_norm_bound=self.update_norm_bound,
        )


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "<file>"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    if not err["loc"] and err["type"] == "value_error":  # a model validator names its field
        return msg.removeprefix("Value error, ") + more
    return f"{field}: {msg}{more}"


def parse_policy(text: str, source: str = "<policy>") -> RegionPolicy:
    """Parse and validate policy TOML; PolicyError names the offending field."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{source}: not valid TOML: {e}") from None
    try:
        return RegionPolicy.model_validate(raw)
    except ValidationError as e:
        raise PolicyError(f"{source}: {_first_error(e)}") from None


def load_policy(path: str | Path) -> RegionPolicy:
    """Load a region policy file; PolicyError names the file and the offending field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"{p}: cannot read policy: {e.strerror}") from None
    return parse_policy(text, str(p))
