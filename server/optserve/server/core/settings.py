"""A model's consistency and bookkeeping settings, validated at the boundary (docs/design.md, "Models and admission").

One validation (`ModelSettings.validated`) serves every door: settings sent by a client
(api/messages.py, CreateModel) and settings read from a file (`from_json`, Upload and checkpoint
manifests), so a file cannot hold what a client could not ask for.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from optserve.server.core.errors import InvalidArgument

MODES = ("async", "sync")
STALENESS_SCALING = ("none", "inverse")
# The proto's field ranges (ModelSettings: uint32 workers and quorum, int64 max_staleness): a value
# beyond them could be held but never reported (GetModel would fail to serialize it).
_UINT32_MAX = 2**32 - 1
_INT64_MAX = 2**63 - 1
# JSON types of the fields as the annotations name them ("int | None": an int or null).
_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}
# Seconds between the heartbeats of idle workers for a model created without the setting: a lease
# lasts two of them, so a dead worker leaves the rounds within 10 s (docs/design.md, "Membership
# and leases"); short enough not to stall a job, long enough that a live worker's heartbeat has 5 s
# of slack on a busy machine.
DEFAULT_HEARTBEAT_SECONDS = 5.0
# A file whose settings lack heartbeat_seconds was written before leases existed: its model had a
# fixed membership, and keeps it (`from_json`).
PRE_LEASE_HEARTBEAT_SECONDS = 0.0


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    mode: str = "async"
    workers: int = 0  # sync: N
    quorum: int = 0  # sync: k <= N (resolved to N when 0 and no quorum_fraction)
    max_staleness: int | None = None  # async
    sync_timeout: float = 0.0  # sync: seconds; 0 = wait for the quorum
    staleness_scaling: str = "none"  # async: "none" | "inverse"
    ema_decay: float | None = None
    ema_debias: bool = True
    # refuse an update that makes parameters, optimizer state or EMA non-finite (model.make_step);
    # off by default: compatible with existing clients and checkpoints, and free of its device sync
    reject_nonfinite_updates: bool = False
    # membership (core/membership.py): members renew their lease at least this often (pushes,
    # pulls, the client's heartbeat); a lease lasts two intervals. 0: leases never expire (a fixed
    # membership: sync rounds expect `workers` contributors, as before leases existed)
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    # sync: the quorum as a fraction of the round's expected members, in (0, 1]; 0: `quorum`
    quorum_fraction: float = 0.0

    def validated(self, model: str) -> ModelSettings:
        """These settings checked as CreateModel checks them, with defaults resolved ("" mode:
        async, quorum 0: workers); INVALID_ARGUMENT naming the model and the field."""

        def bad(field: str, why: str) -> InvalidArgument:
            return InvalidArgument(f"model {model!r}: settings.{field}: {why}")

        mode = self.mode or "async"
        if mode not in MODES:
            raise bad("mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
        scaling = self.staleness_scaling or "none"
        if scaling not in STALENESS_SCALING:
            raise bad("staleness_scaling", f"expected one of {', '.join(STALENESS_SCALING)}, got {scaling!r}")
        workers, quorum = int(self.workers), int(self.quorum)
        for field, value in (("workers", workers), ("quorum", quorum)):
            if not 0 <= value <= _UINT32_MAX:
                raise bad(field, f"must be in [0, {_UINT32_MAX}], got {value}")
        fraction = self.quorum_fraction
        if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 <= fraction <= 1):
            raise bad("quorum_fraction", f"must be a number in (0, 1] (0: none), got {fraction}")
        heartbeat = self.heartbeat_seconds
        if not (isinstance(heartbeat, (int, float)) and math.isfinite(heartbeat) and 0 <= heartbeat <= 86400):
            raise bad(
                "heartbeat_seconds", f"must be a finite number in [0, 86400] (0: leases never expire), got {heartbeat}"
            )
        if mode == "sync":
            if workers < 1:
                raise bad("workers", "sync mode needs workers >= 1")
            if quorum > workers:
                raise bad("quorum", f"quorum {quorum} exceeds workers {workers}")
            if fraction and self.quorum:
                raise bad("quorum_fraction", "give quorum (a count) or quorum_fraction, not both")
            quorum = 0 if fraction else quorum or workers  # with a fraction, quorum stays 0
        elif workers or quorum or self.sync_timeout or fraction:
            raise bad("mode", "workers, quorum, quorum_fraction and sync_timeout apply to sync mode only")
        if self.max_staleness is not None and not 0 <= self.max_staleness <= _INT64_MAX:
            raise bad("max_staleness", f"must be in [0, {_INT64_MAX}], got {self.max_staleness}")
        if not (math.isfinite(self.sync_timeout) and self.sync_timeout >= 0):
            raise bad("sync_timeout", f"must be a finite number >= 0, got {self.sync_timeout}")
        ema = self.ema_decay
        if ema is not None and not (0.0 <= ema < 1.0):  # NaN fails this too
            raise bad("ema", f"decay must be in [0, 1), got {ema}")
        return dataclasses.replace(
            self,
            mode=mode,
            workers=workers,
            quorum=quorum,
            sync_timeout=float(self.sync_timeout),
            staleness_scaling=scaling,
            ema_decay=None if ema is None else float(ema),
            ema_debias=bool(self.ema_debias),
            reject_nonfinite_updates=bool(self.reject_nonfinite_updates),
            heartbeat_seconds=float(heartbeat),
            quorum_fraction=float(fraction),
        )

    @property
    def lease_seconds(self) -> float:
        """How long a member's lease lasts without renewal: two heartbeat intervals (0: forever)."""
        return 2.0 * self.heartbeat_seconds

    def needed(self, expected: int) -> int:
        """sync: the contributions that complete a round expecting `expected` members (at least 1)."""
        if self.quorum_fraction:
            return max(1, math.ceil(self.quorum_fraction * expected - 1e-9))
        return max(1, min(self.quorum or self.workers, expected))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, model: str) -> ModelSettings:
        """Settings read from a file (`to_json`'s form), strictly typed, then `validated` like a
        client's. A field the file lacks takes its default (files written before it existed), but
        heartbeat_seconds: a file without it was written before leases, by a model whose membership
        was fixed, and its model keeps a fixed membership (0), not the default of new models. An
        unknown field is refused."""
        if not isinstance(data, dict):
            raise InvalidArgument(f"model {model!r}: settings: expected an object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in fields)
        if unknown:
            raise InvalidArgument(f"model {model!r}: settings.{unknown[0]}: unknown setting")
        for name, value in data.items():
            kind, _, none = str(fields[name].type).partition(" | ")
            allowed = _JSON_TYPES.get(kind, (object,))  # a field of another type: `validated` checks it
            ok = (value is None and none == "None") or (
                isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
            )
            if not ok:
                want = kind + (" or null" if none else "")
                raise InvalidArgument(f"model {model!r}: settings.{name}: expected {want}, got {value!r}")
        return cls(**{"heartbeat_seconds": PRE_LEASE_HEARTBEAT_SECONDS, **data}).validated(model)
