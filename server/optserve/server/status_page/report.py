"""The status report: what the status page shows, as one JSON-ready dict (`/status.json`).

Everything comes from what the server already keeps: the store's models (step, settings, spec,
bytes, counters, worker records), each model's WorkerActivity (core/worker_activity.py), the
checkpoint manager's newest checkpoint and error, the Prometheus counters of rejected calls, and the
History of rates (status_page/history.py). Building it takes no model's lock for longer than the
reads `info()` makes, and it is only built when someone asks.

The report's keys are stable (`REPORT_VERSION`); tests/test_status_page.py checks them. The page
(status_page/render.py) and `optserve top` (top.py) are views of this dict and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import time
import weakref
from collections.abc import Iterable
from typing import Any

from optserve.server.api.metrics import ServerMetrics
from optserve.server.api.service import VERSION
from optserve.server.checkpoint.manager import CheckpointManager
from optserve.server.core.model import Model
from optserve.server.core.store import ModelStore
from optserve.server.status_page.history import ChartPoint, History, Rates
from optserve.wire.dtypes import leaf_nbytes, wire_dtype

REPORT_VERSION = 1
# Outcomes of pushes and pulls that are not errors (api/metrics.py: every other outcome is a status).
FINE_OUTCOMES = frozenset({"applied", "accepted", "duplicate", "ok", "not_modified"})


@dataclasses.dataclass
class Sources:
    """What a report is built from: the server's parts (server.py hands them over)."""

    store: ModelStore
    metrics: ServerMetrics
    history: History
    checkpoints: CheckpointManager | None
    started_unix: float
    incarnation: str


def membership_of(model: Model) -> dict[str, Any] | None:
    """The model's membership (docs/design.md, "Membership and leases"): `{"epoch": int, "live":
    {worker_id: True}}` for its live members; a worker row of a worker that is no member (its lease
    expired) says `live` false, and the page and `optserve top` show live/expired and the epoch."""
    epoch, members = model.membership_info()
    return {"epoch": epoch, "live": {worker_id: True for worker_id, _, _ in members}}


def _round(x: float) -> float:
    """Two decimals: what a person reads, and a smaller JSON."""
    return round(x, 2)


def _rates(r: Rates) -> dict[str, float]:
    return {
        "steps_per_s": _round(r.steps),
        "pushes_per_s": _round(r.pushes),
        "pulls_per_s": _round(r.pulls),
        "bytes_in_per_s": _round(r.bytes_in),
        "bytes_out_per_s": _round(r.bytes_out),
    }


# What never changes for a model object (its settings, spec, schema, placement and shard map are
# fixed when it is built; a restore replaces values, not these), computed at its first report.
_STATIC: weakref.WeakKeyDictionary[Model, dict[str, Any]] = weakref.WeakKeyDictionary()


def _static(model: Model) -> dict[str, Any]:
    known = _STATIC.get(model)
    if known is None:
        known = _STATIC[model] = {
            "mode": model.settings.mode,
            "param_bytes": model.param_bytes,
            "state_bytes": model.state_bytes,
            "leaves": len(model.schema),
            "spec": model.compiled.spec,
            "settings": model.settings.to_json(),
            "shard": _shard_map(model),
            "device_bytes": model.placement_info()[1],
        }
    return known


def _rejections(metrics: ServerMetrics) -> dict[str, dict[str, dict[str, int]]]:
    """model -> {"pushes"|"pulls": {status: count}}, from the Prometheus counters (read once)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for kind, counter in (("pushes", metrics.pushes), ("pulls", metrics.pulls)):
        for family in counter.collect():
            for s in family.samples:
                outcome = s.labels.get("outcome", "")
                if s.name.endswith("_total") and outcome not in FINE_OUTCOMES and s.value:
                    by_kind = out.setdefault(s.labels.get("model", ""), {})
                    by_kind.setdefault(kind, {})[outcome] = int(s.value)
    return out


def _workers(model: Model, now: float, membership: dict[str, Any] | None) -> list[dict[str, Any]]:
    seen = model.activity.workers()
    records = {w: (seq, base) for w, seq, base in model.worker_states()}
    live = (membership or {}).get("live") or {}
    rows = []
    for worker_id in sorted(set(seen) | set(records) | set(live)):
        activity = seen.get(worker_id)
        seq, base = records.get(worker_id, (0, -1))
        rows.append(
            {
                "id": worker_id,
                "live": live.get(worker_id, False) if membership is not None else None,  # False: expired
                "last_seq": seq,
                "last_base_step": base,
                "pushes": activity.pushes if activity else 0,
                "duplicates": activity.duplicates if activity else 0,
                "last_push_unix": activity.last_push_unix if activity else None,
                "last_push_age_s": _round(max(now - activity.last_push_unix, 0.0)) if activity else None,
                "staleness": activity.last_staleness if activity else None,
            }
        )
    return rows


def _shard_map(model: Model) -> dict[str, Any] | None:
    if model.shard is None:
        return None
    shard_map = model.shard.map
    leaves, nbytes = [0] * shard_map.shards, [0] * shard_map.shards
    for leaf in shard_map.leaves:
        dtype = wire_dtype(leaf.spec.dtype)
        for piece in leaf.pieces:
            leaves[piece.shard] += 1
            nbytes[piece.shard] += leaf_nbytes(dtype, leaf.piece_shape(piece))
    shards = [
        {"index": i, "target": t, "leaves": leaves[i], "bytes": nbytes[i]} for i, t in enumerate(shard_map.targets)
    ]
    return {
        "index": model.shard.index,
        "shards": shard_map.shards,
        "model_id": shard_map.model_id,
        "version": shard_map.version,
        "split_leaves": sum(1 for leaf in shard_map.leaves if leaf.split),
        "map": shards,
    }


def _history(series: list[ChartPoint], seconds: float) -> dict[str, Any]:
    """The chart points, column by column (oldest first; the last is the newest complete interval)."""
    steps, bytes_in, bytes_out = (list(column) for column in zip(*series, strict=True)) if series else ([], [], [])
    return {"interval_s": seconds, "steps_per_s": steps, "bytes_in_per_s": bytes_in, "bytes_out_per_s": bytes_out}


def _model(model: Model, sources: Sources, rejected: dict[str, dict[str, int]], now: float) -> dict[str, Any]:
    counters = model.counters()
    checkpoint = None
    if sources.checkpoints is not None:
        status = sources.checkpoints.describe(model.name)
        checkpoint = {
            "step": status.last_step,
            "unix": status.last_unix or None,
            "age_s": max(now - status.last_unix, 0.0) if status.last_unix else None,
            "error": status.last_error,
        }
    membership = membership_of(model)
    history = sources.history
    static = _static(model)
    return {
        "name": model.name,
        "step": model.step,
        "mode": static["mode"],
        "rates": _rates(history.rates(model)),
        "pushes": model.activity.total_pushes(),
        "counters": dict(vars(counters)),
        "pending_contributions": model.pending_contributions(),
        "param_bytes": static["param_bytes"],
        "state_bytes": static["state_bytes"],
        "leaves": static["leaves"],
        "spec": static["spec"],
        "settings": static["settings"],
        "checkpoint": checkpoint,
        "errors": {
            "stale_rejected": counters.stale_rejected,
            "nonfinite_rejected": counters.nonfinite_rejected,
            "sync_timeouts": counters.sync_timeouts,
            "rejected_pushes": rejected.get("pushes", {}),
            "rejected_pulls": rejected.get("pulls", {}),
            "checkpoint_error": checkpoint["error"] if checkpoint else "",
        },
        "membership": membership,
        "workers": _workers(model, now, membership),
        "shard": static["shard"],
        "history": _history(history.series(model), history.point_seconds),
    }


def _process_rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        return None


def _devices(store: ModelStore, models: list[Model]) -> list[dict[str, Any]]:
    held_bytes = [0] * store.placement.count
    for m in models:  # store.device_bytes() without asking every model again (_static)
        for i, n in enumerate(_static(m)["device_bytes"]):
            held_bytes[i] += n
    out = []
    for device, held in zip(store.placement.devices, held_bytes, strict=True):
        try:
            stats = device.memory_stats() or {}
        except Exception:  # some backends do not implement it
            stats = {}
        out.append(
            {
                "name": f"{device.platform}:{device.id}",
                "kind": str(getattr(device, "device_kind", device.platform)),
                "model_bytes": held,
                "in_use_bytes": stats.get("bytes_in_use"),
                "limit_bytes": stats.get("bytes_limit"),
            }
        )
    return out


def build(sources: Sources, allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """The report; `allowed`: the models the caller's token may see (None: all). A scoped caller
    learns nothing of other models, not even how many there are."""
    now = time.time()
    visible = None if allowed is None else frozenset(allowed)
    every = sources.store.models()
    models = [m for m in every if visible is None or m.name in visible]
    models.sort(key=lambda m: m.name)
    rejected = _rejections(sources.metrics)
    return {
        "report_version": REPORT_VERSION,
        "server": {
            "version": VERSION,
            "incarnation": sources.incarnation,
            "started_unix": sources.started_unix,
            "uptime_s": max(now - sources.started_unix, 0.0),
            "now_unix": now,
            "devices": _devices(sources.store, every) if visible is None else _devices(sources.store, models),
            "process_rss_bytes": _process_rss(),
            "models": len(models),
            "model_bytes": sum(m.param_bytes + m.state_bytes for m in models),
            "checkpoints": sources.checkpoints is not None,
        },
        "models": [_model(m, sources, rejected.get(m.name, {}), now) for m in models],
    }
