"""The thread that does a model's timed work when its time is up: a sync round's sync_timeout, the
expiry of a member's lease (core/membership.py)."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from typing import Protocol

from optserve.server.core.aggregation import Aggregator, LockedModel
from optserve.server.core.membership import Membership

log = logging.getLogger("optserve.aggregation")

# A timer thread with nothing to watch waits this long, then exits (a new one starts with the next
# deadline), so an idle model holds no thread.
IDLE_EXIT_SECONDS = 5.0


class Deadlines(Protocol):
    """What the timer watches (an aggregator, or a model's aggregator and membership together)."""

    def time_left(self) -> float | None:
        """Seconds until something must be done (<= 0: now), or None."""
        ...

    def expire(self) -> None:
        """Does what is due; never raises."""
        ...


class DeadlineTimer:
    """Watches one model's aggregator. `wakeup` is a condition of the model's lock: the timer holds
    that lock whenever it looks at the aggregator, as the model does, and every method here is called
    with it held. The timer holds no reference to the model itself (so that a model nobody refers
    to is freed at once)."""

    def __init__(self, wakeup: threading.Condition, aggregator: Deadlines, name: str):
        self._wakeup = wakeup
        self._aggregator = aggregator
        self._name = name
        self._thread: threading.Thread | None = None
        self._stopped = False
        # when the running thread wakes by itself (time.monotonic); it is woken earlier only for an
        # earlier deadline: a renewed lease, every push of a model with leases, moves the deadline
        # later, and waking the thread for each would cost every push a thread switch
        self._wakes_at = math.inf

    def watch_locked(self) -> None:
        """The aggregator's deadline may have changed: starts the thread when there is one, or
        wakes the running thread to look again if it is earlier than the one it waits for."""
        if self._stopped:
            return
        left = self._aggregator.time_left()
        if left is None:
            return
        if self._thread is not None and self._thread.is_alive():
            if time.monotonic() + left < self._wakes_at:
                self._wakeup.notify_all()
            return
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop_locked(self) -> None:
        """The model is deleted or the server is closing: the thread ends, pending work is dropped."""
        self._stopped = True
        self._wakeup.notify_all()

    def _run(self) -> None:
        with self._wakeup:
            # ReferenceError: the model is gone (its aggregator's view refers to it weakly).
            with contextlib.suppress(ReferenceError):
                self._loop()
            if self._thread is threading.current_thread():
                self._thread = None

    def _loop(self) -> None:
        idle_since = None
        while not self._stopped:
            left = self._aggregator.time_left()
            if left is None:
                now = time.monotonic()
                idle_since = idle_since or now
                if now - idle_since >= IDLE_EXIT_SECONDS:
                    return
                self._wait(IDLE_EXIT_SECONDS)
                continue
            idle_since = None
            if left <= 0:
                self._aggregator.expire()
                continue
            self._wait(left)

    def _wait(self, seconds: float) -> None:
        self._wakes_at = time.monotonic() + seconds
        try:
            self._wakeup.wait(seconds)
        finally:
            self._wakes_at = -math.inf  # awake: every change is looked at by the loop itself


class TimedWork:
    """What a model's DeadlineTimer watches: the expiry of its members' leases,
    then the aggregator's own deadline. Holds the aggregator, the membership and the view, never the
    model (the view refers to it weakly)."""

    def __init__(self, aggregator: Aggregator, membership: Membership, view: LockedModel):
        self._aggregator, self._membership, self._view = aggregator, membership, view

    def time_left(self) -> float | None:
        lefts = [t for t in (self._membership.time_left(), self._aggregator.time_left()) if t is not None]
        return min(lefts) if lefts else None

    def expire(self) -> None:
        left = self._membership.time_left()
        if left is not None and left <= 0:
            gone = self._membership.expire()
            for e in gone:
                log.info(
                    "model %r: worker %r left (lease expired); membership epoch %d",
                    self._view.name,
                    e.worker_id,
                    e.epoch,
                )
            if gone:
                try:
                    self._aggregator.membership_changed()
                except Exception:  # never kill the model's timer silently
                    log.exception("model %r: closing a round after a lease expired failed", self._view.name)
                self._view.notify_waiters()
        left = self._aggregator.time_left()
        if left is not None and left <= 0:
            self._aggregator.expire()
