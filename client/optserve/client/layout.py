"""A model's layout as the client uses it: its schema, its packed tensors (the contract's
`PackedTensor`, `optserve.wire.packing.Pack`) and the leaves in none, with everything that depends only
on them computed once, so that a push or pull of thousands of small leaves does per-leaf Python work
once per layout, not once per call (docs/design.md, "Packed layouts").

- `Layout`: one schema and packing, as a ModelInfo or a pull header describes them (found again
  without rebuilding by `pulls.LayoutCache`).
- `Plan`: a Layout against the flatten order of one pytree structure: where each pack's leaves are in
  that order. A push gathers each pack's leaves with one copy (`Plan.wire_leaves`), a pull gives them
  back as views of the received pack (`Plan.leaves`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from optserve.client import pytree
from optserve.client.messages import to_wire
from optserve.wire import dtypes
from optserve.wire.assembler import aligned_empty
from optserve.wire.chunks import WireLeaf
from optserve.wire.dtypes import LeafSpec
from optserve.wire.packing import Pack, packs_from_description

_FLOATS = frozenset(dtypes.DTYPES[n] for n in dtypes.FLOAT_DTYPES)
_WIDEST = dtypes.DTYPES["float64"]  # never sent in a pack: rounded to the pack's dtype while gathering


@dataclass(frozen=True)
class _Run:
    """Consecutive leaves of one pack with one shape: viewed in one call (`list` of a reshaped
    slice creates the views in C) instead of one slice and reshape per leaf."""

    start: int  # element offset of the first leaf in the pack
    count: int
    shape: tuple[int, ...]
    size: int  # elements per leaf


def _runs(pack: Pack) -> tuple[_Run, ...]:
    runs: list[_Run] = []
    for i, shape in enumerate(pack.shapes):
        last = runs[-1] if runs else None
        size = pack.offsets[i + 1] - pack.offsets[i]
        if last is not None and last.shape == shape and shape != ():  # scalars: a list of numpy scalars
            runs[-1] = _Run(last.start, last.count + 1, shape, size)
        else:
            runs.append(_Run(pack.offsets[i], 1, shape, size))
    return tuple(runs)


def pack_views(runs: Sequence[_Run], flat: np.ndarray) -> list[np.ndarray]:
    """The pack's leaves as views of `flat` (its elements, in pack order): no copy."""
    views: list[np.ndarray] = []
    for r in runs:
        if r.count == 1:
            views.append(flat[r.start : r.start + r.size].reshape(r.shape))
        else:
            views.extend(flat[r.start : r.start + r.count * r.size].reshape((r.count, *r.shape)))
    return views


class Layout:
    """One schema and packing of a model.

    schema: the leaves, in schema order. packs: its packed tensors (empty: every leaf travels alone).
    loose: the leaves in no pack. wire_schema: what a packed stream carries, by wire path: the loose
    leaves and each pack (`Pack.spec`)."""

    def __init__(self, schema: Sequence[LeafSpec], packs: Sequence[Pack]):
        self.schema = {s.path: s for s in schema}
        self.packs = tuple(packs)
        in_packs = {p for pack in self.packs for p in pack.leaves}
        self.loose = tuple(p for p in self.schema if p not in in_packs)
        self.wire_schema: dict[str, LeafSpec] = {p: self.schema[p] for p in self.loose}
        self.wire_schema.update((pack.name, pack.spec) for pack in self.packs)
        self.runs = {pack.name: _runs(pack) for pack in self.packs}
        self.layout_id = ""  # ModelInfo.layout_id of the model it describes (set by pulls.LayoutCache)
        self._plans: dict[int, tuple[pytree.Structure, Plan | None]] = {}
        self._default: pytree.Structure | None = None

    @classmethod
    def from_messages(cls, schema: Sequence[Any], packing: Sequence[Any]) -> Layout:
        """From the generated LeafSpec and PackedTensor messages of a ModelInfo or PullHeader; raises
        WireError for a packing that does not fit the schema."""
        specs = [LeafSpec(s.path, s.dtype, tuple(s.shape)) for s in schema]
        by_path = {s.path: s for s in specs}
        described = [(p.name, p.dtype, list(p.leaves)) for p in packing]
        return cls(specs, packs_from_description(described, by_path))

    @property
    def default_structure(self) -> pytree.Structure:
        """Nested dicts of the schema's paths: the structure a client that never saw the tree gets."""
        if self._default is None:
            empty = np.empty(0, np.float32)
            self._default = pytree.flatten(pytree.nested_dicts([(p, empty) for p in self.schema]))[1]
        return self._default

    def plan(self, structure: pytree.Structure) -> Plan | None:
        """The plan for pytrees of `structure` (cached per structure); None when its leaves are not
        exactly the schema's."""
        hit = self._plans.get(id(structure))
        if hit is not None and hit[0] is structure:
            return hit[1]
        plan = Plan.make(self, structure.paths)
        if len(self._plans) >= 8:  # a few structures per model at most; never grows without bound
            self._plans.clear()
        self._plans[id(structure)] = (structure, plan)  # the structure is kept, so its id is not reused
        return plan


@dataclass(frozen=True)
class _Placed:
    """Where one pack's leaves are in a flatten order: a slice when they are consecutive and in pack
    order (the usual case: the server packs in schema order), else their positions."""

    pack: Pack
    positions: slice | tuple[int, ...]

    def take(self, items: Sequence[Any]) -> Sequence[Any]:
        if isinstance(self.positions, slice):
            return items[self.positions]
        return [items[i] for i in self.positions]


class Plan:
    """A Layout against the flatten order (`paths`) of one pytree structure."""

    def __init__(self, layout: Layout, placed: tuple[_Placed, ...], loose: tuple[tuple[str, int], ...], n: int):
        self.layout = layout
        self.placed = placed
        self.loose = loose  # (path, position) of the leaves in no pack
        self.size = n

    @classmethod
    def make(cls, layout: Layout, paths: Sequence[str]) -> Plan | None:
        index = {p: i for i, p in enumerate(paths)}
        if len(index) != len(layout.schema) or any(p not in index for p in layout.schema):
            return None
        placed = []
        for pack in layout.packs:
            pos = tuple(index[p] for p in pack.leaves)
            contiguous = bool(pos) and pos == tuple(range(pos[0], pos[0] + len(pos)))
            placed.append(_Placed(pack, slice(pos[0], pos[0] + len(pos)) if contiguous else pos))
        return cls(layout, tuple(placed), tuple((p, index[p]) for p in layout.loose), len(paths))

    # -- push -------------------------------------------------------------------------------------

    def wire_leaves(self, arrays: Sequence[np.ndarray], wire_dtype: str | None) -> list[WireLeaf] | None:
        """A gradient (its leaves in the plan's order) as the wire carries it: each pack gathered with
        one copy into one aligned buffer, cast while gathering to `wire_dtype` (else to the leaves' own
        float dtype when they share one narrower than float64, else the pack's dtype); the loose leaves
        as `to_wire` marks them. None when a pack's leaves are not all floats of the pack's shapes:
        the caller sends the leaves one by one, and the server names the leaf at fault."""
        target = dtypes.wire_dtype(wire_dtype) if wire_dtype else None
        if wire_dtype and wire_dtype not in dtypes.FLOAT_DTYPES:
            raise ValueError(f"wire_dtype must be a floating-point dtype, got {wire_dtype!r}")
        out: list[WireLeaf] = []
        for placed in self.placed:
            pack = placed.pack
            group = placed.take(arrays)
            if [a.shape for a in group] != list(pack.shapes):
                return None
            kinds = {a.dtype for a in group}
            if not kinds <= _FLOATS:
                return None
            dtype = target
            if dtype is None:
                own = next(iter(kinds)) if len(kinds) == 1 else None
                dtype = own if own is not None and own != _WIDEST else dtypes.DTYPES[pack.dtype]
            buf = aligned_empty(pack.elements * dtype.itemsize).view(dtype)
            if pack.elements:
                np.concatenate(group, axis=None, out=buf, casting="unsafe")
            out.append((pack.name, buf))
        out.extend(to_wire([(p, arrays[i]) for p, i in self.loose], wire_dtype))
        return out

    # -- pull -------------------------------------------------------------------------------------

    def leaves(self, received: dict[str, np.ndarray], handed_out: HandedOut | None = None) -> list[np.ndarray]:
        """The leaves in the plan's order from a received packed stream (by wire path, each pack's
        flat array already in its parameter dtype): each pack's leaves are views of it, no copy.
        handed_out: remembers the views, so that a later pull `out=` them receives in place."""
        leaves: list[Any] = [None] * self.size
        for placed in self.placed:
            pack = placed.pack
            views = pack_views(self.layout.runs[pack.name], received[pack.name])
            if handed_out is not None:
                handed_out.remember(pack, received[pack.name], views)
            if isinstance(placed.positions, slice):
                leaves[placed.positions] = views
            else:
                for i, v in zip(placed.positions, views, strict=True):
                    leaves[i] = v
        for path, i in self.loose:
            leaves[i] = received[path]
        return leaves


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


class HandedOut:
    """The views of packs that pulls returned, remembered without keeping them alive (their ids and a
    weak reference to the buffer they view), so that a pull `out=` exactly those arrays receives each
    pack straight into its buffer instead of copying leaf by leaf."""

    def __init__(self) -> None:
        self._packs: dict[str, tuple[Pack, weakref.ref, int, tuple[int, ...]]] = {}

    def remember(self, pack: Pack, flat: np.ndarray, views: Sequence[np.ndarray]) -> None:
        owner = flat if flat.base is None else flat.base  # numpy views point at the array owning the memory
        if not isinstance(owner, np.ndarray) or not owner.flags.c_contiguous:
            self._packs.pop(pack.name, None)
            return
        offset = _address(flat) - _address(owner)
        self._packs[pack.name] = (pack, weakref.ref(owner), offset, tuple(map(id, views)))

    def buffer(self, pack: Pack, group: Sequence[np.ndarray]) -> np.ndarray | None:
        """The flat buffer (the pack's dtype, shape [elements]) whose views `group` is, in pack order,
        when `group` is exactly the views an earlier pull returned of it; None otherwise."""
        entry = self._packs.get(pack.name)
        if entry is None:
            return None
        known, ref, offset, ids = entry
        owner = ref()
        if owner is None or (known is not pack and known != pack) or tuple(map(id, group)) != ids:
            return None
        if not all(a.base is owner for a in group):  # an id reused by another array
            return None
        dtype = dtypes.DTYPES[pack.dtype]
        raw = owner.reshape(-1).view(np.uint8)[offset : offset + pack.elements * dtype.itemsize]
        return raw.view(dtype)
