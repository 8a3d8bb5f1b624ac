"""The aggregator's run config (Flower `run_config`, hyphenated keys), validated with pydantic.

Only this side's knobs live here. Everything the regions receive is a *request*: each region's
policy can only tighten it (fedfsd.config.RegionPolicy.effective).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Feature/label widths of the object-list task: the aggregator builds the model's shapes without
# touching the region side's schema module, so the two numbers are repeated here and
# tests/test_apps_components.py checks they equal the region side's feature and label counts.
DEFAULT_N_FEATURES = 45
DEFAULT_N_LABELS = 7


# The default schedule is `fedfsd privacy plan` for a nominal fleet of 1,000 vehicles per region,
# ε = 8, δ = 1e-5, 10 rounds: 128 expected vehicles per step, 69 local steps per round (690 in
# all), σ = 2.176 (σ/m = 0.017, the planner's default limit), lr 0.2. The previous default
# (16 vehicles per step, lr 0.05, σ 1.0) is the regime the DP schedule sweep found worst.
# tests/test_planner.py checks these numbers against the planner.
NOMINAL_PLAN = {"vehicles": 1000, "epsilon": 8.0, "delta": 1e-5, "rounds": 10}
DEFAULT_ROUNDS = 10
DEFAULT_LOCAL_STEPS = 69
DEFAULT_VEHICLES_PER_STEP = 128
DEFAULT_NOISE_MULTIPLIER = 2.176
DEFAULT_LR = 0.2
# Run-config keys a plan file sets (`run_config` in `fedfsd privacy plan --json`).
PLAN_KEYS = (
    "num-server-rounds",
    "local-steps",
    "vehicles-per-step",
    "noise-multiplier",
    "lr",
    "clip-norm",
    "frames-per-vehicle",
)
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")


class SettingsError(ValueError):
    """Bad run config; the message names the key."""


class RunSettings(BaseModel):
    """Validated run config of one federation run."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    num_server_rounds: int = Field(DEFAULT_ROUNDS, ge=1, alias="num-server-rounds")
    local_steps: int = Field(DEFAULT_LOCAL_STEPS, ge=1, alias="local-steps")
    lr: float = Field(DEFAULT_LR, gt=0)
    noise_multiplier: float = Field(DEFAULT_NOISE_MULTIPLIER, ge=0, alias="noise-multiplier")
    clip_norm: float = Field(1.0, gt=0, alias="clip-norm")
    vehicles_per_step: int = Field(DEFAULT_VEHICLES_PER_STEP, ge=1, alias="vehicles-per-step")
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
    # Absolute path of a `fedfsd privacy plan --json` file: its schedule (PLAN_KEYS) replaces
    # those keys of the run config ("" = none). Flower's run config always holds every declared
    # key, so the plan wins here; `fedfsd aggregator run --plan` lets explicit flags win instead.
    plan: str = ""
    # Server optimiser over the averaged update Δ: "fedavg" (w += server-lr·Δ; with
    # server-momentum > 0 it is FedAvgM, as before), "fedavgm" (needs server-momentum > 0),
    # "fedadam" (Reddi et al. 2021: server-lr, server-beta1, server-beta2, server-tau).
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam"] = Field(
        "fedavg", alias="server-optimizer"
    )
    server_momentum: float = Field(0.0, ge=0, lt=1, alias="server-momentum")
    server_lr: float = Field(1.0, gt=0, alias="server-lr")
    server_beta1: float = Field(0.9, ge=0, lt=1, alias="server-beta1")
    server_beta2: float = Field(0.99, ge=0, lt=1, alias="server-beta2")
    server_tau: float = Field(1e-3, gt=0, alias="server-tau")
    # Absolute path of an .npz of round-0 weights (e.g. pretrained on public data); "" = build
    # the model from the registry. Names and shapes must equal the registry model's.
    initial_model: str = Field("", alias="initial-model")
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
        for key, value in (
            ("run-dir", self.run_dir),
            ("plan", self.plan),
            ("initial-model", self.initial_model),
            ("region-keys", self.region_keys),
        ):
            if value and not Path(value).is_absolute():
                raise ValueError(f"{key} must be an absolute path, got {value!r}")
        if self.server_optimizer == "fedavgm" and self.server_momentum <= 0:
            raise ValueError("server-optimizer fedavgm needs server-momentum > 0")
        if self.server_optimizer == "fedadam" and self.server_momentum > 0:
            raise ValueError("server-momentum is for fedavg/fedavgm; fedadam uses server-beta1")
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


def read_plan(path: str | Path) -> dict[str, Any]:
    """The run-config keys (PLAN_KEYS) of a `fedfsd privacy plan --json` file.

    Only a JSON file is read: the aggregator does not import the privacy side.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SettingsError(f"run config plan: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SettingsError(f"run config plan: {path} is not JSON: {e}") from None
    cfg = doc.get("run_config") if isinstance(doc, dict) else None
    if not isinstance(cfg, dict) or not cfg:
        raise SettingsError(f"run config plan: {path} has no run_config (use fedfsd privacy plan)")
    if unknown := sorted(set(cfg) - set(PLAN_KEYS)):
        raise SettingsError(f"run config plan: {path} sets unknown key(s) {unknown}")
    return dict(cfg)


def parse_settings(run_config: Mapping[str, Any]) -> RunSettings:
    """Validate a Flower run config; SettingsError names the first bad key.

    With `plan` set, the plan file's schedule replaces those keys of the run config.
    """
    run_config = dict(run_config)
    if run_config.get("plan"):
        if not Path(str(run_config["plan"])).is_absolute():
            raise SettingsError(
                f"run config plan: must be an absolute path, got {run_config['plan']!r}"
            )
        run_config.update(read_plan(str(run_config["plan"])))
    try:
        return RunSettings.model_validate(run_config)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<run config>"
        raise SettingsError(f"run config {key}: {err['msg']}") from None
