"""Receiving a push's gradient: the server's policy on top of the wire's `TensorAssembler`.

- NaN and Inf are refused in floating-point leaves (INVALID_ARGUMENT naming the leaf), checked
  block by block as the bytes are copied, so the check overlaps the network, not the update.
- Each leaf can start its host-to-device copy the moment its last byte arrives (`device_putter`),
  while later chunks are still in flight.
- Leaves are assembled in the buffers of earlier pushes when there are free ones
  (`GradientBuffers.take`), instead of fresh pages the OS must map and zero.
- A model's packs (core/layout.py) arrive whole, as one tensor under the pack's name, or leaf by
  leaf straight into the pack's buffer; either way the update receives one array per buffer
  (docs/design.md, "Packed layouts").
- A push whose bytes lie in a client's shared-memory region (`read_in_place`) is checked where it
  lies and handed to the device from there, not copied (docs/design.md, "Shared memory"): the
  receiver owns that memory until its push's reply, and must finish reading it before then
  (`Receiver.finish_reading`, core/aggregation.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np

from optserve.server.core.layout import Layout, unpacked
from optserve.server.core.placement import ModelPlacement
from optserve.server.core.rows import RowGradient
from optserve.wire.assembler import Leaf, TensorAssembler, aligned_empty, buffer_of
from optserve.wire.dtypes import DTYPES, FLOAT_DTYPES, LeafSpec, all_finite
from optserve.wire.errors import WireError
from optserve.wire.packing import Pack

CHECK_BLOCK_BYTES = 1 << 20  # copy-and-check granularity: fits in L2 with its source (a multiple of 8)
# Leaves from this size on start their device transfer as soon as they are complete (pipelining).
EARLY_DEVICE_PUT_BYTES = 1 << 20


class _PackBuffer:
    """A pack being received leaf by leaf: one buffer, and the leaves still to come.

    The buffer is in the wire dtype of the first leaf, as the whole pack or the leaves of an
    unpacked model would reach the update when a client narrows all its floats alike. A leaf in
    another wire dtype (a client that narrows some floats of a push and not others) switches the
    buffer to the parameters' dtype, converting what arrived so far: each value then becomes what
    the update's own conversion of that leaf would make of it, never a narrower one (no float32
    gradient rounded to bfloat16 or overflowing float16). A leaf whose bytes do not lie in the
    buffer (its own wire dtype, or received into the buffer before the switch) is converted into
    it once complete."""

    __slots__ = ("array", "left", "raw")

    def __init__(self, raw: np.ndarray, dtype: np.dtype, pack: Pack):
        self.raw = raw  # flat uint8
        self.array = raw.view(dtype)  # the pack's elements
        self.left = len(pack.leaves)

    def widen(self, pack: Pack) -> None:
        """Switches to the parameters' dtype, converting every element received so far."""
        param = DTYPES[pack.dtype]
        self.raw = aligned_empty(pack.elements * param.itemsize)
        widened = self.raw.view(param)
        widened[...] = self.array  # numpy converts with round to nearest even, as XLA's convert does
        self.array = widened

    def holds(self, buffer: np.ndarray) -> bool:
        """Whether `buffer` (a leaf's bytes) lies in this pack's current buffer."""
        start = buffer.__array_interface__["data"][0]
        base = self.raw.__array_interface__["data"][0]
        return base <= start and start + buffer.nbytes <= base + self.raw.nbytes


class GradientAssembler(TensorAssembler):
    """Assembles one push's gradient: the model's schema, floats in any float dtype on the wire
    (the update converts), NaN and Inf refused; returns one array per buffer of the layout.

    expected: what a push may send (`Model.push_schema`: every leaf, and every pack in place of its
        leaves).
    layout: the model's (None: every leaf of `expected` as itself).
    on_complete: called as on_complete(key, array) the moment a buffer's last byte arrives (after its
        values are checked), e.g. a `device_putter`.
    buffers: arrays to receive buffers into instead of fresh ones (an earlier push's, free), used for
        each buffer whose wire dtype and shape they have and that is C-contiguous.
    packs: whether a pack may be sent whole (a push names the layout its packs come from,
        PushHeader.layout_id; without it a pack name is refused, so that a client holding another
        layout's packs can never have them applied to the wrong leaves).
    """

    def __init__(
        self,
        expected: Mapping[str, LeafSpec],
        layout: Layout | None = None,
        *,
        what: str,
        on_complete: Callable[[str, np.ndarray], None] | None = None,
        buffers: Mapping[str, np.ndarray] | None = None,
        packs: bool = True,
    ):
        super().__init__(expected, what=what, cast_floats=True)
        self._packs_allowed = packs
        self._layout = layout if layout is not None else unpacked(list(expected.values()))
        self._on_complete = on_complete
        self._buffers = buffers or {}
        self._check_whole: set[str] = set()  # float leaves a slice split an element of: checked once complete
        self._by_leaf: dict[str, _PackBuffer] = {}  # packs received leaf by leaf, by pack name
        self.rows: dict[str, RowGradient] = {}  # leaves sent row-sparse (core/rows.py)
        self._row_arrays: dict[str, np.ndarray] = {}  # what each of them became once complete
        self._alignment = 0  # read_in_place: the alignment a leaf's bytes need to be adopted (0: never)
        self.in_place: set[str] = set()  # leaves (or packs sent whole) received where they lie

    def read_in_place(self, alignment: int) -> None:
        """Receives every leaf, or pack sent whole, that the payload holds in one slice where it lies
        (checked there, never copied) when its address is a multiple of `alignment` (what the device
        needs to alias it: 64 bytes for jax on CPU; 1 where a host-to-device copy is made anyway).
        Only for a payload in memory this push owns until its reply (a shared-memory region);
        the caller then waits for what reads it (`Receiver.finish_reading`) before replying. Leaves
        of a pack sent leaf by leaf, and leaves sent row-sparse, are still copied."""
        self._alignment = alignment
        self.adopting = alignment > 0

    def adopt(self, path: str, dtype: np.dtype, shape: tuple[int, ...], source: np.ndarray) -> bool:
        if path in self._layout.pack_of or path in self.rows:
            return False
        if source.__array_interface__["data"][0] % self._alignment:
            return False  # the device would copy it anyway: the fused copy-and-check costs less
        self.in_place.add(path)
        return True

    def take_rows(self, rows: Mapping[str, RowGradient]) -> None:
        """Receives these (loose) leaves row-sparse: as [k, *row_shape] values, turned into what the
        update takes (`RowGradient.receive`) once complete. Before any slice is added."""
        if not rows:
            return
        assert self._expected is not None
        expected = dict(self._expected)  # the model's push_schema is shared: never changed
        for path, r in rows.items():
            expected[path] = LeafSpec(path, r.leaf.dtype, r.wire_shape)
        self._expected = expected
        self.rows = dict(rows)

    def allocate(self, path: str, dtype: np.dtype, shape: tuple[int, ...], nbytes: int) -> np.ndarray:
        slot = self._layout.pack_of.get(path)
        if path in self._by_leaf or (slot is not None and slot[0].name in self.opened):
            both = path if slot is None else slot[0].name
            raise self.error(f"packed tensor {both!r} and its leaves both sent: send one or the other")
        if slot is None:
            if not self._packs_allowed and path in self._layout.pack_named:
                raise self.error(
                    f"packed tensor {path!r} sent without PushHeader.layout_id (the layout its packs come from)"
                )
            given = buffer_of(self._buffers.get(path), dtype, shape)
            return given if given is not None else super().allocate(path, dtype, shape, nbytes)
        pack, i = slot
        into = self._by_leaf.get(pack.name)
        if into is None:
            # in the wire dtype of its first leaf, as the whole pack or the leaves of an unpacked
            # model would reach the update (a client narrows all its floats alike)
            raw = buffer_of(self._buffers.get(pack.name), dtype, (pack.elements,))
            if raw is None:
                raw = aligned_empty(pack.elements * dtype.itemsize)
            into = self._by_leaf[pack.name] = _PackBuffer(raw, dtype, pack)
        if into.array.dtype != dtype:
            if into.array.dtype != DTYPES[pack.dtype]:
                into.widen(pack)
            if into.array.dtype != dtype:  # received on its own, converted into the pack when complete
                return super().allocate(path, dtype, shape, nbytes)
        start = pack.offsets[i] * dtype.itemsize
        return into.raw[start : start + nbytes]

    def copy(self, leaf: Leaf, start: int, source: np.ndarray) -> None:
        """Copies whole elements and checks them for NaN/Inf block by block, each block while it is
        still in cache: a separate pass over a 4 MiB chunk would read it from memory again
        (measured: the check costs 5 ms per 160 MB this way, 13 ms as a second pass). A slice that
        splits an element is copied as is; its leaf is checked whole once complete."""
        if leaf.path in self.in_place:  # the source is the buffer: check it where it lies
            if leaf.dtype_name in FLOAT_DTYPES:
                for a in range(0, len(source), CHECK_BLOCK_BYTES):
                    block = source[a : a + CHECK_BLOCK_BYTES]
                    if not all_finite(block, leaf.dtype_name):
                        raise self._nonfinite(leaf, start + a, block)
            return
        size = leaf.dtype.itemsize
        if leaf.dtype_name not in FLOAT_DTYPES or start % size or len(source) % size:
            leaf.buffer[start : start + len(source)] = source
            if leaf.dtype_name in FLOAT_DTYPES:
                self._check_whole.add(leaf.path)
            return
        for a in range(0, len(source), CHECK_BLOCK_BYTES):
            block = leaf.buffer[start + a : start + min(a + CHECK_BLOCK_BYTES, len(source))]
            block[:] = source[a : a + len(block)]
            if not all_finite(block, leaf.dtype_name):
                raise self._nonfinite(leaf, start + a, block)

    def completed(self, leaf: Leaf) -> None:
        if leaf.path in self._check_whole and not all_finite(leaf.buffer, leaf.dtype_name):
            raise self._nonfinite(leaf, 0, leaf.buffer)
        slot = self._layout.pack_of.get(leaf.path)
        if slot is None:
            sparse = self.rows.get(leaf.path)
            array = leaf.array() if sparse is None else sparse.receive(leaf.array())
            if sparse is not None:
                self._row_arrays[leaf.path] = array
            self._done(leaf.path, array)
            return
        pack, i = slot
        into = self._by_leaf[pack.name]
        if not into.holds(leaf.buffer):
            into.array[pack.offsets[i] : pack.offsets[i + 1]] = leaf.array().reshape(-1)
        into.left -= 1
        if not into.left:
            self._done(pack.name, into.array)

    def _done(self, key: str, array: np.ndarray) -> None:
        if self._on_complete is not None:
            self._on_complete(key, array)

    def missing(self) -> list[str]:
        """Loose leaves not sent, and the leaves of each pack sent neither whole nor leaf by leaf."""
        opened = self.opened
        out = [k for k in self._layout.loose if k not in opened]
        for pack in self._layout.packs:
            if pack.name not in opened:
                out += [leaf for leaf in pack.leaves if leaf not in opened]
        return out

    def result(self) -> dict[str, np.ndarray]:
        """One array per buffer of the layout (a pack as its flat elements), in the wire dtype."""
        opened = self.opened
        out = {}
        for pack in self._layout.packs:
            whole = opened.get(pack.name)
            out[pack.name] = whole.array() if whole is not None else self._by_leaf[pack.name].array
        out.update((k, self._row_arrays[k] if k in self._row_arrays else opened[k].array()) for k in self._layout.loose)
        return out

    def row_ids(self) -> dict[str, np.ndarray]:
        """The padded ids of the leaves received row-sparse under a lazy rule, by path (what the
        update gathers and scatters: core/step.py, `make_row_step`); empty when there are none."""
        return {k: r.padded_ids for k, r in self.rows.items() if r.padded_ids is not None}

    def row_sums(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The leaves received row-sparse under a lazy rule, by path: (their distinct ids ascending,
        the summed rows of those ids), unpadded (what a sync round sums: core/round_sums.py)."""
        out = {}
        for k, r in self.rows.items():
            if r.distinct is not None:
                out[k] = (r.distinct, self._row_arrays[k][: len(r.distinct)])
        return out

    def _nonfinite(self, leaf: Leaf, start: int, block: np.ndarray) -> WireError:
        """The refusal naming the leaf at fault: inside a pack sent whole, the one holding the first
        NaN or Inf of `block` (whole elements from byte `start` of the pack)."""
        path = leaf.path
        pack = self._layout.pack_named.get(path)
        if pack is not None:
            bad = ~np.isfinite(block.view(leaf.dtype).astype(np.float32))
            path = pack.locate(start // leaf.dtype.itemsize + int(np.argmax(bad)))[0]
        return self.error(f"leaf {path!r}: gradient has NaN or Inf")


def device_putter(
    into: dict, device: jax.Device | ModelPlacement, only: frozenset[str] | None = None
) -> Callable[[str, np.ndarray], None]:
    """An on_complete callback for GradientAssembler that starts each finished leaf's host-to-device
    copy (asynchronous on accelerators; zero copy of the aligned buffer on CPU) while later chunks
    are still arriving. It closes over the target dict only, not over its receiver: a bound method
    would make receiver -> assembler -> callback -> receiver a reference cycle, keeping whole
    gradients alive until the cyclic garbage collector runs. `only`: the leaves to move (others,
    e.g. non-float leaves that take no part in the update, are left on the host). `device`: a
    device, or a model's placement: on a mesh every buffer goes straight to the devices that hold
    its slices, padded as the model holds it (core/placement.py)."""
    placement = device if isinstance(device, ModelPlacement) else None
    target = device.placement.device if isinstance(device, ModelPlacement) else device

    def put(path: str, array: np.ndarray) -> None:
        if only is not None and path not in only:
            return
        if placement is not None and placement.sharded:
            into[path] = placement.put(path, array)
            return
        # Small leaves go to the jitted step as numpy arrays: its C++ dispatch transfers them in
        # microseconds, where jax.device_put's Python path costs more than a small model's update.
        into[path] = jax.device_put(array, target) if array.nbytes >= EARLY_DEVICE_PUT_BYTES else array

    return put
