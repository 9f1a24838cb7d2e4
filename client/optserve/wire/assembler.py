"""Receiving: the slices of one stream put into one buffer per leaf, every offset validated, so a
malformed stream is rejected before anything is used.

`TensorAssembler` does what every receiver needs and nothing else. A receiver adds its own policy
by overriding three methods, each documented below:

- `allocate(path, dtype, shape, nbytes)`: the buffer a leaf is received into (default: a fresh
  64-byte-aligned one; e.g. the caller's own array instead, see `buffer_of`);
- `copy(leaf, start, source)`: puts one slice's bytes into the leaf's buffer (default: a plain
  copy; e.g. a copy that checks the values block by block while they are in cache);
- `completed(leaf)`: the leaf's last byte has arrived (default: nothing; e.g. start moving it to a
  device while later chunks are still in flight);
- `adopt(path, dtype, shape, source)`: a leaf whose bytes all arrive in one slice may be received
  where they lie instead of into a buffer (default: never; e.g. a payload in shared memory that the
  receiver owns for the call).

A hook rejects the stream by raising `self.error(...)` (a WireError naming what it is told).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from optserve.wire.dtypes import FLOAT_DTYPES, LeafSpec, leaf_nbytes, wire_dtype
from optserve.wire.errors import WireError

ALIGNMENT = 64  # jax.device_put aliases host memory (zero copy on CPU) only when 64-byte aligned
ALIGN_MIN_BYTES = 1 << 16  # smaller buffers are copied by any transfer anyway: skip the alignment work


def aligned_empty(nbytes: int) -> np.ndarray:
    """A fresh uint8 buffer whose data pointer is ALIGNMENT-aligned (from ALIGN_MIN_BYTES on)."""
    if nbytes < ALIGN_MIN_BYTES:
        return np.empty(nbytes, dtype=np.uint8)
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = (-raw.__array_interface__["data"][0]) % ALIGNMENT
    return raw[start : start + nbytes]


def buffer_of(array: np.ndarray | None, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray | None:
    """`array`'s own memory as the flat uint8 buffer of a leaf of `dtype` and `shape`, for
    `TensorAssembler.allocate` to receive into; None when `array` is None or is not exactly such a
    leaf (other dtype or shape, not C-contiguous). Writability is the caller's promise."""
    if array is None or array.dtype != dtype or array.shape != shape or not array.flags.c_contiguous:
        return None
    return array.reshape(-1).view(np.uint8)


class Leaf:
    """One leaf being received: its wire dtype and shape, its buffer, the bytes received so far."""

    __slots__ = ("buffer", "done", "dtype", "dtype_name", "intervals", "nbytes", "path", "received", "shape")

    def __init__(
        self, path: str, dtype_name: str, dtype: np.dtype, shape: tuple[int, ...], nbytes: int, buffer: np.ndarray
    ):
        self.path = path
        self.dtype_name = dtype_name  # the wire dtype's name
        self.dtype = dtype
        self.shape = shape
        self.nbytes = nbytes
        self.buffer = buffer  # flat uint8, nbytes long
        self.received = 0
        self.intervals: list[tuple[int, int]] = []  # sorted, disjoint, merged when adjacent
        self.done = False  # completed() has been called

    def array(self) -> np.ndarray:
        """The buffer as an array of the leaf's wire dtype and shape (no copy)."""
        return self.buffer.view(self.dtype).reshape(self.shape)

    def claim(self, start: int, end: int) -> bool:
        """Records [start, end) as received; False if it overlaps data already received."""
        iv = self.intervals
        if iv and iv[-1][1] == start:  # the common in-order case
            iv[-1] = (iv[-1][0], end)
        else:
            i = bisect.bisect_left(iv, (start, end))
            if (i > 0 and iv[i - 1][1] > start) or (i < len(iv) and iv[i][0] < end):
                return False
            iv.insert(i, (start, end))
        self.received += end - start
        return True


class TensorAssembler:
    """Collects the slices of one stream into one buffer per leaf, validating everything.

    expected: the schema the stream must match (None: any leaves, e.g. a new model's parameters).
    what: names the stream's owner in messages, e.g. "model 'mlp'".
    cast_floats: accept float16/bfloat16/float32 on the wire for a floating-point leaf of another
        float dtype (the caller converts); otherwise the wire dtype must equal the leaf's dtype.
    max_bytes: upper bound on the total bytes declared by the stream (guards huge shapes); checked
        before a leaf's buffer is allocated.

    Slices are any objects with path, dtype, shape, offset and length (the generated TensorSlice,
    or `chunks.Slice`).
    """

    def __init__(
        self,
        expected: Mapping[str, LeafSpec] | None,
        *,
        what: str,
        cast_floats: bool = False,
        max_bytes: int | None = None,
    ):
        self._expected = expected
        self._what = what
        self._cast = cast_floats
        self._max_bytes = max_bytes
        self._declared = 0
        self._leaves: dict[str, Leaf] = {}

    # -- extension points -------------------------------------------------------------------------

    def allocate(self, path: str, dtype: np.dtype, shape: tuple[int, ...], nbytes: int) -> np.ndarray:
        """The buffer leaf `path` is received into: a C-contiguous, writable uint8 array of exactly
        `nbytes` (its wire dtype and shape are already validated). Called once per leaf, at its first
        slice. Default: a fresh buffer, ALIGNMENT-aligned when large (what jax aliases)."""
        return aligned_empty(nbytes)

    def copy(self, leaf: Leaf, start: int, source: np.ndarray) -> None:
        """Puts one slice's bytes, the uint8 array `source`, at byte `start` of `leaf.buffer`. The
        range is validated (inside the leaf, not received before) and may split an element. Called
        once per non-empty slice: a slice is up to a chunk (4 MiB by default), so an override may
        work per block but must not do per-element Python work. Default: a plain copy."""
        leaf.buffer[start : start + len(source)] = source

    adopting = False  # whether `adopt` may say yes (the byte stream's path skips asking)

    def adopt(self, path: str, dtype: np.dtype, shape: tuple[int, ...], source: np.ndarray) -> bool:
        """Whether leaf `path`, whose whole bytes are `source` (one slice of the payload, uint8),
        is received where they lie: its buffer is then `source` itself and `copy` is called with
        the same memory as source and destination. Called once per leaf, in place of `allocate`,
        only when its first slice holds all of it. Default: False (a copy)."""
        return False

    def completed(self, leaf: Leaf) -> None:
        """Leaf `leaf` has all its bytes: called once per leaf, at its last byte (a zero-size leaf at
        `finish`), so a receiver can start using it while later chunks are in flight. Default:
        nothing."""

    def error(self, msg: str) -> WireError:
        """A WireError for this stream (prefixed with `what`): what hooks raise to reject it."""
        return WireError(f"{self._what}: {msg}")

    # -- receiving --------------------------------------------------------------------------------

    @property
    def opened(self) -> Mapping[str, Leaf]:
        """The leaves that slices have opened so far, by path (read-only)."""
        return self._leaves

    @property
    def received_bytes(self) -> int:
        return sum(leaf.received for leaf in self._leaves.values())

    def _open(self, path: str, dtype_name: str, shape: tuple[int, ...], whole: np.ndarray | None = None) -> Leaf:
        if not isinstance(path, str) or not path:
            raise self.error("a slice has an empty leaf path")
        try:
            dtype = wire_dtype(dtype_name, path=path)
        except WireError as e:
            raise self.error(str(e)) from None
        if any(d < 0 for d in shape):
            raise self.error(f"leaf {path!r}: negative dimension in shape {list(shape)}")
        if self._expected is not None:
            spec = self._expected.get(path)
            if spec is None:
                raise self.error(f"unexpected leaf {path!r} (not in the model's schema)")
            if shape != spec.shape:
                raise self.error(f"leaf {path!r}: shape {list(shape)} does not match the model's {list(spec.shape)}")
            if dtype_name != spec.dtype and not (
                self._cast and dtype_name in FLOAT_DTYPES and spec.dtype in FLOAT_DTYPES
            ):
                raise self.error(f"leaf {path!r}: dtype {dtype_name} does not match the model's {spec.dtype}")
        nbytes = leaf_nbytes(dtype, shape)
        self._declared += nbytes
        if self._max_bytes is not None and self._declared > self._max_bytes:
            raise self.error(
                f"leaf {path!r}: declared tensors total {self._declared} bytes, over the limit of {self._max_bytes}"
            )
        if whole is not None and len(whole) == nbytes and self.adopt(path, dtype, shape, whole):
            buffer = whole
        else:
            buffer = self.allocate(path, dtype, shape, nbytes)
        leaf = Leaf(path, dtype_name, dtype, shape, nbytes, buffer)
        self._leaves[path] = leaf
        return leaf

    def add(self, slices: Sequence[Any], payload: memoryview) -> int:
        """Copies one chunk's slices out of its payload; returns the bytes taken."""
        pos = 0
        total = len(payload)
        for s in slices:
            path, shape = s.path, tuple(s.shape)
            leaf = self._leaves.get(path)
            start, length = int(s.offset), int(s.length)
            if leaf is None:
                # a first slice that holds the whole leaf may be adopted in place (`adopt`)
                whole = None
                if self.adopting and start == 0 and length and pos + length <= total:
                    whole = np.frombuffer(payload, dtype=np.uint8, count=length, offset=pos)
                leaf = self._open(path, s.dtype, shape, whole)
            elif s.dtype != leaf.dtype_name or shape != leaf.shape:
                raise self.error(f"leaf {path!r}: slices disagree on dtype or shape")
            end = start + length
            if end > leaf.nbytes:
                raise self.error(f"leaf {path!r}: byte range [{start}, {end}) is outside its {leaf.nbytes} bytes")
            if pos + length > total:
                raise self.error(f"leaf {path!r}: slice runs past the end of the chunk payload")
            if length:
                if not leaf.claim(start, end):
                    raise self.error(f"leaf {path!r}: byte range [{start}, {end}) overlaps data already received")
                self.copy(leaf, start, np.frombuffer(payload, dtype=np.uint8, count=length, offset=pos))
            if leaf.received == leaf.nbytes and not leaf.done:
                self._complete(leaf)
            pos += length
        if pos != total:
            raise self.error(f"chunk payload has {total - pos} bytes not described by any slice")
        return total

    def _complete(self, leaf: Leaf) -> None:
        leaf.done = True
        self.completed(leaf)

    def missing(self) -> list[str]:
        """The expected leaves that no slice has opened, once the stream has ended: `finish` refuses
        the stream when there are any. Default: every expected path. (An override for a receiver
        whose `expected` lists alternatives, such as a pack in place of its leaves.)"""
        return [] if self._expected is None else [p for p in self._expected if p not in self._leaves]

    def result(self) -> dict[str, np.ndarray]:
        """What `finish` returns: {path: array in its wire dtype}, in schema order if known."""
        order = list(self._expected) if self._expected is not None else list(self._leaves)
        return {p: self._leaves[p].array() for p in order}

    def finish(self) -> dict[str, np.ndarray]:
        """Checks completeness and returns `result()`."""
        for path, leaf in self._leaves.items():
            if leaf.received != leaf.nbytes:
                raise self.error(f"leaf {path!r}: received {leaf.received} of {leaf.nbytes} bytes")
            if not leaf.done:  # a zero-size leaf: complete without any bytes
                self._complete(leaf)
        missing = self.missing()
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise self.error(f"missing leaf {missing[0]!r}{more}")
        return self.result()
