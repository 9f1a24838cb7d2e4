"""A model's consistency and bookkeeping settings, validated at the boundary (design.md, modes)."""
from __future__ import annotations

import dataclasses
import math

from optserve.server.errors import InvalidArgument
from optserve.v1 import optserve_pb2 as pb

MODES = ("async", "sync")
STALENESS_SCALING = ("none", "inverse")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    mode: str = "async"
    workers: int = 0  # sync: N
    quorum: int = 0  # sync: k <= N (resolved to N when 0)
    max_staleness: int | None = None  # async
    sync_timeout: float = 0.0  # sync: seconds; 0 = wait for the quorum
    staleness_scaling: str = "none"  # async: "none" | "inverse"
    ema_decay: float | None = None
    ema_debias: bool = True
    # refuse an update that makes parameters, optimizer state or EMA non-finite (model.make_step);
    # off by default: compatible with existing clients and checkpoints, and free of its device sync
    reject_nonfinite_updates: bool = False

    @classmethod
    def from_proto(cls, s: pb.ModelSettings, model: str) -> ModelSettings:
        """Validates settings sent by a client; the message names the model and the field."""

        def bad(field: str, why: str) -> InvalidArgument:
            return InvalidArgument(f"model {model!r}: settings.{field}: {why}")

        mode = s.mode or "async"
        if mode not in MODES:
            raise bad("mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
        scaling = s.staleness_scaling or "none"
        if scaling not in STALENESS_SCALING:
            raise bad("staleness_scaling", f"expected one of {', '.join(STALENESS_SCALING)}, got {scaling!r}")
        workers, quorum = int(s.workers), int(s.quorum)
        if mode == "sync":
            if workers < 1:
                raise bad("workers", "sync mode needs workers >= 1")
            if quorum > workers:
                raise bad("quorum", f"quorum {quorum} exceeds workers {workers}")
            quorum = quorum or workers
        elif workers or quorum or s.sync_timeout_seconds:
            raise bad("mode", "workers, quorum and sync_timeout apply to sync mode only")
        max_staleness = s.max_staleness if s.HasField("max_staleness") else None
        if max_staleness is not None and max_staleness < 0:
            raise bad("max_staleness", f"must be >= 0, got {max_staleness}")
        if not (math.isfinite(s.sync_timeout_seconds) and s.sync_timeout_seconds >= 0):
            raise bad("sync_timeout", f"must be a finite number >= 0, got {s.sync_timeout_seconds}")
        ema = s.ema_decay if s.HasField("ema_decay") else None
        if ema is not None and not (0.0 <= ema < 1.0):
            raise bad("ema", f"decay must be in [0, 1), got {ema}")
        return cls(mode, workers, quorum, max_staleness, float(s.sync_timeout_seconds), scaling, ema, s.ema_debias,
                   bool(s.reject_nonfinite_updates))

    def to_proto(self) -> pb.ModelSettings:
        s = pb.ModelSettings(
            mode=self.mode, workers=self.workers, quorum=self.quorum, sync_timeout_seconds=self.sync_timeout,
            staleness_scaling=self.staleness_scaling, ema_debias=self.ema_debias,
            reject_nonfinite_updates=self.reject_nonfinite_updates,
        )  # fmt: skip
        if self.max_staleness is not None:
            s.max_staleness = self.max_staleness
        if self.ema_decay is not None:
            s.ema_decay = self.ema_decay
        return s

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelSettings:
        return cls(**data)
