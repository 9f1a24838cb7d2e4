"""What a model has seen of each worker's pushes lately, for people (the status page, `optserve top`).

Not part of the model's state: nothing here is checkpointed, decides anything or is needed to answer
a retry (that is core/workers.py). It is counted after a push's commit, outside the model's lock,
with a lock of its own held for a dictionary update, so it costs a push about a microsecond.

Memory stays bounded: at most MAX_WORKERS workers per model are remembered, the least recently
heard from forgotten first (a job that renames its workers at every restart would otherwise grow it
forever).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict

MAX_WORKERS = 4096


@dataclasses.dataclass(slots=True)
class WorkerSeen:
    """One worker as its pushes showed it."""

    pushes: int = 0  # pushes that got through (applied, joined a round, or answered as a duplicate)
    duplicates: int = 0  # of which retries answered with their first reply
    last_push_unix: float = 0.0
    last_staleness: int | None = None  # steps its last push's base_step was behind (None: not declared)


class WorkerActivity:
    """Per-worker tallies of one model's pushes, and the model's total (anonymous pushes included)."""

    def __init__(self, max_workers: int = MAX_WORKERS):
        self.max_workers = max_workers
        self._workers: OrderedDict[str, WorkerSeen] = OrderedDict()  # least recently heard from first
        self._pushes = 0
        self._lock = threading.Lock()

    def pushed(self, worker_id: str, *, duplicate: bool, staleness: int | None, now: float | None = None) -> None:
        """A push that got through; worker_id '' for an anonymous one (counted in the total only)."""
        with self._lock:
            self._pushes += 1
            if not worker_id:
                return
            seen = self._workers.get(worker_id)
            if seen is None:
                seen = self._workers[worker_id] = WorkerSeen()
                if len(self._workers) > self.max_workers:
                    self._workers.popitem(last=False)
            else:
                self._workers.move_to_end(worker_id)
            seen.pushes += 1
            seen.duplicates += duplicate
            seen.last_push_unix = time.time() if now is None else now
            if not duplicate:
                seen.last_staleness = staleness

    def total_pushes(self) -> int:
        return self._pushes

    def workers(self) -> dict[str, WorkerSeen]:
        """A copy, by worker id."""
        with self._lock:
            return {
                w: WorkerSeen(s.pushes, s.duplicates, s.last_push_unix, s.last_staleness)
                for w, s in self._workers.items()
            }
