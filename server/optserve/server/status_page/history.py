"""The last minutes of each model's progress, sampled once a second into a bounded ring buffer.

The status page's rates (steps/s, pushes/s, bytes/s) and charts come from here, not from the
request path: a push pays nothing for them. One thread per server reads every model's step and
counters once per `interval` (a read of a few integers per model; 100 models cost well under a
millisecond) and keeps `samples` of them per model, so memory is bounded whatever the job does.
Counters that go back (a restore resets them) give a rate of 0 for that interval, never a negative one.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable

from optserve.server.core.model import Model

INTERVAL_SECONDS = 1.0
SAMPLES = 300  # five minutes at one a second
RATE_WINDOW_SECONDS = 10.0  # the headline rates: over the last ten seconds


@dataclasses.dataclass(frozen=True)
class Sample:
    mono: float
    step: int
    pushes: int
    pulls: int
    bytes_in: int
    bytes_out: int


@dataclasses.dataclass(frozen=True)
class Rates:
    """Per second, between two samples."""

    steps: float = 0.0
    pushes: float = 0.0
    pulls: float = 0.0
    bytes_in: float = 0.0
    bytes_out: float = 0.0

    @staticmethod
    def between(a: Sample, b: Sample) -> Rates:
        dt = b.mono - a.mono
        if dt <= 0:
            return Rates()

        def per_second(x: int, y: int) -> float:
            return max(y - x, 0) / dt  # a restore resets counters: no negative rates

        return Rates(
            per_second(a.step, b.step),
            per_second(a.pushes, b.pushes),
            per_second(a.pulls, b.pulls),
            per_second(a.bytes_in, b.bytes_in),
            per_second(a.bytes_out, b.bytes_out),
        )


def sample_of(model: Model, now: float) -> Sample:
    counters = model.counters()
    return Sample(now, model.step, model.activity.total_pushes(), counters.pulls, counters.bytes_in, counters.bytes_out)


class History:
    """Ring buffers of samples, one per model (by model object: a model deleted and created again
    under its name starts a new history), and the thread that fills them."""

    def __init__(
        self,
        models: Callable[[], Iterable[Model]],
        *,
        interval: float = INTERVAL_SECONDS,
        samples: int = SAMPLES,
    ):
        self._models = models
        self.interval = interval
        self.samples = samples
        self._rings: weakref.WeakKeyDictionary[Model, deque[Sample]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="optserve-status-history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self, now: float | None = None) -> None:
        """Adds one sample of every model (the thread calls this every `interval`)."""
        now = time.monotonic() if now is None else now
        taken = [(m, sample_of(m, now)) for m in self._models()]
        with self._lock:
            for model, sample in taken:
                ring = self._rings.get(model)
                if ring is None:
                    ring = self._rings[model] = deque(maxlen=self.samples)
                ring.append(sample)

    def _ring(self, model: Model) -> list[Sample]:
        with self._lock:
            return list(self._rings.get(model, ()))

    def rates(self, model: Model, now: float | None = None, window: float = RATE_WINDOW_SECONDS) -> Rates:
        """Over the last `window` seconds: from the oldest sample inside it to the model now."""
        now = time.monotonic() if now is None else now
        ring = self._ring(model)
        if not ring:
            return Rates()
        start = next((s for s in ring if s.mono >= now - window), ring[-1])
        return Rates.between(start, sample_of(model, now))

    def series(self, model: Model) -> list[tuple[float, Rates]]:
        """(seconds before the newest sample, rates over the interval ending there), oldest first."""
        ring = self._ring(model)
        if len(ring) < 2:
            return []
        last = ring[-1].mono
        return [(b.mono - last, Rates.between(a, b)) for a, b in itertools.pairwise(ring)]
