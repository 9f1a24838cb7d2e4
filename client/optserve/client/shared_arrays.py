"""Region-backed arrays: a model's gradient and parameters living in memory the server maps
(docs/design.md, "Shared memory", "Region-backed arrays").

`Model.shared_arrays()` (and `Worker.shared_arrays()`) returns two pytrees of numpy arrays of the
model's leaves, `grads` and `params`, laid in a dedicated region of the connection exactly where a
push of the gradient and a pull of the parameters put their bytes (`Slots`). So

    grads, params = worker.shared_arrays()
    params = worker.pull(out=params)             # the server writes into them: no copy here
    for batch in data:
        fill(grads, params, batch)                # the gradient computed into `grads` in place
        params = worker.push_pull(grads, out=params)

sends the gradient from where it lies (the client writes nothing; the server checks it for
NaN/Inf where it lies and its update reads it from there, finished before the call returns) and has
the server write the parameters straight into `params` (the client reads
nothing). That saves two of the round's four passes over the model's bytes.

Rules, all of them those of any `out=` array:

- `params` changes only when given as `out=` (then it holds that pull's parameters, and `out`
  itself is returned); `grads` is only read (a push reads it while the call runs: write it between
  calls). Anything else (a push of other arrays, a pull without `out=`, or with `out=` arrays
  elsewhere) goes through the connection's own region and never touches them.
- They are ordinary writable numpy arrays: a call that cannot use the region (shared memory off or
  unavailable, another host, a narrower `wire_dtype`, another thread using the region at the time,
  a server that restarted and was not offered the region yet) falls back to the copying path or the
  byte stream and gives the same result. Without shared memory they are plain memory of the same
  shapes, so a program runs unchanged anywhere.
- The region stays registered with the server while any array of it is alive (a view, a slice)
  and the connection is open; it is released at the next shared-memory call after the last one
  goes. A server that restarted is sent the region again at the next call that uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from optserve.client import pytree
from optserve.client.layout import Layout, pack_views
from optserve.client.pulls import PullReader
from optserve.client.shared_memory import Region, SharedMemory, address, align
from optserve.wire.assembler import aligned_empty
from optserve.wire.chunks import WireLeaf
from optserve.wire.dtypes import DTYPES, leaf_nbytes
from optserve.wire.shared_memory import leaf_bytes


class SharedArrays(NamedTuple):
    """A model's region-backed gradient and parameters (this module's docstring)."""

    grads: Any
    params: Any


class _Slot(NamedTuple):
    path: str  # a wire path: a leaf, or a pack's name
    at: int  # absolute address
    nbytes: int
    pack: bool


class Slots:
    """Where a dedicated region holds one model's gradient (its wire leaves from byte 0, one after the
    other, as a push lays them) and parameters (from `pull_at`, as a pull's reply lays them: a packed
    reply's packs then loose leaves, else the schema's leaves)."""

    def __init__(
        self,
        region: Region,
        grads: Sequence[_Slot],
        pull_at: int,
        pull_bytes: int,
        packed: bool,
        params: dict[str, tuple[int, int]],
    ):
        self.region = region
        self.grads = tuple(grads)
        self.pull_at = pull_at
        self.pull_bytes = pull_bytes
        self.packed = packed
        self.params = params  # leaf path -> (absolute address, bytes)

    def holds_gradient(self, leaves: Sequence[WireLeaf]) -> bool:
        """Whether a push of `leaves` (wire leaves) can be sent from the region as it lies: they are
        the slots' leaves in their order, each leaf exactly at its slot, only packs (gathered by the
        push into fresh buffers, `layout.Plan.wire_leaves`) to be written into theirs."""
        if len(leaves) != len(self.grads):
            return False
        for (path, a), slot in zip(leaves, self.grads, strict=True):
            if path != slot.path or not isinstance(a, np.ndarray) or a.nbytes != slot.nbytes:
                return False
            if slot.pack:
                if self.region.holds(a):
                    return False
            elif address(a) != slot.at or not a.flags.c_contiguous:
                return False
        return True

    def holds_out(self, out: Any, pull_bytes: int, packed: bool) -> bool:
        """Whether a pull of `pull_bytes` bytes (`packed` or not) into `out` can be written by the
        server where `out` lies: every leaf of `out` is the region's, exactly at its slot."""
        if pull_bytes != self.pull_bytes or packed != self.packed:
            return False
        try:
            leaves = pytree.flatten(out)[0]
        except TypeError:
            return False
        if len(leaves) != len(self.params):
            return False
        for path, a in leaves:
            slot = self.params.get(path)
            if slot is None or address(a) != slot[0] or a.nbytes != slot[1] or not a.flags.c_contiguous:
                return False
        return True


def allocate(
    shm: SharedMemory | None,
    layout: Layout,
    structure: pytree.Structure,
    wire_grads: Any,
    packed: bool,
    reader: PullReader,
    what: str,
) -> SharedArrays:
    """A model's region-backed arrays (plain memory when `shm` offers no region).

    wire_grads(tree): the push's wire leaves of a gradient tree (`Model._grad_leaves`); packed: the
    handle's pulls are packed; reader: its PullReader, told of the params' pack views so that `out=`
    them is received in place."""
    plan = layout.plan(structure)
    if plan is None:
        raise ValueError(f"{what}: the structure given does not have exactly the model's leaves")
    zeros = [np.zeros(layout.schema[p].shape, DTYPES[layout.schema[p].dtype]) for p in structure.paths]
    wire: Sequence[WireLeaf] = wire_grads(pytree.unflatten(structure, zeros))
    grad_sizes = [(path, leaf_bytes((path, a))) for path, a in wire]
    pull_order = [p.name for p in layout.packs] + list(layout.loose) if packed and layout.packs else list(layout.schema)
    specs = {p: layout.wire_schema.get(p) or layout.schema[p] for p in pull_order}  # a pack, or a leaf
    param_sizes = [(p, leaf_nbytes(DTYPES[specs[p].dtype], specs[p].shape)) for p in pull_order]
    pull_at = align(sum(n for _, n in grad_sizes))
    pull_bytes = sum(n for _, n in param_sizes)
    region = shm.dedicated(pull_at + pull_bytes) if shm is not None else None
    memory = region.array if region is not None else aligned_empty(pull_at + pull_bytes)
    try:
        packs = {p.name: p for p in layout.packs}
        by_path: dict[str, np.ndarray] = {}
        slots: list[_Slot] = []
        pos = 0
        for (path, a), (_, n) in zip(wire, grad_sizes, strict=True):
            view = memory[pos : pos + n].view(a.dtype)
            pack = packs.get(path)
            if pack is not None:
                by_path.update(zip(pack.leaves, pack_views(layout.runs[path], view), strict=True))
            else:
                by_path[path] = view.reshape(a.shape)
            slots.append(_Slot(path, address(memory) + pos, n, pack is not None))
            pos += n
        grads = pytree.unflatten(structure, [by_path[p] for p in structure.paths])

        received: dict[str, np.ndarray] = {}
        pos = pull_at
        for path, n in param_sizes:
            received[path] = memory[pos : pos + n].view(DTYPES[specs[path].dtype]).reshape(specs[path].shape)
            pos += n
        if packed and layout.packs:
            leaves = plan.leaves(received, reader.handed_out)  # `out=` them is received in place
        else:
            leaves = [received[p] for p in structure.paths]
        params = pytree.unflatten(structure, leaves)
        if region is not None:
            flat = pytree.flatten(params)[0]
            region.slots = Slots(
                region, slots, pull_at, pull_bytes, packed, {p: (address(a), a.nbytes) for p, a in flat}
            )
        return SharedArrays(grads, params)
    finally:
        if region is not None:
            region.lock.release()
