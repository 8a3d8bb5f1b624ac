from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class UpdateManifest(_message.Message):
    __slots__ = ("schema", "region", "run_id", "round", "update_norm", "update_norm_bound", "sha256", "epsilon", "epsilon_rdp", "epsilon_budget", "delta", "steps", "refused_reason", "code_version", "noise_multiplier", "sample_rate", "frames_per_vehicle", "clip_norm", "fleet_id", "ledger_id", "ledger_seq", "ledger_head", "public_key", "signature", "trust_model", "epsilon_distributed", "epsilon_own_noise", "masked_sha256")
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_BOUND_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    EPSILON_RDP_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_REASON_FIELD_NUMBER: _ClassVar[int]
    CODE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PER_VEHICLE_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    FLEET_ID_FIELD_NUMBER: _ClassVar[int]
    LEDGER_ID_FIELD_NUMBER: _ClassVar[int]
    LEDGER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LEDGER_HEAD_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    TRUST_MODEL_FIELD_NUMBER: _ClassVar[int]
    EPSILON_DISTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    EPSILON_OWN_NOISE_FIELD_NUMBER: _ClassVar[int]
    MASKED_SHA256_FIELD_NUMBER: _ClassVar[int]
    schema: int
    region: str
    run_id: str
    round: int
    update_norm: float
    update_norm_bound: float
    sha256: str
    epsilon: float
    epsilon_rdp: float
    epsilon_budget: float
    delta: float
    steps: int
    refused_reason: str
    code_version: str
    noise_multiplier: float
    sample_rate: float
    frames_per_vehicle: int
    clip_norm: float
    fleet_id: str
    ledger_id: str
    ledger_seq: int
    ledger_head: str
    public_key: str
    signature: str
    trust_model: str
    epsilon_distributed: float
    epsilon_own_noise: float
    masked_sha256: str
    def __init__(self, schema: _Optional[int] = ..., region: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., update_norm: _Optional[float] = ..., update_norm_bound: _Optional[float] = ..., sha256: _Optional[str] = ..., epsilon: _Optional[float] = ..., epsilon_rdp: _Optional[float] = ..., epsilon_budget: _Optional[float] = ..., delta: _Optional[float] = ..., steps: _Optional[int] = ..., refused_reason: _Optional[str] = ..., code_version: _Optional[str] = ..., noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., frames_per_vehicle: _Optional[int] = ..., clip_norm: _Optional[float] = ..., fleet_id: _Optional[str] = ..., ledger_id: _Optional[str] = ..., ledger_seq: _Optional[int] = ..., ledger_head: _Optional[str] = ..., public_key: _Optional[str] = ..., signature: _Optional[str] = ..., trust_model: _Optional[str] = ..., epsilon_distributed: _Optional[float] = ..., epsilon_own_noise: _Optional[float] = ..., masked_sha256: _Optional[str] = ...) -> None: ...
