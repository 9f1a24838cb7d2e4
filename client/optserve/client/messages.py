"""The contract's messages as the Python client builds and reads them: schemas, wire dtypes,
settings, model info (chunk streams are framed by `optserve.wire.chunks`)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from optserve.v1 import optserve_pb2 as pb
from optserve.wire import dtypes
from optserve.wire.chunks import Cast, WireLeaf


def schema_of(leaves: Sequence[tuple[str, np.ndarray]]) -> list[pb.LeafSpec]:
    return [pb.LeafSpec(path=p, dtype=dtypes.dtype_name(a.dtype), shape=a.shape) for p, a in leaves]


def to_wire(leaves: Sequence[tuple[str, np.ndarray]], wire_dtype: str | None) -> Sequence[WireLeaf]:
    """Marks floating-point leaves for a narrower wire dtype ("bfloat16", "float16"); they are
    converted chunk by chunk while the stream is framed (`optserve.wire.chunks.Cast`)."""
    if not wire_dtype:
        return leaves
    target = dtypes.wire_dtype(wire_dtype)
    if wire_dtype not in dtypes.FLOAT_DTYPES:
        raise ValueError(f"wire_dtype must be a floating-point dtype, got {wire_dtype!r}")
    return [(p, Cast(a, target) if a.dtype.name in dtypes.FLOAT_DTYPES and a.dtype != target else a) for p, a in leaves]


def info_to_dict(info: pb.ModelInfo) -> dict:
    """A ModelInfo as plain Python data."""
    s = info.settings
    settings = {
        "mode": s.mode or "async",
        "workers": s.workers or None,
        "quorum": s.quorum or s.quorum_fraction or None,
        "max_staleness": s.max_staleness if s.HasField("max_staleness") else None,
        "sync_timeout": s.sync_timeout_seconds or None,
        "staleness_scaling": s.staleness_scaling or "none",
        "ema": s.ema_decay if s.HasField("ema_decay") else None,
        "ema_debias": s.ema_debias,
        "reject_nonfinite": s.reject_nonfinite_updates,
        "heartbeat": s.heartbeat_seconds or None,
    }
    c = info.counters
    return {
        "name": info.name,
        "step": info.step,
        "schema": [{"path": leaf.path, "dtype": leaf.dtype, "shape": tuple(leaf.shape)} for leaf in info.schema],
        "spec": json.loads(info.optimizer_json) if info.optimizer_json else None,
        "settings": settings,
        "hyperparams": {h.name: h.value for h in info.hyperparams},
        # workers with applied (or pending) pushes
        "workers": {
            w.worker_id: {"last_seq": w.last_seq, "last_base_step": w.last_base_step}
            for w in info.workers
            if w.last_seq or w.last_base_step >= 0
        },
        # docs/design.md, "Membership and leases": the live members, the epoch, the last sync rounds
        "members": {
            w.worker_id: {
                "session": w.session,
                "joined_epoch": w.joined_epoch,
                "lease_seconds_left": w.lease_seconds_left if w.HasField("lease_seconds_left") else None,
            }
            for w in info.workers
            if w.live
        },
        "membership_epoch": info.membership_epoch,
        "live_workers": info.live_workers,
        "recent_rounds": [
            {
                "step": r.step,
                "contributors": [(c.worker_id, c.seq) for c in r.contributors],
                "anonymous": r.anonymous,
                "expected": r.expected,
                "opened_epoch": r.opened_epoch,
                "epoch": r.epoch,
                "closed_by": pb.RoundClose.Name(r.closed_by).removeprefix("ROUND_CLOSE_").lower(),
            }
            for r in info.recent_rounds
        ],
        "pending_contributions": info.pending_contributions,
        "counters": {f.name: getattr(c, f.name) for f in c.DESCRIPTOR.fields},
        "param_bytes": info.param_bytes,
        "state_bytes": info.state_bytes,
        "last_checkpoint_step": info.last_checkpoint_step,
        "last_checkpoint_error": info.last_checkpoint_error or None,
        "incarnation": info.incarnation,
        # leaves in none of these travel and are held one by one
        "packing": [
            {"name": p.name, "dtype": p.dtype, "leaves": list(p.leaves), "elements": p.elements} for p in info.packing
        ],
        # each buffer (pack or leaf) on the server's devices, and the model's bytes on each device
        "placement": [
            {
                "name": b.name,
                "sharding": b.sharding,
                "param_bytes_per_device": b.param_bytes_per_device,
                "state_bytes_per_device": b.state_bytes_per_device,
                "padding": b.padding,
            }
            for b in info.placement
        ],
        "device_bytes": list(info.device_bytes),
        # a shard of a model over several servers: which one, of which placement (else None)
        "shard": None
        if not info.HasField("shard")
        else {
            "index": info.shard.index,
            "model_id": info.shard.map.model_id,
            "version": info.shard.map.version,
            "targets": list(info.shard.map.targets),
        },
    }


def settings_message(
    *,
    mode: str,
    workers: int | None,
    quorum: int | float | None,
    max_staleness: int | None,
    sync_timeout: float | None,
    staleness_scaling: str | None,
    ema: float | None,
    ema_debias: bool,
    reject_nonfinite: bool = False,
    heartbeat: float | None = None,
) -> pb.ModelSettings:
    """quorum: a count, or a float in (0, 1) (or 1.0): a fraction of the members a round expects."""
    fraction = isinstance(quorum, float)
    s = pb.ModelSettings(
        reject_nonfinite_updates=reject_nonfinite,
        mode=mode,
        workers=workers or 0,
        quorum=0 if fraction else int(quorum or 0),
        quorum_fraction=float(quorum or 0.0) if fraction else 0.0,
        sync_timeout_seconds=sync_timeout or 0.0,
        staleness_scaling=staleness_scaling or "",
        ema_debias=ema_debias,
    )
    if heartbeat is not None:  # None: the server's default for new models (5 s)
        s.heartbeat_seconds = heartbeat
    if max_staleness is not None:
        s.max_staleness = max_staleness
    if ema is not None:
        s.ema_decay = ema
    return s


def settings_from_json(settings: dict) -> pb.ModelSettings:
    """The settings of a state file's manifest (the server's `ModelSettings.to_json`; a field a file
    lacks takes its default, but heartbeat_seconds: 0) as the contract's message."""
    return settings_message(
        mode=settings.get("mode", "async"),
        workers=settings.get("workers"),
        quorum=settings.get("quorum_fraction") or settings.get("quorum"),
        max_staleness=settings.get("max_staleness"),
        sync_timeout=settings.get("sync_timeout"),
        staleness_scaling=settings.get("staleness_scaling"),
        ema=settings.get("ema_decay"),
        ema_debias=settings.get("ema_debias", True),
        reject_nonfinite=settings.get("reject_nonfinite_updates", False),
        # a manifest without it was written before leases: its model keeps a fixed membership, as
        # the server reads such a file (core/settings.py, ModelSettings.from_json)
        heartbeat=settings.get("heartbeat_seconds", 0.0),
    )
