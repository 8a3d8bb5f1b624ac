"""The ledger line of one update release, typed: what the local round writes, the ledger keeps,
the ε report reads and the manifest signs.

Why a type: the same line is built in one module and read by three others by key; a misspelt
key used to show up only as a silent default (``rec.get("vehicle", 0)``). The record stays a
plain dict on disk and in memory (JSON Lines, signed as is), so this is a static contract;
tests/test_release_record.py checks that a real release line has exactly these keys.
"""

from typing import Literal, NotRequired, TypedDict


class ReleaseRecord(TypedDict):
    """One ``"kind": "release"`` line of a region's ledger (docs/contracts.md, "Ledger records")."""

    kind: Literal["release"]
    schema: int
    region: str
    fleet_id: str
    run_id: str
    round: int
    time: str  # ISO 8601, UTC, seconds
    model: str
    lr: float
    noise_multiplier: float  # 0.0 for a non-private release
    min_noise_multiplier: float  # the policy's floor in force
    clip_norm: float
    sample_rate: float  # q = expected vehicles per step / vehicles
    vehicles: int  # the denominator of q (public fleet size when declared)
    public_fleet_size: bool
    expected_vehicles_per_step: int
    frames_per_vehicle: int
    steps: int
    sampling: str
    normalisation: str
    delta: float
    epsilon_prv: float | None  # None for a non-private release (ε = ∞)
    epsilon_rdp: float | None
    epsilon_budget: float
    accountant_history: list[list[float]]  # cumulative (σ, q, steps) after this release
    update_norm: float
    update_sha256: str  # digest of the clipped update (what the manifest carries)
    received_sha256: str  # digest of the global model the round started from
    private: bool
    code_version: str
    rng: str
    method: str
    train_loss: float | None  # stays in the region unless released as a metric
    train_seconds: float
    initial_model_sha256: NotRequired[str]  # only when the run started from a file
    # Only on a distributed release (trust_model "distributed", issue 15; one DP-FedSGD step per
    # round: steps = 1, accountant_history unchanged, the spend is in distributed_history);
    # epsilon_prv and epsilon_rdp then both hold the enforced ε (RDP: PRV cannot account Skellam).
    # A local line on a ledger that already holds distributed releases also carries the ε pair,
    # enforce_on and the unchanged distributed_history (fedfsd.privacy.accounting_mixed).
    trust_model: NotRequired[Literal["distributed"]]
    min_honest_regions: NotRequired[int]  # t
    quantisation_scale: NotRequired[float]  # s
    dimension: NotRequired[int]  # d, coordinates of the update
    noise_share_variance: NotRequired[float]  # μ_share = (σ s C)² / t, per coordinate
    epsilon_distributed: NotRequired[float]  # if ≥ t regions are honest and secure agg. holds
    epsilon_own_noise: NotRequired[float]  # if every other region cheated
    enforce_on: NotRequired[Literal["distributed", "own_noise"]]
    distributed_history: NotRequired[list[list[float]]]  # cumulative [q, μ_share, t, s, C, d, n]
    prev: NotRequired[str]  # the hash chain and signature, added by Ledger.append
    sig: NotRequired[str]


RELEASE_KEYS = frozenset(ReleaseRecord.__annotations__)
REQUIRED_RELEASE_KEYS = frozenset(ReleaseRecord.__required_keys__)
