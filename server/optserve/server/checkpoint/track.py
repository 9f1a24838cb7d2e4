"""Per-model checkpoint bookkeeping: which model object owns a directory, its newest checkpoint,
and the state of its saves.

A model directory holds only the checkpoints of the model object that owns it (`Track.owner`):
checkpoints left under the name of a model that is not in memory are archived before a new model
of that name is checkpointed (CheckpointRoot.claim_locked).
"""

from __future__ import annotations

import dataclasses
import threading
import weakref

from optserve.server.checkpoint.files import Checkpoint
from optserve.server.core.model import Model


@dataclasses.dataclass
class Track:
    """Per-model checkpoint bookkeeping (kept per name; reset when the model is deleted)."""

    save_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    owner: weakref.ref[Model] | None = None  # the model object whose checkpoints the directory holds
    saved: Checkpoint | None = None  # the owner's newest checkpoint, written or restored
    saved_version: int = -1  # the owner's state_version that `saved` holds
    committed_step: int = 0  # step of `saved` (0: none), for describe()
    error: str = ""
    failures: int = 0  # consecutive failed saves: the periodic retry's backoff
    attempted_step: int = -1
    attempted_mono: float = float("-inf")

    def owned_by(self, model: Model) -> bool:
        return self.owner is not None and self.owner() is model

    def forget(self) -> None:
        """The directory no longer holds anything of a model in memory."""
        self.owner, self.saved, self.saved_version, self.committed_step = None, None, -1, 0
        self.error, self.failures, self.attempted_step, self.attempted_mono = "", 0, -1, float("-inf")

    def start_owning(self, model: Model) -> None:
        """`model` owns the directory from now on; nothing of an earlier owner is tracked."""
        self.forget()
        self.owner = weakref.ref(model)

    def mark_saved(self, model: Model, checkpoint: Checkpoint, version: int) -> None:
        self.owner, self.saved, self.saved_version = weakref.ref(model), checkpoint, version
        self.committed_step, self.error, self.failures = checkpoint.step, "", 0
