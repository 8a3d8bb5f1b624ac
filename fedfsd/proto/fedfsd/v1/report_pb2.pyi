from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AccountantStep(_message.Message):
    __slots__ = ("noise_multiplier", "sample_rate", "steps")
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    noise_multiplier: float
    sample_rate: float
    steps: int
    def __init__(self, noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ...) -> None: ...

class UnitOfPrivacy(_message.Message):
    __slots__ = ("unit", "adjacency", "max_frames_per_vehicle_per_step", "clip_norm", "contribution_bound")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    ADJACENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_PER_VEHICLE_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_BOUND_FIELD_NUMBER: _ClassVar[int]
    unit: str
    adjacency: str
    max_frames_per_vehicle_per_step: int
    clip_norm: float
    contribution_bound: str
    def __init__(self, unit: _Optional[str] = ..., adjacency: _Optional[str] = ..., max_frames_per_vehicle_per_step: _Optional[int] = ..., clip_norm: _Optional[float] = ..., contribution_bound: _Optional[str] = ...) -> None: ...

class Party(_message.Message):
    __slots__ = ("name", "trusted", "sees")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_FIELD_NUMBER: _ClassVar[int]
    SEES_FIELD_NUMBER: _ClassVar[int]
    name: str
    trusted: bool
    sees: str
    def __init__(self, name: _Optional[str] = ..., trusted: _Optional[bool] = ..., sees: _Optional[str] = ...) -> None: ...

class TrustModel(_message.Message):
    __slots__ = ("setting", "parties")
    SETTING_FIELD_NUMBER: _ClassVar[int]
    PARTIES_FIELD_NUMBER: _ClassVar[int]
    setting: str
    parties: _containers.RepeatedCompositeFieldContainer[Party]
    def __init__(self, setting: _Optional[str] = ..., parties: _Optional[_Iterable[_Union[Party, _Mapping]]] = ...) -> None: ...

class Scope(_message.Message):
    __slots__ = ("covered", "not_covered")
    COVERED_FIELD_NUMBER: _ClassVar[int]
    NOT_COVERED_FIELD_NUMBER: _ClassVar[int]
    covered: _containers.RepeatedScalarFieldContainer[str]
    not_covered: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, covered: _Optional[_Iterable[str]] = ..., not_covered: _Optional[_Iterable[str]] = ...) -> None: ...

class Mechanism(_message.Message):
    __slots__ = ("name", "sampling", "amplification_by_sampling", "vehicles", "expected_vehicles_per_step", "sample_rate", "noise_multiplier", "clip_norm", "frames_per_vehicle", "steps_per_round", "rounds", "total_steps", "normalisation", "rng", "parameters_constant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    AMPLIFICATION_BY_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    VEHICLES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VEHICLES_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PER_VEHICLE_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    NORMALISATION_FIELD_NUMBER: _ClassVar[int]
    RNG_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_CONSTANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    sampling: str
    amplification_by_sampling: bool
    vehicles: int
    expected_vehicles_per_step: int
    sample_rate: float
    noise_multiplier: float
    clip_norm: float
    frames_per_vehicle: int
    steps_per_round: int
    rounds: int
    total_steps: int
    normalisation: str
    rng: str
    parameters_constant: bool
    def __init__(self, name: _Optional[str] = ..., sampling: _Optional[str] = ..., amplification_by_sampling: _Optional[bool] = ..., vehicles: _Optional[int] = ..., expected_vehicles_per_step: _Optional[int] = ..., sample_rate: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., clip_norm: _Optional[float] = ..., frames_per_vehicle: _Optional[int] = ..., steps_per_round: _Optional[int] = ..., rounds: _Optional[int] = ..., total_steps: _Optional[int] = ..., normalisation: _Optional[str] = ..., rng: _Optional[str] = ..., parameters_constant: _Optional[bool] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("run_id", "round", "time", "model", "lr", "noise_multiplier", "clip_norm", "sample_rate", "vehicles", "expected_vehicles_per_step", "frames_per_vehicle", "steps", "sampling", "epsilon_prv", "epsilon_rdp", "update_norm", "update_sha256", "cumulative_steps", "distributed", "epsilon_distributed", "epsilon_own_noise")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    VEHICLES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VEHICLES_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PER_VEHICLE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    EPSILON_PRV_FIELD_NUMBER: _ClassVar[int]
    EPSILON_RDP_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    EPSILON_DISTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    EPSILON_OWN_NOISE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    time: str
    model: str
    lr: float
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    vehicles: int
    expected_vehicles_per_step: int
    frames_per_vehicle: int
    steps: int
    sampling: str
    epsilon_prv: float
    epsilon_rdp: float
    update_norm: float
    update_sha256: str
    cumulative_steps: int
    distributed: bool
    epsilon_distributed: float
    epsilon_own_noise: float
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., time: _Optional[str] = ..., model: _Optional[str] = ..., lr: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., clip_norm: _Optional[float] = ..., sample_rate: _Optional[float] = ..., vehicles: _Optional[int] = ..., expected_vehicles_per_step: _Optional[int] = ..., frames_per_vehicle: _Optional[int] = ..., steps: _Optional[int] = ..., sampling: _Optional[str] = ..., epsilon_prv: _Optional[float] = ..., epsilon_rdp: _Optional[float] = ..., update_norm: _Optional[float] = ..., update_sha256: _Optional[str] = ..., cumulative_steps: _Optional[int] = ..., distributed: _Optional[bool] = ..., epsilon_distributed: _Optional[float] = ..., epsilon_own_noise: _Optional[float] = ...) -> None: ...

class Accounting(_message.Message):
    __slots__ = ("headline_accountant", "cross_check_accountant", "history", "delta", "delta_rule", "epsilon", "epsilon_rdp", "implementation", "epsilon_no_amplification", "no_amplification_method", "no_amplification_history")
    HEADLINE_ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    CROSS_CHECK_ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DELTA_RULE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    EPSILON_RDP_FIELD_NUMBER: _ClassVar[int]
    IMPLEMENTATION_FIELD_NUMBER: _ClassVar[int]
    EPSILON_NO_AMPLIFICATION_FIELD_NUMBER: _ClassVar[int]
    NO_AMPLIFICATION_METHOD_FIELD_NUMBER: _ClassVar[int]
    NO_AMPLIFICATION_HISTORY_FIELD_NUMBER: _ClassVar[int]
    headline_accountant: str
    cross_check_accountant: str
    history: _containers.RepeatedCompositeFieldContainer[AccountantStep]
    delta: float
    delta_rule: str
    epsilon: float
    epsilon_rdp: float
    implementation: str
    epsilon_no_amplification: float
    no_amplification_method: str
    no_amplification_history: _containers.RepeatedCompositeFieldContainer[AccountantStep]
    def __init__(self, headline_accountant: _Optional[str] = ..., cross_check_accountant: _Optional[str] = ..., history: _Optional[_Iterable[_Union[AccountantStep, _Mapping]]] = ..., delta: _Optional[float] = ..., delta_rule: _Optional[str] = ..., epsilon: _Optional[float] = ..., epsilon_rdp: _Optional[float] = ..., implementation: _Optional[str] = ..., epsilon_no_amplification: _Optional[float] = ..., no_amplification_method: _Optional[str] = ..., no_amplification_history: _Optional[_Iterable[_Union[AccountantStep, _Mapping]]] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("epsilon_budget", "epsilon_spent", "epsilon_remaining", "fraction_used")
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_REMAINING_FIELD_NUMBER: _ClassVar[int]
    FRACTION_USED_FIELD_NUMBER: _ClassVar[int]
    epsilon_budget: float
    epsilon_spent: float
    epsilon_remaining: float
    fraction_used: float
    def __init__(self, epsilon_budget: _Optional[float] = ..., epsilon_spent: _Optional[float] = ..., epsilon_remaining: _Optional[float] = ..., fraction_used: _Optional[float] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("code_version", "report_code_version", "run_id", "run_ids", "fleet_id", "region", "ledger_path", "ledger_sha256", "generated")
    CODE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORT_CODE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    FLEET_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    LEDGER_PATH_FIELD_NUMBER: _ClassVar[int]
    LEDGER_SHA256_FIELD_NUMBER: _ClassVar[int]
    GENERATED_FIELD_NUMBER: _ClassVar[int]
    code_version: str
    report_code_version: str
    run_id: str
    run_ids: _containers.RepeatedScalarFieldContainer[str]
    fleet_id: str
    region: str
    ledger_path: str
    ledger_sha256: str
    generated: str
    def __init__(self, code_version: _Optional[str] = ..., report_code_version: _Optional[str] = ..., run_id: _Optional[str] = ..., run_ids: _Optional[_Iterable[str]] = ..., fleet_id: _Optional[str] = ..., region: _Optional[str] = ..., ledger_path: _Optional[str] = ..., ledger_sha256: _Optional[str] = ..., generated: _Optional[str] = ...) -> None: ...

class EpsilonReport(_message.Message):
    __slots__ = ("schema", "region", "fleet_id", "private_training", "unit", "trust", "scope", "mechanism", "accounting", "budget", "releases", "provenance", "statement", "notes", "distributed")
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    FLEET_ID_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_TRAINING_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    TRUST_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTING_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    schema: int
    region: str
    fleet_id: str
    private_training: bool
    unit: UnitOfPrivacy
    trust: TrustModel
    scope: Scope
    mechanism: Mechanism
    accounting: Accounting
    budget: Budget
    releases: _containers.RepeatedCompositeFieldContainer[Release]
    provenance: Provenance
    statement: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    distributed: DistributedNoise
    def __init__(self, schema: _Optional[int] = ..., region: _Optional[str] = ..., fleet_id: _Optional[str] = ..., private_training: _Optional[bool] = ..., unit: _Optional[_Union[UnitOfPrivacy, _Mapping]] = ..., trust: _Optional[_Union[TrustModel, _Mapping]] = ..., scope: _Optional[_Union[Scope, _Mapping]] = ..., mechanism: _Optional[_Union[Mechanism, _Mapping]] = ..., accounting: _Optional[_Union[Accounting, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., releases: _Optional[_Iterable[_Union[Release, _Mapping]]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., statement: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ..., distributed: _Optional[_Union[DistributedNoise, _Mapping]] = ...) -> None: ...

class SkellamStep(_message.Message):
    __slots__ = ("sample_rate", "share_variance", "min_honest_regions", "scale", "clip_norm", "dimension", "rounds")
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    SHARE_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    MIN_HONEST_REGIONS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    sample_rate: float
    share_variance: float
    min_honest_regions: int
    scale: float
    clip_norm: float
    dimension: int
    rounds: int
    def __init__(self, sample_rate: _Optional[float] = ..., share_variance: _Optional[float] = ..., min_honest_regions: _Optional[int] = ..., scale: _Optional[float] = ..., clip_norm: _Optional[float] = ..., dimension: _Optional[int] = ..., rounds: _Optional[int] = ...) -> None: ...

class DistributedNoise(_message.Message):
    __slots__ = ("history", "enforce_on", "epsilon_distributed", "assumption_distributed", "epsilon_own_noise", "assumption_own_noise", "method")
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    ENFORCE_ON_FIELD_NUMBER: _ClassVar[int]
    EPSILON_DISTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    ASSUMPTION_DISTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    EPSILON_OWN_NOISE_FIELD_NUMBER: _ClassVar[int]
    ASSUMPTION_OWN_NOISE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    history: _containers.RepeatedCompositeFieldContainer[SkellamStep]
    enforce_on: str
    epsilon_distributed: float
    assumption_distributed: str
    epsilon_own_noise: float
    assumption_own_noise: str
    method: str
    def __init__(self, history: _Optional[_Iterable[_Union[SkellamStep, _Mapping]]] = ..., enforce_on: _Optional[str] = ..., epsilon_distributed: _Optional[float] = ..., assumption_distributed: _Optional[str] = ..., epsilon_own_noise: _Optional[float] = ..., assumption_own_noise: _Optional[str] = ..., method: _Optional[str] = ...) -> None: ...

class RegionEpsilon(_message.Message):
    __slots__ = ("region", "fleet_id", "vehicles", "epsilon", "epsilon_rdp", "delta", "epsilon_budget", "run_ids", "releases", "history", "private_training", "distributed")
    REGION_FIELD_NUMBER: _ClassVar[int]
    FLEET_ID_FIELD_NUMBER: _ClassVar[int]
    VEHICLES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    EPSILON_RDP_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_TRAINING_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    region: str
    fleet_id: str
    vehicles: int
    epsilon: float
    epsilon_rdp: float
    delta: float
    epsilon_budget: float
    run_ids: _containers.RepeatedScalarFieldContainer[str]
    releases: int
    history: _containers.RepeatedCompositeFieldContainer[AccountantStep]
    private_training: bool
    distributed: DistributedNoise
    def __init__(self, region: _Optional[str] = ..., fleet_id: _Optional[str] = ..., vehicles: _Optional[int] = ..., epsilon: _Optional[float] = ..., epsilon_rdp: _Optional[float] = ..., delta: _Optional[float] = ..., epsilon_budget: _Optional[float] = ..., run_ids: _Optional[_Iterable[str]] = ..., releases: _Optional[int] = ..., history: _Optional[_Iterable[_Union[AccountantStep, _Mapping]]] = ..., private_training: _Optional[bool] = ..., distributed: _Optional[_Union[DistributedNoise, _Mapping]] = ...) -> None: ...

class OverlapGroup(_message.Message):
    __slots__ = ("regions", "vehicles", "composed_history", "delta", "epsilon", "epsilon_rdp")
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    VEHICLES_FIELD_NUMBER: _ClassVar[int]
    COMPOSED_HISTORY_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    EPSILON_RDP_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedScalarFieldContainer[str]
    vehicles: int
    composed_history: _containers.RepeatedCompositeFieldContainer[AccountantStep]
    delta: float
    epsilon: float
    epsilon_rdp: float
    def __init__(self, regions: _Optional[_Iterable[str]] = ..., vehicles: _Optional[int] = ..., composed_history: _Optional[_Iterable[_Union[AccountantStep, _Mapping]]] = ..., delta: _Optional[float] = ..., epsilon: _Optional[float] = ..., epsilon_rdp: _Optional[float] = ...) -> None: ...

class GlobalSummary(_message.Message):
    __slots__ = ("schema", "regions", "composition_rule", "overlap_checked", "overlap_method", "overlaps", "worst_case_epsilon", "worst_case_delta", "statement", "report_code_version", "generated")
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    COMPOSITION_RULE_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_CHECKED_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_METHOD_FIELD_NUMBER: _ClassVar[int]
    OVERLAPS_FIELD_NUMBER: _ClassVar[int]
    WORST_CASE_EPSILON_FIELD_NUMBER: _ClassVar[int]
    WORST_CASE_DELTA_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    REPORT_CODE_VERSION_FIELD_NUMBER: _ClassVar[int]
    GENERATED_FIELD_NUMBER: _ClassVar[int]
    schema: int
    regions: _containers.RepeatedCompositeFieldContainer[RegionEpsilon]
    composition_rule: str
    overlap_checked: bool
    overlap_method: str
    overlaps: _containers.RepeatedCompositeFieldContainer[OverlapGroup]
    worst_case_epsilon: float
    worst_case_delta: float
    statement: str
    report_code_version: str
    generated: str
    def __init__(self, schema: _Optional[int] = ..., regions: _Optional[_Iterable[_Union[RegionEpsilon, _Mapping]]] = ..., composition_rule: _Optional[str] = ..., overlap_checked: _Optional[bool] = ..., overlap_method: _Optional[str] = ..., overlaps: _Optional[_Iterable[_Union[OverlapGroup, _Mapping]]] = ..., worst_case_epsilon: _Optional[float] = ..., worst_case_delta: _Optional[float] = ..., statement: _Optional[str] = ..., report_code_version: _Optional[str] = ..., generated: _Optional[str] = ...) -> None: ...
