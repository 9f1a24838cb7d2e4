"""Protobuf messages <-> domain types: the only place where the contract's messages are built from,
or read into, what the core works with (settings, schemas, models, push replies, checkpoints, rules)."""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from collections.abc import Iterable, Sequence

from optserve.server.checkpoint.files import CheckpointInfo
from optserve.server.checkpoint.manager import CheckpointStatus
from optserve.server.core.errors import InvalidArgument
from optserve.server.core.initializers import LeafInit
from optserve.server.core.layout import Layout
from optserve.server.core.model import Model
from optserve.server.core.schema import MAX_LEAVES, check_leaf_count, check_schema
from optserve.server.core.settings import DEFAULT_HEARTBEAT_SECONDS, ModelSettings
from optserve.server.core.shard_rounds import Decision
from optserve.server.core.sharding import Shard
from optserve.server.core.workers import PushReply
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.dtypes import LeafSpec
from optserve.wire.errors import WireError
from optserve.wire.shards import ShardMap


def settings_from_proto(s: pb.ModelSettings, model: str) -> ModelSettings:
    """Validates settings sent by a client; the message names the model and the field."""
    return ModelSettings(
        mode=s.mode,
        workers=s.workers,
        quorum=s.quorum,
        max_staleness=s.max_staleness if s.HasField("max_staleness") else None,
        sync_timeout=s.sync_timeout_seconds,
        staleness_scaling=s.staleness_scaling,
        ema_decay=s.ema_decay if s.HasField("ema_decay") else None,
        ema_debias=s.ema_debias,
        reject_nonfinite_updates=s.reject_nonfinite_updates,
        # absent: the default of new models (a client that does not say gets leases)
        heartbeat_seconds=s.heartbeat_seconds if s.HasField("heartbeat_seconds") else DEFAULT_HEARTBEAT_SECONDS,
        quorum_fraction=s.quorum_fraction,
    ).validated(model)


def settings_to_proto(settings: ModelSettings) -> pb.ModelSettings:
    s = pb.ModelSettings(
        mode=settings.mode,
        workers=settings.workers,
        quorum=settings.quorum,
        sync_timeout_seconds=settings.sync_timeout,
        staleness_scaling=settings.staleness_scaling,
        ema_debias=settings.ema_debias,
        reject_nonfinite_updates=settings.reject_nonfinite_updates,
        heartbeat_seconds=settings.heartbeat_seconds,
        quorum_fraction=settings.quorum_fraction,
    )
    if settings.max_staleness is not None:
        s.max_staleness = settings.max_staleness
    if settings.ema_decay is not None:
        s.ema_decay = settings.ema_decay
    return s


def schema_from_proto(
    model: str, leaves: Sequence[pb.LeafSpec], *, max_leaves: int | None = MAX_LEAVES
) -> list[LeafSpec]:
    """Validates a schema sent by a client (core/schema.py, check_schema)."""
    check_leaf_count(model, len(leaves), max_leaves)  # before touching a million of them
    return check_schema(model, [(leaf.path, leaf.dtype, leaf.shape) for leaf in leaves], max_leaves=max_leaves)


def leaf_init_from_proto(m: pb.LeafInit) -> LeafInit:
    """A CreateModelHeader.init entry (validated by core/initializers.py, check_inits)."""
    return LeafInit(m.path, m.initializer, m.value, m.mean, m.stddev, m.minval, m.maxval, m.seed)


def schema_to_proto(schema: Iterable[LeafSpec]) -> list[pb.LeafSpec]:
    return [pb.LeafSpec(path=leaf.path, dtype=leaf.dtype, shape=leaf.shape) for leaf in schema]


def packing_to_proto(layout: Layout) -> list[pb.PackedTensor]:
    return [pb.PackedTensor(name=p.name, dtype=p.dtype, leaves=p.leaves, elements=p.elements) for p in layout.packs]


_LAYOUT_IDS: weakref.WeakKeyDictionary[Model, str] = weakref.WeakKeyDictionary()


def layout_id(model: Model) -> str:
    """ModelInfo.layout_id: a digest of the model's schema and packing as the contract writes them
    (computed once per model)."""
    known = _LAYOUT_IDS.get(model)
    if known is None:
        header = pb.PullHeader(schema=schema_to_proto(model.schema), packing=packing_to_proto(model.layout))
        known = _LAYOUT_IDS[model] = hashlib.sha256(header.SerializeToString(deterministic=True)).hexdigest()[:32]
    return known


def model_info(model: Model, incarnation: str, checkpoints: CheckpointStatus | None = None) -> pb.ModelInfo:
    """GetModel's description of a model; `checkpoints`: the checkpoint manager's (None: the server
    has no checkpoint directory, the fields stay 0 and empty)."""
    info = pb.ModelInfo(
        name=model.name,
        step=model.step,
        schema=schema_to_proto(model.schema),
        optimizer_json=json.dumps(model.compiled.spec),
        settings=settings_to_proto(model.settings),
        hyperparams=[pb.Hyperparam(name=k, value=v) for k, v in model.hyperparams().items()],
        workers=worker_states(model),
        pending_contributions=model.pending_contributions(),
        counters=pb.ModelCounters(**vars(model.counters())),
        param_bytes=model.param_bytes,
        state_bytes=model.state_bytes,
        incarnation=incarnation,
        packing=packing_to_proto(model.layout),
        layout_id=layout_id(model),
    )
    buffers, device_bytes = model.placement_info()
    info.placement.extend(
        pb.BufferPlacement(
            name=b.name,
            sharding=b.sharding,
            param_bytes_per_device=b.param_bytes_per_device,
            state_bytes_per_device=b.state_bytes_per_device,
            padding=b.padding,
        )
        for b in buffers
    )
    info.device_bytes.extend(device_bytes)
    if checkpoints is not None:
        info.last_checkpoint_step, info.last_checkpoint_error = checkpoints.last_step, checkpoints.last_error
    if model.shard is not None:
        info.shard.CopyFrom(shard_to_proto(model.shard))
    epoch, members = model.membership_info()
    info.membership_epoch, info.live_workers = epoch, len(members)
    info.recent_rounds.extend(
        pb.SyncRound(
            step=r.step,
            contributors=[pb.RoundContributor(worker_id=w, seq=s) for w, s in r.contributors],
            anonymous=r.anonymous,
            expected=r.expected,
            opened_epoch=r.opened_epoch,
            epoch=r.epoch,
            closed_by=_ROUND_CLOSE[r.closed_by],
        )
        for r in model.closed_rounds()
    )
    return info


_ROUND_CLOSE = {
    "": pb.ROUND_CLOSE_UNSPECIFIED,
    "quorum": pb.ROUND_CLOSE_QUORUM,
    "timeout": pb.ROUND_CLOSE_TIMEOUT,
    "membership": pb.ROUND_CLOSE_MEMBERSHIP,
}


def worker_states(model: Model) -> list[pb.WorkerState]:
    """ModelInfo.workers: every worker with a record or a lease, by id."""
    _, members = model.membership_info()
    leases = {w: (lease, left) for w, lease, left in members}
    records = {w: (seq, base) for w, seq, base in model.worker_states()}
    sessions = model.worker_sessions()
    out = []
    for w in sorted(records.keys() | leases.keys()):
        seq, base = records.get(w, (0, -1))
        state = pb.WorkerState(worker_id=w, last_seq=seq, last_base_step=base, session=sessions.get(w, 0))
        if w in leases:
            lease, left = leases[w]
            state.live, state.joined_epoch = True, lease.joined_epoch
            if math.isfinite(left):
                state.lease_seconds_left = left
        out.append(state)
    return out


def shard_map_from_proto(model: str, m: pb.ShardMap) -> ShardMap:
    """A shard map sent by a client, checked (`ShardMap.check`); INVALID_ARGUMENT names the field."""
    schema_from_proto(model, [leaf.leaf for leaf in m.leaves])  # paths, dtypes and shapes as a schema's
    try:
        return ShardMap.from_message(m, f"model {model!r}: shard map")
    except WireError as e:
        raise InvalidArgument(str(e)) from None


def shard_map_to_proto(shard_map: ShardMap) -> pb.ShardMap:
    return pb.ShardMap(
        model_id=shard_map.model_id,
        version=shard_map.version,
        targets=shard_map.targets,
        split_bytes=shard_map.split_bytes,
        global_norm=shard_map.global_norm,
        leaves=[
            pb.ShardedLeaf(
                leaf=pb.LeafSpec(path=leaf.spec.path, dtype=leaf.spec.dtype, shape=leaf.spec.shape),
                pieces=[pb.LeafPiece(shard=p.shard, start=p.start, stop=p.stop) for p in leaf.pieces],
            )
            for leaf in shard_map.leaves
        ],
    )


def shard_to_proto(shard: Shard) -> pb.ShardOf:
    return pb.ShardOf(map=shard_map_to_proto(shard.map), index=shard.index)


def checkpoint_info(info: CheckpointInfo) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(
        model=info.model, step=info.step, name=info.name, bytes=info.bytes, created_unix=info.created_unix
    )


def model_summary(model: Model) -> pb.ModelSummary:
    return pb.ModelSummary(
        name=model.name,
        step=model.step,
        mode=model.settings.mode,
        leaves=len(model.schema),
        param_bytes=model.param_bytes,
    )


def push_response(model: str, reply: PushReply, *, duplicate: bool, incarnation: str) -> pb.PushResponse:
    """The answer to a push. A retry (`duplicate`) gets the reply its original push got, marked as
    such, with this server's incarnation (the original may come from a checkpoint of an earlier start)."""
    return pb.PushResponse(
        model=model, step=reply.step, applied=reply.applied, duplicate=duplicate, incarnation=incarnation
    )


def rule_info(rule: dict) -> pb.RuleInfo:
    """One optimizer rule of spec.list_rules() as ListRules describes it."""
    return pb.RuleInfo(
        name=rule["name"],
        kind=rule.get("kind", ""),
        library=rule.get("library", ""),
        doc=rule.get("doc", ""),
        hyperparams=[
            pb.HyperparamInfo(
                name=h["name"],
                default_json=json.dumps(h.get("default")),
                required=bool(h.get("required")),
                doc=h.get("doc", ""),
                type=h.get("type", ""),
                tunable=bool(h.get("tunable")),
            )
            for h in rule.get("hyperparams", [])
        ],
    )


ROUND_CLOSED_BY = {v: k for k, v in _ROUND_CLOSE.items()}  # RoundDecision.closed_by -> core's name


def round_outcome(model: str, decision: Decision) -> pb.RoundOutcome:
    out = pb.RoundOutcome(
        model=model, step=decision.step, applied=decision.applied, closed_by=_ROUND_CLOSE[decision.closed_by]
    )
    out.contributors.extend(pb.RoundContributor(worker_id=w, seq=s) for w, s in decision.contributors)
    if decision.partial_norm_sq is not None:
        out.partial_norm_sq = decision.partial_norm_sq
    return out
