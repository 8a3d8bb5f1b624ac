"""One source for every run-config key: its name, its default and its help text.

Why: the seven train-request fields and the aggregator's run config used to be written out in
half a dozen places (settings, CLIs, the ClientApp, the demo, experiments, two pyproject tables)
and had drifted (node-wait was 60, 120 and "same as round-timeout"). Everything now derives
from the two models below; tests/test_apps_components.py checks that both
`[tool.flwr.app.config]` tables carry exactly :class:`RunConfig`'s keys and defaults.

pydantic only: the aggregator side imports this module, so it must stay free of data and DP code.

The default schedule is `fedfsd privacy plan` for a nominal fleet of 1,000 vehicles per region,
ε = 8, δ = 1e-5, 10 rounds: 256 expected vehicles per step, 7 local steps per round (70 in
all), σ = 1.5247 (weight noise (σ/m)·√T = 0.050, the planner's default budget), lr 0.2. The
previous default
(16 vehicles per step, lr 0.05, σ 1.0) is the regime the DP schedule sweep found worst.
tests/test_planner.py checks these numbers against the planner.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NOMINAL_PLAN = {"vehicles": 1000, "epsilon": 8.0, "delta": 1e-5, "rounds": 10}

# Feature/label widths of the object-list task: the aggregator builds the model's shapes without
# touching the region side's schema module, so the two numbers are repeated here and
# tests/test_apps_components.py checks they equal the region side's feature and label counts.
DEFAULT_N_FEATURES = 45
DEFAULT_N_LABELS = 7


class TrainSchedule(BaseModel):
    """The seven keys of a train request: what the aggregator asks each region to do.

    A region's policy can only tighten them (fedfsd.config.RegionPolicy.effective).
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    local_steps: int = Field(
        7,
        ge=1,
        alias="local-steps",
        description="Local DP steps asked per round (a policy's max_local_steps caps it).",
    )
    lr: float = Field(0.2, gt=0, description="Learning rate of the regions' local DP-SGD.")
    noise_multiplier: float = Field(
        1.5247,
        ge=0,
        alias="noise-multiplier",
        description="σ asked (a policy's min_noise_multiplier wins if higher).",
    )
    clip_norm: float = Field(
        1.0,
        gt=0,
        alias="clip-norm",
        description="C asked (a policy's max_clip_norm wins if lower).",
    )
    vehicles_per_step: int = Field(
        256,
        ge=1,
        alias="vehicles-per-step",
        description="Expected vehicles per DP step (q = this / the region's vehicles).",
    )
    frames_per_vehicle: int = Field(
        8,
        ge=1,
        alias="frames-per-vehicle",
        description="K: frames of one vehicle per step.",
    )
    model: str = Field("mlp", description="Model: mlp | bev_cnn.")

    def train_request(self) -> dict[str, Any]:
        """What each region is asked to do (ConfigRecord "config"; the policy may tighten it)."""
        return {key: getattr(self, name) for name, key in TRAIN_FIELDS.items()}


class RunConfig(TrainSchedule):
    """Every key of `[tool.flwr.app.config]`, with the aggregator's defaults."""

    num_server_rounds: int = Field(
        int(NOMINAL_PLAN["rounds"]),
        ge=1,
        alias="num-server-rounds",
        description="Federated rounds.",
    )
    n_features: int = Field(DEFAULT_N_FEATURES, ge=1, alias="n-features")
    n_labels: int = Field(DEFAULT_N_LABELS, ge=1, alias="n-labels")
    bev_channels: int = Field(3, ge=1, alias="bev-channels")
    model_seed: int = Field(0, alias="model-seed")
    min_regions: int = Field(
        2,
        ge=1,
        alias="min-regions",
        description="Quorum: accepted updates per round.",
    )
    round_timeout: float = Field(
        120.0,
        gt=0,
        alias="round-timeout",
        description="Seconds to wait for replies.",
    )
    # One value everywhere: 120 s, the round-timeout default. It is what every `flwr run` of the
    # packaged app already used (both tables said 120); the CLI's 60 s was the outlier. A run
    # config built in Python that omits it still waits round-timeout (RunSettings.node_wait_s).
    node_wait: float = Field(
        120.0,
        gt=0,
        alias="node-wait",
        description="Seconds to wait for regions to connect.",
    )
    evaluate_timeout: float = Field(
        120.0,
        gt=0,
        alias="evaluate-timeout",
        description="Seconds to wait for evaluate replies.",
    )
    # Each evaluation is a second message exchange with a full copy of the model, so k > 1
    # trades monitoring detail for round time and downlink bytes (experiments/federation_cost.py).
    evaluate_every: int = Field(
        1,
        ge=1,
        alias="evaluate-every",
        description="Score the global model on the regions' test episodes after every k-th "
        "round (always after the last); each evaluation is an extra exchange with a model copy.",
    )
    run_dir: str = Field("", alias="run-dir", description="Checkpoints and metrics (absolute).")
    run_id: str = Field("", alias="run-id")
    resume: bool = Field(False, description="Continue run-dir's last checkpoint.")
    # Absolute path of a `fedfsd privacy plan --json` file: its schedule (PLAN_KEYS) replaces
    # those keys of the run config ("" = none). Flower's run config always holds every declared
    # key, so the plan wins here; `fedfsd aggregator run --plan` lets explicit flags win instead.
    plan: str = ""
    # Server optimiser over the averaged update Δ: "fedavg" (w += server-lr·Δ; with
    # server-momentum > 0 it is FedAvgM), "fedavgm" (needs server-momentum > 0), "fedadam"
    # (Reddi et al. 2021: server-lr, server-beta1, server-beta2, server-tau).
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam"] = Field(
        "fedavg",
        alias="server-optimizer",
        description="fedavg | fedavgm (needs --server-momentum) | fedadam.",
    )
    server_momentum: float = Field(
        0.0,
        ge=0,
        lt=1,
        alias="server-momentum",
        description="0 = plain FedAvg.",
    )
    server_lr: float = Field(
        1.0,
        gt=0,
        alias="server-lr",
        description="Server learning rate η (FedAdam: try 0.01-0.1).",
    )
    server_beta1: float = Field(0.9, ge=0, lt=1, alias="server-beta1")
    server_beta2: float = Field(0.99, ge=0, lt=1, alias="server-beta2")
    server_tau: float = Field(1e-3, gt=0, alias="server-tau")
    # Absolute path of an .npz of round-0 weights (e.g. pretrained on public data); "" = build
    # the model from the registry. Names and shapes must equal the registry model's.
    initial_model: str = Field("", alias="initial-model")
    update_norm_bound: float = Field(
        5.0,
        gt=0,
        alias="update-norm-bound",
        description="Aggregator's L2 bound check.",
    )
    plot_metric: str = Field("loss", alias="plot-metric")
    # Absolute path of a JSON/TOML mapping region -> Ed25519 public key (PEM, 64 hex, or a PEM
    # file path relative to the mapping): manifests must carry that key's signature
    # (fedfsd.aggregator.receipts). Empty: each region's first key is pinned for the run.
    region_keys: str = Field("", alias="region-keys")
    # Development only: accept manifests without a signature when no region-keys are set.
    allow_unsigned: bool = Field(False, alias="allow-unsigned")
    # Secure aggregation with distributed noise (issue 15): each round is one DP-FedSGD step
    # whose noisy sum the aggregator alone unmasks (fedfsd.aggregator.secure_round); needs
    # region-keys and regions whose policies say trust_model = "distributed".
    secure_aggregation: bool = Field(
        False,
        alias="secure-aggregation",
        description="Run each round as a secure-aggregation round (distributed trust).",
    )
    # Shamir threshold t of a secure round; 0 = the smallest allowed (t > n/2, t >= 2).
    secagg_threshold: int = Field(0, ge=0, alias="secagg-threshold")


# `fedfsd region train-local`: one trial round of one region outside any federation, often on a
# small or synthetic fleet (tens of vehicles), where 128 vehicles per step would ask q > 1. Its
# defaults have always been these; every other key is TrainSchedule's.
LOCAL_TRIAL = TrainSchedule(lr=0.05, noise_multiplier=1.0, vehicles_per_step=16)

# field name -> run-config key of the train request, in the order the wire has always used.
TRAIN_FIELDS: dict[str, str] = {
    name: f.alias or name for name, f in TrainSchedule.model_fields.items()
}
TRAIN_KEYS: tuple[str, ...] = tuple(TRAIN_FIELDS.values())
# Run-config keys a plan file sets (`run_config` in `fedfsd privacy plan --json`).
PLAN_KEYS: tuple[str, ...] = (
    "num-server-rounds",
    "local-steps",
    "vehicles-per-step",
    "noise-multiplier",
    "lr",
    "clip-norm",
    "frames-per-vehicle",
)

_FIELDS = {f.alias or name: f for name, f in RunConfig.model_fields.items()}


def default(key: str) -> Any:
    """The default of run-config `key` (hyphenated, e.g. "local-steps")."""
    return _FIELDS[key].default


def help_text(key: str) -> str:
    """The help text of run-config `key` (what the CLIs print for its flag)."""
    return _FIELDS[key].description or key


def run_config_defaults() -> dict[str, Any]:
    """Every key of `[tool.flwr.app.config]` with its default (what both tables must hold)."""
    return RunConfig().model_dump(by_alias=True)
