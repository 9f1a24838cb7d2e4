"""A model's counters (GetModel's `counters`): counted from any thread, without the model's lock."""

from __future__ import annotations

import dataclasses
import threading


@dataclasses.dataclass
class Counters:
    pushes_applied: int = 0
    stale_rejected: int = 0
    duplicates: int = 0
    sync_timeouts: int = 0
    pulls: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    nonfinite_rejected: int = 0


class CounterSet:
    """The counters of one model since its creation or last restore. Each addition takes a lock of
    its own (a read-modify-write is not atomic in Python), never held for anything else, so the
    service may count bytes while an update holds the model's lock."""

    def __init__(self) -> None:
        self._values = Counters()
        self._lock = threading.Lock()

    def add(self, counter: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._values, counter, getattr(self._values, counter) + n)

    def values(self) -> Counters:
        """A copy of the counters."""
        with self._lock:
            return dataclasses.replace(self._values)

    def reset(self) -> None:
        with self._lock:
            self._values = Counters()
