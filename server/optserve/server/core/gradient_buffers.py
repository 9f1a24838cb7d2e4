"""Reuse of a model's large gradient buffers from one push to the next, given back when pushes stop.

A push assembles each leaf in one contiguous host buffer (`receiving.GradientAssembler`). A fresh
buffer per push means the OS maps and zeroes new pages every time; for large gradients that is a
large share of the push (measured, 400 MB float32 on a 2-core VM: the receiving side spends more
time faulting in fresh pages than copying). So a model keeps the buffers of its last pushes and
hands them to the next push once nothing uses them any more.

Two per leaf: while update N still reads its gradient (jax aliases the host buffer on CPU), push
N+1 is already arriving. Buffers are reused only when free: every numpy view of a buffer holds a
reference to the array that owns its memory, so "no reference but ours" means nobody reads or
writes it (jax's zero-copy device arrays keep the numpy array they alias alive too). And they are
given back after IDLE_SECONDS without pushes: an idle server holds no gradients (the memory at
rest that `host_memory.release_host_buffers` exists for).

Only memory numpy allocated is kept: a gradient read in place from a client's shared-memory region
(core/receiving.py, read_in_place) is a view of memory numpy does not own, and must never outlive its
push, let alone receive another push.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping

import numpy as np

from optserve.wire.dtypes import DTYPES, LeafSpec, leaf_nbytes

MIN_BYTES = 1 << 20  # smaller leaves are cheap to allocate; not worth holding on to
PER_LEAF = 2  # one being read by the previous update, one receiving the next push
IDLE_SECONDS = 2.0


class _Kept:
    """One kept buffer: the array that owns the memory, and where the leaf's array lies in it."""

    __slots__ = ("dtype", "offset", "owner", "shape")

    def __init__(self, array: np.ndarray):
        self.owner = array.base if isinstance(array.base, np.ndarray) else array
        self.offset = array.ctypes.data - self.owner.ctypes.data
        self.dtype, self.shape = array.dtype, array.shape

    def unused(self) -> bool:
        # Every numpy view of the memory refers to its owner: only this slot and getrefcount's own
        # argument left means no view is alive anywhere (CPython reference counts).
        return sys.getrefcount(self.owner) <= 2

    def view(self) -> np.ndarray:
        return np.ndarray(self.shape, self.dtype, buffer=self.owner, offset=self.offset)


class GradientBuffers:
    """A model's reusable gradient buffers, by leaf path (only leaves of MIN_BYTES or more)."""

    def __init__(self, schema: list[LeafSpec]):
        self._large = frozenset(
            leaf.path for leaf in schema if leaf_nbytes(DTYPES[leaf.dtype], leaf.shape) >= MIN_BYTES
        )
        self._kept: dict[str, list[_Kept]] = {}
        self._lock = threading.Lock()
        self._last_use = 0.0
        self._timer: threading.Timer | None = None

    def take(self) -> dict[str, np.ndarray]:
        """Free buffers for one push, by path (in the dtype and shape of the push they came from)."""
        if not self._large:
            return {}
        out = {}
        with self._lock:
            self._last_use = time.monotonic()
            for path, kept in self._kept.items():
                free = next((k for k in kept if k.unused()), None)
                if free is not None:
                    out[path] = free.view()  # in use from now on: the view refers to the owner
        return out

    def keep(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Keeps the large leaves of a received gradient for later pushes (the newest PER_LEAF)."""
        if not self._large:
            return
        with self._lock:
            for path in self._large:
                a = arrays.get(path)
                if a is None:
                    continue
                entry = _Kept(a)
                if not entry.owner.flags.owndata:  # not numpy's memory (a region): never kept
                    continue
                kept = self._kept.setdefault(path, [])
                if not any(k.owner is entry.owner for k in kept):
                    kept.append(entry)
                    del kept[:-PER_LEAF]
            self._last_use = time.monotonic()
            if self._timer is None:
                self._arm(IDLE_SECONDS)

    def _arm(self, delay: float) -> None:
        self._timer = threading.Timer(delay, self._release_if_idle)
        self._timer.daemon = True
        self._timer.start()

    def _release_if_idle(self) -> None:
        with self._lock:
            idle = time.monotonic() - self._last_use
            if idle >= IDLE_SECONDS:
                self._kept.clear()
                self._timer = None
            else:
                self._arm(IDLE_SECONDS - idle)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(k.owner.nbytes for kept in self._kept.values() for k in kept)

    def free_bytes(self) -> int:
        """Bytes of the kept buffers that nothing reads any more: what the next push assembles in."""
        with self._lock:
            return sum(k.owner.nbytes for kept in self._kept.values() for k in kept if k.unused())
