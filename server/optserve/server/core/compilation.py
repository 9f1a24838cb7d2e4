"""Compiling models' update steps: JAX's persistent compilation cache, counting compilations, and
compiling a new model's step in the background (docs/design.md, "Compilation").

XLA's compilation of a jitted optax step grows with the number of leaves (seconds for a thousand,
minutes for thousands), and every process compiles again. Three things keep that off the push path:

- **The persistent cache** (`configure_cache`): compiled executables are written to a directory and
  read back by any later process that compiles the same computation (a restarted server, a second
  server with the same model layouts). The setting is JAX's and so process-wide.
- **Warm-up** (`warm_up_steps`): a model's step is lowered and compiled from the shapes of its
  arguments (`jit(...).lower(avals).compile()`: nothing runs, nothing is donated) on a background
  thread as soon as the model exists, created or restored; jit keeps the result, so the first push
  finds it compiled. A push that finds the warm-up running waits for it rather than compiling the
  same step a second time; one that finds it still queued takes its place and compiles itself.
- **Counting** (`install_listeners`, `stats`): jax.monitoring reports every backend compilation and
  every persistent-cache hit; they are counted per kind (a model's update step, anything else) for
  the metrics (api/metrics.py), so that "a restart compiles nothing" can be observed.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import SingleDeviceSharding

from optserve.server.core.placement import ModelPlacement
from optserve.server.core.receiving import EARLY_DEVICE_PUT_BYTES
from optserve.wire.dtypes import DTYPES, LeafSpec, leaf_nbytes

log = logging.getLogger("optserve.compilation")

# The name of the update step's function (core/step.py, make_step): compilations whose function
# name contains it are counted as "update_step".
UPDATE_STEP_FUNCTION = "model_update_step"
KINDS = ("update_step", "other")

# jax.monitoring events (jax/_src/dispatch.py and compiler.py, jax 0.10): the backend compilation of
# one jitted computation, which encloses the persistent-cache lookup; and a hit of that lookup,
# recorded on the same thread just before the compilation event ends.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_WRITE_EVENT = "/jax/compilation_cache/cache_misses"  # recorded when a compiled entry is written

# A push that finds its step's warm-up running waits at most this long before it compiles the step
# itself (a few thousand unpacked leaves take minutes to compile; waiting is never slower than
# compiling the same thing again beside it).
WARM_UP_WAIT_SECONDS = 900.0
# Threads compiling warm-ups: XLA's CPU compiler is mostly single-threaded, and lowering holds the GIL.
WARM_UP_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))


# -- the persistent cache ------------------------------------------------------------------------

_config_lock = threading.Lock()


def configure_cache(path: str) -> None:
    """Uses `path` as JAX's persistent compilation cache ('' : none) for every later compilation in
    this process. Every compiled computation is written, however fast it compiled: a model's step
    is what a restart must not compile again, and small ones are cheap to keep.

    The directory is trusted: whoever can write to it can make this process run their code (JAX's
    warning), so it must be as private as the checkpoints it sits beside.
    """
    target = os.path.realpath(path) if path else None
    with _config_lock:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        if jax.config.jax_compilation_cache_dir != target:  # type: ignore[attr-defined]
            jax.config.update("jax_compilation_cache_dir", target)
            compilation_cache.reset_cache()  # JAX opens its cache once: make it open the new one
    log.info("compilation cache: %s", target or "none", extra={"event": "compile_cache"})


def cache_dir() -> str | None:
    """The persistent compilation cache in use (None: none)."""
    value = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    return str(value) if value else None


# -- counting compilations -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompileStats:
    """Counts since this process installed the listeners, per kind (KINDS)."""

    compilations: Mapping[str, int]  # XLA compilations (not served by the persistent cache)
    cache_hits: Mapping[str, int]  # executables read from the persistent cache instead
    seconds: Mapping[str, float]  # time in both (compiling, or reading the cache)
    cache_writes: int  # executables written to the persistent cache
    warm_ups: Mapping[str, int]  # background compilations by outcome: compiled, skipped, failed


class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.compilations = dict.fromkeys(KINDS, 0)
        self.hits = dict.fromkeys(KINDS, 0)
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.writes = 0
        self.warm_ups = dict.fromkeys(("compiled", "skipped", "failed"), 0)
        self.local = threading.local()  # per thread: the compilation in progress was a cache hit


_counts = _Counts()
_installed = False
_install_lock = threading.Lock()


def _on_event(event: str, **kwargs: str | int) -> None:
    if event == CACHE_HIT_EVENT:
        _counts.local.hit = True
    elif event == CACHE_WRITE_EVENT:
        with _counts.lock:
            _counts.writes += 1


def _on_duration(event: str, duration_secs: float, **kwargs: str | int) -> None:
    if event != BACKEND_COMPILE_EVENT:
        return
    hit = getattr(_counts.local, "hit", False)
    _counts.local.hit = False
    kind = "update_step" if UPDATE_STEP_FUNCTION in str(kwargs.get("fun_name", "")) else "other"
    with _counts.lock:
        (_counts.hits if hit else _counts.compilations)[kind] += 1
        _counts.seconds[kind] += duration_secs


def install_listeners() -> None:
    """Starts counting compilations and cache hits in this process (once; later calls do nothing)."""
    global _installed
    with _install_lock:
        if not _installed:
            jax.monitoring.register_event_listener(_on_event)
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _installed = True


def stats() -> CompileStats:
    """A copy of the counts (process-wide: every server of this process, every jitted function)."""
    with _counts.lock:
        return CompileStats(
            dict(_counts.compilations),
            dict(_counts.hits),
            dict(_counts.seconds),
            _counts.writes,
            dict(_counts.warm_ups),
        )


def _count_warm_up(outcome: str) -> None:
    with _counts.lock:
        _counts.warm_ups[outcome] += 1


# -- warm-up -------------------------------------------------------------------------------------


class WarmUp:
    """The background compilation of one jitted function for the avals of the arguments it will get.

    States: queued, running, done. `wait()` returns at once when done; when running, it waits for
    the end (at most WARM_UP_WAIT_SECONDS); when still queued, it cancels the warm-up, so that the
    caller compiles at once instead of waiting behind other models' warm-ups.
    """

    def __init__(self, jitted: Any, args: tuple, what: str, wanted: Callable[[], bool]):
        self._jitted, self._args, self.what, self._wanted = jitted, args, what, wanted
        self._lock = threading.Lock()
        self._state = "queued"
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float = WARM_UP_WAIT_SECONDS) -> None:
        with self._lock:
            if self._state == "queued":
                self._finish_locked("skipped")
                return
        if not self._done.wait(timeout):
            log.warning("%s: still compiling in the background after %gs; compiling it again here", self.what, timeout)

    def run(self) -> None:
        with self._lock:
            if self._state != "queued":
                return
            if not self._wanted():  # e.g. the model was deleted meanwhile
                self._finish_locked("skipped")
                return
            self._state = "running"
        outcome = "failed"
        started = time.perf_counter()
        try:
            self._jitted.lower(*self._args).compile()
            outcome = "compiled"
            log.debug(
                "%s: compiled in the background in %.2fs",
                self.what,
                time.perf_counter() - started,
                extra={"event": "warm_up"},
            )
        except Exception as e:  # the push compiles it again and reports the error to its caller
            log.warning("%s: background compilation failed: %s", self.what, e)
        finally:
            self._args = ()  # the avals are not needed any more
            with self._lock:
                self._finish_locked(outcome)

    def _finish_locked(self, outcome: str) -> None:
        self._state = "done"
        self._args = ()
        _count_warm_up(outcome)
        self._done.set()


class _WarmUpPool:
    """WARM_UP_THREADS daemon threads taking warm-ups by priority (lower first), then in order.

    A compilation must not be running when the interpreter exits: a daemon thread in XLA's C++ code
    at finalization aborts the process ("terminate called ... exception not rethrown"). So an
    exit (atexit) and a stopping server cancel the queued warm-ups and wait for the running ones.
    """

    def __init__(self) -> None:
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads: list[threading.Thread] = []
        self._running: set[WarmUp] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def submit(self, warm_up: WarmUp, priority: int) -> None:
        with self._lock:
            if not self._threads:
                atexit.register(self.finish)
            if len(self._threads) < WARM_UP_THREADS:
                t = threading.Thread(target=self._run, name=f"optserve-warm-up-{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)
        self._queue.put((priority, next(self._order), warm_up))

    def _run(self) -> None:
        while True:
            _, _, warm_up = self._queue.get()
            with self._lock:
                self._running.add(warm_up)
            try:
                warm_up.run()
            finally:
                with self._lock:
                    self._running.discard(warm_up)
                    self._idle.notify_all()

    def cancel_queued(self) -> None:
        """Skips every warm-up not started yet."""
        while True:
            try:
                _, _, warm_up = self._queue.get_nowait()
            except queue.Empty:
                return
            warm_up.wait(0)

    def finish(self, timeout: float = WARM_UP_WAIT_SECONDS) -> None:
        """Cancels the queued warm-ups and waits (at most `timeout`) for the running ones to end."""
        self.cancel_queued()
        with self._lock:
            if self._running:
                log.info("waiting for %d background compilation(s) to end", len(self._running))
            self._idle.wait_for(lambda: not self._running, timeout)


_pool = _WarmUpPool()


def finish_warm_ups() -> None:
    """Skips the warm-ups not started yet and waits (bounded) for those running: a stopping server
    (nothing will push any more), before the process exits."""
    _pool.finish()


def _aval(x: Any) -> Any:
    """The abstract value jit keys its cache on: shape, dtype, weak type and, for a device array
    (committed to its device), its sharding."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=x.aval.weak_type)
    return x


def step_grad_avals(
    buffers: list[LeafSpec], trainable: tuple[str, ...], mode: str, device: jax.Device | ModelPlacement
) -> dict:
    """The avals of the gradients a model's step is called with, in the common case (every buffer in
    its parameters' dtype). `buffers`: the model's buffers as leaves (`Layout.storage_schema`: each
    pack, and each loose leaf). Async mode applies what the receiver assembled for the trainable
    buffers (those of EARLY_DEVICE_PUT_BYTES and more already on the device, smaller ones as numpy
    arrays: core/receiving.py, `device_putter`); sync mode applies the round's mean of the trainable
    buffers, on the device, in the accumulation dtype (core/sync.py: float32, float64 for float64).
    `device`: the model's device, or its placement: on a mesh every gradient buffer arrives on the
    devices with its parameter's sharding and device shape (a pack padded; core/placement.py)."""
    if isinstance(device, ModelPlacement):
        if device.sharded:
            return _mesh_grad_avals(buffers, trainable, mode, device)
        device = device.placement.device
    committed = SingleDeviceSharding(device)
    out = {}
    for leaf in buffers:
        if leaf.path not in trainable:
            continue
        if mode == "sync":
            out[leaf.path] = jax.ShapeDtypeStruct(
                leaf.shape, np.float64 if leaf.dtype == "float64" else np.float32, sharding=committed
            )
        else:
            dtype = DTYPES[leaf.dtype]
            big = leaf_nbytes(dtype, leaf.shape) >= EARLY_DEVICE_PUT_BYTES
            out[leaf.path] = jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=committed if big else None)
    return out


def _mesh_grad_avals(buffers: list[LeafSpec], trainable: tuple[str, ...], mode: str, placement: ModelPlacement) -> dict:
    out = {}
    for leaf in buffers:
        if leaf.path in trainable:
            b = placement.buffers[leaf.path]
            dtype = (np.float64 if leaf.dtype == "float64" else np.float32) if mode == "sync" else DTYPES[leaf.dtype]
            out[leaf.path] = jax.ShapeDtypeStruct(b.shape, dtype, sharding=b.sharding)
    return out


def warm_up_steps(
    steps: Mapping[bool, Any], state: tuple, grads: dict, what: str, wanted: Callable[[], bool]
) -> dict[bool, WarmUp]:
    """Queues the background compilation of a model's step variants (`steps[donate]`), for its
    current (params, opt_state, ema_state) and `grads` (step_grad_avals): the donating variant,
    which every update uses unless a pull pins the parameters, first and before any model's
    non-donating one. `wanted()` false when a warm-up's turn comes skips it (a deleted model)."""
    args = (*jax.tree.map(_aval, state), grads, np.float32(1.0))
    warm_ups = {}
    for priority, donate in enumerate((True, False)):
        variant = "" if donate else " (non-donating variant)"
        warm_ups[donate] = WarmUp(steps[donate], args, f"{what}: update step{variant}", wanted)
        _pool.submit(warm_ups[donate], priority)
    return warm_ups


def model_alive(model: Any) -> Callable[[], bool]:
    """A `wanted` for warm_up_steps: the model still exists and is not deleted (a weak reference,
    so that a queued warm-up keeps no model alive)."""
    ref = weakref.ref(model)

    def alive() -> bool:
        m = ref()
        return m is not None and not m.deleted

    return alive
