"""The last minutes of each model's progress, in bounded ring buffers.

The status page's rates (steps/s, pushes/s, bytes/s) and charts come from here, not from the
request path: a push pays nothing for them. One thread per server reads every model's step and
counters once per `interval` (a read of a few integers per model; 100 models cost well under a
millisecond) into a short ring (the headline rates: over the last RATE_WINDOW_SECONDS), and every
`chart_every` samples it adds one chart point (the rates over those samples) to a ring of
`chart_points`: five minutes in 60 points by default. Rates are computed once, when sampled, so a
report copies finished numbers. Counters that go back (a restore resets them) give a rate of 0 for
that interval, never a negative one.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

from optserve.server.core.model import Model

INTERVAL_SECONDS = 1.0
RATE_WINDOW_SECONDS = 10.0  # the headline rates: over the last ten seconds
CHART_EVERY = 5  # samples per chart point
CHART_POINTS = 60  # five minutes of points, at the defaults


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


class ChartPoint(NamedTuple):
    """The rates of one chart interval, rounded once when it is made (a report copies them as they are)."""

    steps: float
    bytes_in: float
    bytes_out: float

    @staticmethod
    def of(r: Rates) -> ChartPoint:
        return ChartPoint(round(r.steps, 2), round(r.bytes_in, 1), round(r.bytes_out, 1))


def sample_of(model: Model, now: float) -> Sample:
    counters = model.counters()
    return Sample(now, model.step, model.activity.total_pushes(), counters.pulls, counters.bytes_in, counters.bytes_out)


class _Rings:
    """One model's recent samples and chart points."""

    __slots__ = ("last_point", "points", "recent", "since_point")

    def __init__(self, recent: int, points: int):
        self.recent: deque[Sample] = deque(maxlen=recent)
        self.points: deque[ChartPoint] = deque(maxlen=points)
        self.last_point: Sample | None = None  # the sample the next chart point starts from
        self.since_point = 0  # samples since then


class History:
    """The rings of every model (by model object: a model deleted and created again under its name
    starts a new history), and the thread that fills them."""

    def __init__(
        self,
        models: Callable[[], Iterable[Model]],
        *,
        interval: float = INTERVAL_SECONDS,
        chart_every: int = CHART_EVERY,
        chart_points: int = CHART_POINTS,
    ):
        self._models = models
        self.interval = interval
        self.chart_every = chart_every
        self.chart_points = chart_points
        self._recent = int(RATE_WINDOW_SECONDS / interval) + 2
        self._rings: weakref.WeakKeyDictionary[Model, _Rings] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def point_seconds(self) -> float:
        return self.interval * self.chart_every

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
                rings = self._rings.get(model)
                if rings is None:
                    rings = self._rings[model] = _Rings(self._recent, self.chart_points)
                rings.recent.append(sample)
                if rings.last_point is None:
                    rings.last_point = sample
                    continue
                rings.since_point += 1
                if rings.since_point >= self.chart_every:
                    rings.points.append(ChartPoint.of(Rates.between(rings.last_point, sample)))
                    rings.last_point, rings.since_point = sample, 0

    def rates(self, model: Model, now: float | None = None, window: float = RATE_WINDOW_SECONDS) -> Rates:
        """Over the last `window` seconds: from the oldest sample inside it to the model now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            rings = self._rings.get(model)
            ring = list(rings.recent) if rings is not None else []
        if not ring:
            return Rates()
        start = next((s for s in ring if s.mono >= now - window), ring[-1])
        return Rates.between(start, sample_of(model, now))

    def series(self, model: Model) -> list[ChartPoint]:
        """The chart points, oldest first, each `point_seconds` long."""
        with self._lock:
            rings = self._rings.get(model)
            return list(rings.points) if rings is not None else []
