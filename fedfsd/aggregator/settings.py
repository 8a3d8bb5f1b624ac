"""The aggregator's run config (Flower `run_config`, hyphenated keys), validated with pydantic.

Only this side's knobs live here. Everything the regions receive is a *request*: each region's
policy can only tighten it (fedfsd.config.RegionPolicy.effective).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Feature/label widths of the object-list task: the aggregator builds the model's shapes without
# touching the region side's schema module, so the two numbers are repeated here and
# tests/test_apps_components.py checks they equal the region side's feature and label counts.
DEFAULT_N_FEATURES = 45
DEFAULT_N_LABELS = 7


class SettingsError(ValueError):
    """Bad run config; the message names the key."""


class RunSettings(BaseModel):
    """Validated run config of one federation run."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    num_server_rounds: int = Field(3, ge=1, alias="num-server-rounds")
    local_steps: int = Field(20, ge=1, alias="local-steps")
    lr: float = Field(0.05, gt=0)
    noise_multiplier: float = Field(1.0, ge=0, alias="noise-multiplier")
    clip_norm: float = Field(1.0, gt=0, alias="clip-norm")
    vehicles_per_step: int = Field(16, ge=1, alias="vehicles-per-step")
    frames_per_vehicle: int = Field(8, ge=1, alias="frames-per-vehicle")
    model: str = "mlp"
    n_features: int = Field(DEFAULT_N_FEATURES, ge=1, alias="n-features")
    n_labels: int = Field(DEFAULT_N_LABELS, ge=1, alias="n-labels")
    bev_channels: int = Field(3, ge=1, alias="bev-channels")
    model_seed: int = Field(0, alias="model-seed")
    min_regions: int = Field(2, ge=1, alias="min-regions")
    round_timeout: float = Field(120.0, gt=0, alias="round-timeout")
    # How long a round waits for `min-regions` nodes to be connected (default: round-timeout).
    node_wait: float | None = Field(None, gt=0, alias="node-wait")
    evaluate_timeout: float | None = Field(None, gt=0, alias="evaluate-timeout")
    # Score the global model on the regions' test episodes after every k-th round (and always
    # after the last). Each evaluation is a second message exchange with a full copy of the
    # model, so k > 1 trades monitoring detail for round time and downlink bytes
    # (experiments/federation_cost.py measures both).
    evaluate_every: int = Field(1, ge=1, alias="evaluate-every")
    run_dir: str = Field("", alias="run-dir")
    run_id: str = Field("", alias="run-id")
    resume: bool = False
    server_momentum: float = Field(0.0, ge=0, lt=1, alias="server-momentum")
    server_lr: float = Field(1.0, gt=0, alias="server-lr")
    update_norm_bound: float = Field(5.0, gt=0, alias="update-norm-bound")
    plot_metric: str = Field("loss", alias="plot-metric")
    # Absolute path of a JSON/TOML mapping region -> Ed25519 public key (PEM, 64 hex, or a PEM
    # file path relative to the mapping): manifests must carry that key's signature
    # (fedfsd.aggregator.receipts). Empty: each region's first key is pinned for the run.
    region_keys: str = Field("", alias="region-keys")
    # Development only: accept manifests without a signature when no region-keys are set.
    allow_unsigned: bool = Field(False, alias="allow-unsigned")

    @model_validator(mode="after")
    def _run_dir_absolute(self) -> RunSettings:
        if self.run_dir and not Path(self.run_dir).is_absolute():
            raise ValueError(f"run-dir must be an absolute path, got {self.run_dir!r}")
        if self.region_keys and not Path(self.region_keys).is_absolute():
            raise ValueError(f"region-keys must be an absolute path, got {self.region_keys!r}")
        return self

    @property
    def node_wait_s(self) -> float:
        return self.node_wait if self.node_wait is not None else self.round_timeout

    @property
    def evaluate_timeout_s(self) -> float:
        return self.evaluate_timeout if self.evaluate_timeout is not None else self.round_timeout

    def evaluates_after(self, rnd: int) -> bool:
        """Whether round `rnd` ends with an evaluate exchange."""
        return rnd % self.evaluate_every == 0 or rnd >= self.num_server_rounds

    def train_request(self) -> dict[str, Any]:
        """What each region is asked to do (ConfigRecord "config"; the policy may tighten it)."""
        return {
            "local-steps": self.local_steps,
            "lr": self.lr,
            "noise-multiplier": self.noise_multiplier,
            "clip-norm": self.clip_norm,
            "vehicles-per-step": self.vehicles_per_step,
            "frames-per-vehicle": self.frames_per_vehicle,
            "model": self.model,
        }


def parse_settings(run_config: Mapping[str, Any]) -> RunSettings:
    """Validate a Flower run config; SettingsError names the first bad key."""
    try:
        return RunSettings.model_validate(dict(run_config))
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<run config>"
        raise SettingsError(f"run config {key}: {err['msg']}") from None
