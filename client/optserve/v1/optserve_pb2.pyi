from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoundClose(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_CLOSE_UNSPECIFIED: _ClassVar[RoundClose]
    ROUND_CLOSE_QUORUM: _ClassVar[RoundClose]
    ROUND_CLOSE_TIMEOUT: _ClassVar[RoundClose]
    ROUND_CLOSE_MEMBERSHIP: _ClassVar[RoundClose]
ROUND_CLOSE_UNSPECIFIED: RoundClose
ROUND_CLOSE_QUORUM: RoundClose
ROUND_CLOSE_TIMEOUT: RoundClose
ROUND_CLOSE_MEMBERSHIP: RoundClose

class LeafSpec(_message.Message):
    __slots__ = ("path", "dtype", "shape")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    path: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, path: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class SharedMemorySpan(_message.Message):
    __slots__ = ("session", "region", "offset", "length")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    session: str
    region: int
    offset: int
    length: int
    def __init__(self, session: _Optional[str] = ..., region: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class TensorSlice(_message.Message):
    __slots__ = ("path", "dtype", "shape", "offset", "length")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    path: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    length: int
    def __init__(self, path: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class ModelSettings(_message.Message):
    __slots__ = ("mode", "workers", "quorum", "max_staleness", "sync_timeout_seconds", "staleness_scaling", "ema_decay", "ema_debias", "reject_nonfinite_updates", "heartbeat_seconds", "quorum_fraction")
    MODE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    SYNC_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_SCALING_FIELD_NUMBER: _ClassVar[int]
    EMA_DECAY_FIELD_NUMBER: _ClassVar[int]
    EMA_DEBIAS_FIELD_NUMBER: _ClassVar[int]
    REJECT_NONFINITE_UPDATES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FRACTION_FIELD_NUMBER: _ClassVar[int]
    mode: str
    workers: int
    quorum: int
    max_staleness: int
    sync_timeout_seconds: float
    staleness_scaling: str
    ema_decay: float
    ema_debias: bool
    reject_nonfinite_updates: bool
    heartbeat_seconds: float
    quorum_fraction: float
    def __init__(self, mode: _Optional[str] = ..., workers: _Optional[int] = ..., quorum: _Optional[int] = ..., max_staleness: _Optional[int] = ..., sync_timeout_seconds: _Optional[float] = ..., staleness_scaling: _Optional[str] = ..., ema_decay: _Optional[float] = ..., ema_debias: _Optional[bool] = ..., reject_nonfinite_updates: _Optional[bool] = ..., heartbeat_seconds: _Optional[float] = ..., quorum_fraction: _Optional[float] = ...) -> None: ...

class Hyperparam(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class WorkerState(_message.Message):
    __slots__ = ("worker_id", "last_seq", "last_base_step", "session", "live", "joined_epoch", "lease_seconds_left")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_BASE_STEP_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    JOINED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    last_seq: int
    last_base_step: int
    session: int
    live: bool
    joined_epoch: int
    lease_seconds_left: float
    def __init__(self, worker_id: _Optional[str] = ..., last_seq: _Optional[int] = ..., last_base_step: _Optional[int] = ..., session: _Optional[int] = ..., live: _Optional[bool] = ..., joined_epoch: _Optional[int] = ..., lease_seconds_left: _Optional[float] = ...) -> None: ...

class SyncRound(_message.Message):
    __slots__ = ("step", "contributors", "anonymous", "expected", "opened_epoch", "epoch", "closed_by")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    ANONYMOUS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    OPENED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CLOSED_BY_FIELD_NUMBER: _ClassVar[int]
    step: int
    contributors: _containers.RepeatedCompositeFieldContainer[RoundContributor]
    anonymous: int
    expected: int
    opened_epoch: int
    epoch: int
    closed_by: RoundClose
    def __init__(self, step: _Optional[int] = ..., contributors: _Optional[_Iterable[_Union[RoundContributor, _Mapping]]] = ..., anonymous: _Optional[int] = ..., expected: _Optional[int] = ..., opened_epoch: _Optional[int] = ..., epoch: _Optional[int] = ..., closed_by: _Optional[_Union[RoundClose, str]] = ...) -> None: ...

class ModelCounters(_message.Message):
    __slots__ = ("pushes_applied", "stale_rejected", "duplicates", "sync_timeouts", "pulls", "bytes_in", "bytes_out", "nonfinite_rejected")
    PUSHES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    STALE_REJECTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    SYNC_TIMEOUTS_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_REJECTED_FIELD_NUMBER: _ClassVar[int]
    pushes_applied: int
    stale_rejected: int
    duplicates: int
    sync_timeouts: int
    pulls: int
    bytes_in: int
    bytes_out: int
    nonfinite_rejected: int
    def __init__(self, pushes_applied: _Optional[int] = ..., stale_rejected: _Optional[int] = ..., duplicates: _Optional[int] = ..., sync_timeouts: _Optional[int] = ..., pulls: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., nonfinite_rejected: _Optional[int] = ...) -> None: ...

class PackedTensor(_message.Message):
    __slots__ = ("name", "dtype", "leaves", "elements")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LEAVES_FIELD_NUMBER: _ClassVar[int]
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    leaves: _containers.RepeatedScalarFieldContainer[str]
    elements: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., leaves: _Optional[_Iterable[str]] = ..., elements: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "step", "schema", "optimizer_json", "settings", "hyperparams", "workers", "pending_contributions", "counters", "param_bytes", "state_bytes", "last_checkpoint_step", "last_checkpoint_error", "incarnation", "packing", "layout_id", "placement", "device_bytes", "shard", "membership_epoch", "live_workers", "recent_rounds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PENDING_CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_ERROR_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    RECENT_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    step: int
    schema: _containers.RepeatedCompositeFieldContainer[LeafSpec]
    optimizer_json: str
    settings: ModelSettings
    hyperparams: _containers.RepeatedCompositeFieldContainer[Hyperparam]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerState]
    pending_contributions: int
    counters: ModelCounters
    param_bytes: int
    state_bytes: int
    last_checkpoint_step: int
    last_checkpoint_error: str
    incarnation: str
    packing: _containers.RepeatedCompositeFieldContainer[PackedTensor]
    layout_id: str
    placement: _containers.RepeatedCompositeFieldContainer[BufferPlacement]
    device_bytes: _containers.RepeatedScalarFieldContainer[int]
    shard: ShardOf
    membership_epoch: int
    live_workers: int
    recent_rounds: _containers.RepeatedCompositeFieldContainer[SyncRound]
    def __init__(self, name: _Optional[str] = ..., step: _Optional[int] = ..., schema: _Optional[_Iterable[_Union[LeafSpec, _Mapping]]] = ..., optimizer_json: _Optional[str] = ..., settings: _Optional[_Union[ModelSettings, _Mapping]] = ..., hyperparams: _Optional[_Iterable[_Union[Hyperparam, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerState, _Mapping]]] = ..., pending_contributions: _Optional[int] = ..., counters: _Optional[_Union[ModelCounters, _Mapping]] = ..., param_bytes: _Optional[int] = ..., state_bytes: _Optional[int] = ..., last_checkpoint_step: _Optional[int] = ..., last_checkpoint_error: _Optional[str] = ..., incarnation: _Optional[str] = ..., packing: _Optional[_Iterable[_Union[PackedTensor, _Mapping]]] = ..., layout_id: _Optional[str] = ..., placement: _Optional[_Iterable[_Union[BufferPlacement, _Mapping]]] = ..., device_bytes: _Optional[_Iterable[int]] = ..., shard: _Optional[_Union[ShardOf, _Mapping]] = ..., membership_epoch: _Optional[int] = ..., live_workers: _Optional[int] = ..., recent_rounds: _Optional[_Iterable[_Union[SyncRound, _Mapping]]] = ...) -> None: ...

class ShardMap(_message.Message):
    __slots__ = ("model_id", "version", "targets", "split_bytes", "leaves", "global_norm")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEAVES_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_NORM_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    targets: _containers.RepeatedScalarFieldContainer[str]
    split_bytes: int
    leaves: _containers.RepeatedCompositeFieldContainer[ShardedLeaf]
    global_norm: bool
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ..., targets: _Optional[_Iterable[str]] = ..., split_bytes: _Optional[int] = ..., leaves: _Optional[_Iterable[_Union[ShardedLeaf, _Mapping]]] = ..., global_norm: _Optional[bool] = ...) -> None: ...

class ShardedLeaf(_message.Message):
    __slots__ = ("leaf", "pieces")
    LEAF_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    leaf: LeafSpec
    pieces: _containers.RepeatedCompositeFieldContainer[LeafPiece]
    def __init__(self, leaf: _Optional[_Union[LeafSpec, _Mapping]] = ..., pieces: _Optional[_Iterable[_Union[LeafPiece, _Mapping]]] = ...) -> None: ...

class LeafPiece(_message.Message):
    __slots__ = ("shard", "start", "stop")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    shard: int
    start: int
    stop: int
    def __init__(self, shard: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class ShardOf(_message.Message):
    __slots__ = ("map", "index")
    MAP_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    map: ShardMap
    index: int
    def __init__(self, map: _Optional[_Union[ShardMap, _Mapping]] = ..., index: _Optional[int] = ...) -> None: ...

class PlanShardsRequest(_message.Message):
    __slots__ = ("name", "optimizer_json", "settings", "schema", "targets", "split_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    optimizer_json: str
    settings: ModelSettings
    schema: _containers.RepeatedCompositeFieldContainer[LeafSpec]
    targets: _containers.RepeatedScalarFieldContainer[str]
    split_bytes: int
    def __init__(self, name: _Optional[str] = ..., optimizer_json: _Optional[str] = ..., settings: _Optional[_Union[ModelSettings, _Mapping]] = ..., schema: _Optional[_Iterable[_Union[LeafSpec, _Mapping]]] = ..., targets: _Optional[_Iterable[str]] = ..., split_bytes: _Optional[int] = ...) -> None: ...

class BufferPlacement(_message.Message):
    __slots__ = ("name", "sharding", "param_bytes_per_device", "state_bytes_per_device", "padding")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHARDING_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_PER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_PER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    name: str
    sharding: str
    param_bytes_per_device: int
    state_bytes_per_device: int
    padding: int
    def __init__(self, name: _Optional[str] = ..., sharding: _Optional[str] = ..., param_bytes_per_device: _Optional[int] = ..., state_bytes_per_device: _Optional[int] = ..., padding: _Optional[int] = ...) -> None: ...

class CreateModelHeader(_message.Message):
    __slots__ = ("name", "optimizer_json", "settings", "schema", "shard", "init")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    optimizer_json: str
    settings: ModelSettings
    schema: _containers.RepeatedCompositeFieldContainer[LeafSpec]
    shard: ShardOf
    init: _containers.RepeatedCompositeFieldContainer[LeafInit]
    def __init__(self, name: _Optional[str] = ..., optimizer_json: _Optional[str] = ..., settings: _Optional[_Union[ModelSettings, _Mapping]] = ..., schema: _Optional[_Iterable[_Union[LeafSpec, _Mapping]]] = ..., shard: _Optional[_Union[ShardOf, _Mapping]] = ..., init: _Optional[_Iterable[_Union[LeafInit, _Mapping]]] = ...) -> None: ...

class LeafInit(_message.Message):
    __slots__ = ("path", "initializer", "value", "mean", "stddev", "minval", "maxval", "seed")
    PATH_FIELD_NUMBER: _ClassVar[int]
    INITIALIZER_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STDDEV_FIELD_NUMBER: _ClassVar[int]
    MINVAL_FIELD_NUMBER: _ClassVar[int]
    MAXVAL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    path: str
    initializer: str
    value: float
    mean: float
    stddev: float
    minval: float
    maxval: float
    seed: int
    def __init__(self, path: _Optional[str] = ..., initializer: _Optional[str] = ..., value: _Optional[float] = ..., mean: _Optional[float] = ..., stddev: _Optional[float] = ..., minval: _Optional[float] = ..., maxval: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("header", "slices", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: CreateModelHeader
    slices: _containers.RepeatedCompositeFieldContainer[TensorSlice]
    payload: bytes
    def __init__(self, header: _Optional[_Union[CreateModelHeader, _Mapping]] = ..., slices: _Optional[_Iterable[_Union[TensorSlice, _Mapping]]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "step", "mode", "leaves", "param_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    LEAVES_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    step: int
    mode: str
    leaves: int
    param_bytes: int
    def __init__(self, name: _Optional[str] = ..., step: _Optional[int] = ..., mode: _Optional[str] = ..., leaves: _Optional[int] = ..., param_bytes: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model", "delete_checkpoints")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DELETE_CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    delete_checkpoints: bool
    def __init__(self, model: _Optional[str] = ..., delete_checkpoints: _Optional[bool] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetHyperparamsRequest(_message.Message):
    __slots__ = ("model", "values")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    model: str
    values: _containers.RepeatedCompositeFieldContainer[Hyperparam]
    def __init__(self, model: _Optional[str] = ..., values: _Optional[_Iterable[_Union[Hyperparam, _Mapping]]] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("model", "base_step", "worker_id", "seq", "weight", "pull", "layout_id", "global_norm_sq", "shared_memory", "rows", "session", "contribution")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_STEP_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_ID_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_NORM_SQ_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    base_step: int
    worker_id: str
    seq: int
    weight: float
    pull: PullRequest
    layout_id: str
    global_norm_sq: float
    shared_memory: SharedMemorySpan
    rows: _containers.RepeatedCompositeFieldContainer[RowSparseGradient]
    session: int
    contribution: int
    def __init__(self, model: _Optional[str] = ..., base_step: _Optional[int] = ..., worker_id: _Optional[str] = ..., seq: _Optional[int] = ..., weight: _Optional[float] = ..., pull: _Optional[_Union[PullRequest, _Mapping]] = ..., layout_id: _Optional[str] = ..., global_norm_sq: _Optional[float] = ..., shared_memory: _Optional[_Union[SharedMemorySpan, _Mapping]] = ..., rows: _Optional[_Iterable[_Union[RowSparseGradient, _Mapping]]] = ..., session: _Optional[int] = ..., contribution: _Optional[int] = ...) -> None: ...

class RowSparseGradient(_message.Message):
    __slots__ = ("path", "ids")
    PATH_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    path: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, path: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "slices", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    slices: _containers.RepeatedCompositeFieldContainer[TensorSlice]
    payload: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., slices: _Optional[_Iterable[_Union[TensorSlice, _Mapping]]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("model", "step", "applied", "duplicate", "incarnation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    step: int
    applied: bool
    duplicate: bool
    incarnation: str
    def __init__(self, model: _Optional[str] = ..., step: _Optional[int] = ..., applied: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., incarnation: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("model", "min_step", "timeout_seconds", "if_newer_than", "ema", "wire_dtype", "chunk_bytes", "max_message_bytes", "packed", "layout_id", "exact_step", "shared_memory", "rows", "worker_id", "session")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MIN_STEP_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IF_NEWER_THAN_FIELD_NUMBER: _ClassVar[int]
    EMA_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_ID_FIELD_NUMBER: _ClassVar[int]
    EXACT_STEP_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    min_step: int
    timeout_seconds: float
    if_newer_than: int
    ema: bool
    wire_dtype: str
    chunk_bytes: int
    max_message_bytes: int
    packed: bool
    layout_id: str
    exact_step: int
    shared_memory: SharedMemorySpan
    rows: _containers.RepeatedCompositeFieldContainer[RowSelection]
    worker_id: str
    session: int
    def __init__(self, model: _Optional[str] = ..., min_step: _Optional[int] = ..., timeout_seconds: _Optional[float] = ..., if_newer_than: _Optional[int] = ..., ema: _Optional[bool] = ..., wire_dtype: _Optional[str] = ..., chunk_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., packed: _Optional[bool] = ..., layout_id: _Optional[str] = ..., exact_step: _Optional[int] = ..., shared_memory: _Optional[_Union[SharedMemorySpan, _Mapping]] = ..., rows: _Optional[_Iterable[_Union[RowSelection, _Mapping]]] = ..., worker_id: _Optional[str] = ..., session: _Optional[int] = ...) -> None: ...

class RowSelection(_message.Message):
    __slots__ = ("path", "ids")
    PATH_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    path: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, path: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("model", "step", "not_modified", "schema", "incarnation", "packing", "layout_id", "shared_memory", "heartbeat_seconds", "membership_epoch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NOT_MODIFIED_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_ID_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_EPOCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    step: int
    not_modified: bool
    schema: _containers.RepeatedCompositeFieldContainer[LeafSpec]
    incarnation: str
    packing: _containers.RepeatedCompositeFieldContainer[PackedTensor]
    layout_id: str
    shared_memory: bool
    heartbeat_seconds: float
    membership_epoch: int
    def __init__(self, model: _Optional[str] = ..., step: _Optional[int] = ..., not_modified: _Optional[bool] = ..., schema: _Optional[_Iterable[_Union[LeafSpec, _Mapping]]] = ..., incarnation: _Optional[str] = ..., packing: _Optional[_Iterable[_Union[PackedTensor, _Mapping]]] = ..., layout_id: _Optional[str] = ..., shared_memory: _Optional[bool] = ..., heartbeat_seconds: _Optional[float] = ..., membership_epoch: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("header", "push", "slices", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    push: PushResponse
    slices: _containers.RepeatedCompositeFieldContainer[TensorSlice]
    payload: bytes
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., push: _Optional[_Union[PushResponse, _Mapping]] = ..., slices: _Optional[_Iterable[_Union[TensorSlice, _Mapping]]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class RoundContributor(_message.Message):
    __slots__ = ("worker_id", "seq")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    seq: int
    def __init__(self, worker_id: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class RoundDecision(_message.Message):
    __slots__ = ("model", "step", "contributors", "global_norm_sq", "timeout_seconds", "closed_by")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_NORM_SQ_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_BY_FIELD_NUMBER: _ClassVar[int]
    model: str
    step: int
    contributors: _containers.RepeatedCompositeFieldContainer[RoundContributor]
    global_norm_sq: float
    timeout_seconds: float
    closed_by: RoundClose
    def __init__(self, model: _Optional[str] = ..., step: _Optional[int] = ..., contributors: _Optional[_Iterable[_Union[RoundContributor, _Mapping]]] = ..., global_norm_sq: _Optional[float] = ..., timeout_seconds: _Optional[float] = ..., closed_by: _Optional[_Union[RoundClose, str]] = ...) -> None: ...

class RoundOutcome(_message.Message):
    __slots__ = ("model", "step", "contributors", "partial_norm_sq", "applied", "closed_by")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_NORM_SQ_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_BY_FIELD_NUMBER: _ClassVar[int]
    model: str
    step: int
    contributors: _containers.RepeatedCompositeFieldContainer[RoundContributor]
    partial_norm_sq: float
    applied: bool
    closed_by: RoundClose
    def __init__(self, model: _Optional[str] = ..., step: _Optional[int] = ..., contributors: _Optional[_Iterable[_Union[RoundContributor, _Mapping]]] = ..., partial_norm_sq: _Optional[float] = ..., applied: _Optional[bool] = ..., closed_by: _Optional[_Union[RoundClose, str]] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("model", "step", "timeout_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    step: int
    timeout_seconds: float
    def __init__(self, model: _Optional[str] = ..., step: _Optional[int] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("model", "step", "name", "bytes", "created_unix")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    model: str
    step: int
    name: str
    bytes: int
    created_unix: float
    def __init__(self, model: _Optional[str] = ..., step: _Optional[int] = ..., name: _Optional[str] = ..., bytes: _Optional[int] = ..., created_unix: _Optional[float] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ...) -> None: ...

class RestoreCheckpointRequest(_message.Message):
    __slots__ = ("model", "step", "tag")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    model: str
    step: int
    tag: str
    def __init__(self, model: _Optional[str] = ..., step: _Optional[int] = ..., tag: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("offset", "total_bytes", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    total_bytes: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("name", "total_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    total_bytes: int
    def __init__(self, name: _Optional[str] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("header", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ListRulesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HyperparamInfo(_message.Message):
    __slots__ = ("name", "default_json", "required", "doc", "type", "tunable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_JSON_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TUNABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    default_json: str
    required: bool
    doc: str
    type: str
    tunable: bool
    def __init__(self, name: _Optional[str] = ..., default_json: _Optional[str] = ..., required: _Optional[bool] = ..., doc: _Optional[str] = ..., type: _Optional[str] = ..., tunable: _Optional[bool] = ...) -> None: ...

class RuleInfo(_message.Message):
    __slots__ = ("name", "kind", "library", "doc", "hyperparams")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    library: str
    doc: str
    hyperparams: _containers.RepeatedCompositeFieldContainer[HyperparamInfo]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., library: _Optional[str] = ..., doc: _Optional[str] = ..., hyperparams: _Optional[_Iterable[_Union[HyperparamInfo, _Mapping]]] = ...) -> None: ...

class ListRulesResponse(_message.Message):
    __slots__ = ("rules",)
    RULES_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[RuleInfo]
    def __init__(self, rules: _Optional[_Iterable[_Union[RuleInfo, _Mapping]]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "incarnation", "device", "models", "started_unix", "devices", "device_bytes", "shared_memory_socket", "host_id", "uid")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_SOCKET_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    version: str
    incarnation: str
    device: str
    models: int
    started_unix: float
    devices: _containers.RepeatedScalarFieldContainer[str]
    device_bytes: _containers.RepeatedScalarFieldContainer[int]
    shared_memory_socket: str
    host_id: str
    uid: int
    def __init__(self, version: _Optional[str] = ..., incarnation: _Optional[str] = ..., device: _Optional[str] = ..., models: _Optional[int] = ..., started_unix: _Optional[float] = ..., devices: _Optional[_Iterable[str]] = ..., device_bytes: _Optional[_Iterable[int]] = ..., shared_memory_socket: _Optional[str] = ..., host_id: _Optional[str] = ..., uid: _Optional[int] = ...) -> None: ...
