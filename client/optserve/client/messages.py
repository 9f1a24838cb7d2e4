"""The contract's messages as the Python client builds them: chunk streams, schemas, settings.

Shared with the server (which frames its pull replies with `chunk_messages` too).
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from optserve.wire import codec
from optserve.v1 import optserve_pb2 as pb


def chunk_messages(
    first: Any, leaves: Sequence[tuple[str, np.ndarray | codec.Cast]], chunk_bytes: int,
    max_message_bytes: int | None = None,
) -> Iterator[bytes]:  # fmt: skip
    """Frames leaves as a stream of messages of `first`'s type; `first` (carrying the header fields)
    becomes the first message, holding the first chunk too, so a small tensor set is one message.
    max_message_bytes: every message, header and slice list included, stays within it (a header
    alone larger than that still goes out whole); None: payloads are bounded by chunk_bytes only."""
    msg = first
    header_bytes = first.ByteSize() if max_message_bytes is not None else 0
    for slices, parts in codec.plan_chunks(leaves, chunk_bytes, max_message_bytes=max_message_bytes,
                                           first_message_bytes=header_bytes):  # fmt: skip
        add = msg.slices.add
        for s in slices:
            add(path=s.path, dtype=s.dtype, shape=s.shape, offset=s.offset, length=s.length)
        yield codec.frame(msg.SerializeToString(), parts)
        msg = type(first)()
    if msg is first:
        yield first.SerializeToString()


def schema_of(leaves: Sequence[tuple[str, np.ndarray]]) -> list[pb.LeafSpec]:
    return [pb.LeafSpec(path=p, dtype=codec.dtype_name(a.dtype), shape=a.shape) for p, a in leaves]


def to_wire(
    leaves: list[tuple[str, np.ndarray]], wire_dtype: str | None
) -> list[tuple[str, np.ndarray | codec.Cast]]:
    """Marks floating-point leaves for a narrower wire dtype ("bfloat16", "float16"); they are
    converted chunk by chunk while the stream is framed (`codec.Cast`)."""
    if not wire_dtype:
        return leaves
    target = codec.wire_dtype(wire_dtype)
    if wire_dtype not in codec.FLOAT_DTYPES:
        raise ValueError(f"wire_dtype must be a floating-point dtype, got {wire_dtype!r}")
    return [(p, codec.Cast(a, target) if a.dtype.name in codec.FLOAT_DTYPES and a.dtype != target else a)
            for p, a in leaves]  # fmt: skip


def info_to_dict(info: pb.ModelInfo) -> dict:
    """A ModelInfo as plain Python data."""
    s = info.settings
    settings = {
        "mode": s.mode or "async",
        "workers": s.workers or None,
        "quorum": s.quorum or None,
        "max_staleness": s.max_staleness if s.HasField("max_staleness") else None,
        "sync_timeout": s.sync_timeout_seconds or None,
        "staleness_scaling": s.staleness_scaling or "none",
        "ema": s.ema_decay if s.HasField("ema_decay") else None,
        "ema_debias": s.ema_debias,
        "reject_nonfinite": s.reject_nonfinite_updates,
    }
    c = info.counters
    return {
        "name": info.name,
        "step": info.step,
        "schema": [{"path": l.path, "dtype": l.dtype, "shape": tuple(l.shape)} for l in info.schema],
        "spec": json.loads(info.optimizer_json) if info.optimizer_json else None,
        "settings": settings,
        "hyperparams": {h.name: h.value for h in info.hyperparams},
        "workers": {
            w.worker_id: {"last_seq": w.last_seq, "last_base_step": w.last_base_step} for w in info.workers
        },
        "pending_contributions": info.pending_contributions,
        "counters": {f.name: getattr(c, f.name) for f in c.DESCRIPTOR.fields},
        "param_bytes": info.param_bytes,
        "state_bytes": info.state_bytes,
        "last_checkpoint_step": info.last_checkpoint_step,
        "last_checkpoint_error": info.last_checkpoint_error or None,
        "incarnation": info.incarnation,
    }


def settings_message(
    *, mode: str, workers: int | None, quorum: int | None, max_staleness: int | None,
    sync_timeout: float | None, staleness_scaling: str | None, ema: float | None, ema_debias: bool,
    reject_nonfinite: bool = False,
) -> pb.ModelSettings:  # fmt: skip
    s = pb.ModelSettings(
        reject_nonfinite_updates=reject_nonfinite,
        mode=mode,
        workers=workers or 0,
        quorum=quorum or 0,
        sync_timeout_seconds=sync_timeout or 0.0,
        staleness_scaling=staleness_scaling or "",
        ema_debias=ema_debias,
    )
    if max_staleness is not None:
        s.max_staleness = max_staleness
    if ema is not None:
        s.ema_decay = ema
    return s
