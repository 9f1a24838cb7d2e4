"""Reading a pull's reply stream into a pytree: fresh arrays, or the caller's (`out=`).

The first message's header says how the reply is laid out: the model's schema and, for a packed pull
(PullRequest.packed), the packed tensors it sends in place of their leaves (PullHeader.packing). That
header, never a layout remembered from an earlier call, decides how the reply is read, so a model
re-created with another layout cannot be misread. Everything that depends only on the layout is
computed once per layout (`layout.Layout`, found again by the header's bytes in a `LayoutCache`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np

from optserve.client import pytree
from optserve.client.errors import InvalidArgumentError, OptserveError
from optserve.client.layout import HandedOut, Layout, pack_views
from optserve.v1 import optserve_pb2 as pb
from optserve.wire import dtypes
from optserve.wire.assembler import Leaf, TensorAssembler, buffer_of
from optserve.wire.dtypes import LeafSpec
from optserve.wire.errors import WireError
from optserve.wire.framing import parse_message


class _IntoArrays(TensorAssembler):
    """A pull assembled in given arrays (`targets`, by wire path: the caller's leaves, or the flat
    buffer of a pack): each leaf or pack whose wire dtype and shape its target has is received
    straight into it (others, e.g. narrowed on the wire, in fresh buffers)."""

    def __init__(self, schema: dict[str, LeafSpec], *, what: str, targets: dict[str, np.ndarray] | None):
        super().__init__(schema, what=what, cast_floats=True)
        self._targets = targets or {}

    def allocate(self, path: str, dtype: np.dtype, shape: tuple[int, ...], nbytes: int) -> np.ndarray:
        given = buffer_of(self._targets.get(path), dtype, shape)
        return given if given is not None else super().allocate(path, dtype, shape, nbytes)

    def copy(self, leaf: Leaf, start: int, source: np.ndarray) -> None:
        if _address(leaf.buffer) + start != _address(source):  # a region-backed `out`: already there
            leaf.buffer[start : start + len(source)] = source


class LayoutCache:
    """Layouts by the bytes of the header that described them (step and incarnation left out; the
    model's name, schema and packing), and by layout id: a header seen before costs one serialization
    instead of rebuilding the schema and plans leaf by leaf, and a packed pull that names the layout
    it knows (PullRequest.layout_id) gets a header without schema and packing, found here by its id.
    Bounded; dict operations are atomic, so threads share it without a lock (two threads may build
    one layout twice)."""

    def __init__(self, size: int = 16) -> None:
        self._by_key: dict[bytes, Layout] = {}
        self._by_id: dict[str, Layout] = {}
        self._size = size

    def of_header(self, header: pb.PullHeader, packed: bool, known: Layout | None = None) -> Layout:
        """The Layout `header` describes (`packed`: the header of a packed pull, which describes the
        model's packing; a plain pull's lists no packs, and is not the layout its id names). Clears
        its step, incarnation and membership epoch (read them first). `known`: the layout the request named.
        """
        if not header.schema and header.layout_id:
            if known is None or known.layout_id != header.layout_id:
                known = self._by_id.get(header.layout_id)
            if known is None:
                raise WireError(
                    f"the reply names layout {header.layout_id!r} without describing it, and it is not known"
                )
            return known
        header.ClearField("step")
        header.ClearField("incarnation")
        header.ClearField("membership_epoch")
        return self._get(header.SerializeToString(), header.schema, header.packing, header.layout_id if packed else "")

    def of_info(self, info: pb.ModelInfo) -> Layout:
        """The Layout of a ModelInfo (the same Layout as a packed pull header of the model)."""
        key = pb.PullHeader(
            model=info.name, schema=info.schema, packing=info.packing, layout_id=info.layout_id
        ).SerializeToString()
        return self._get(key, info.schema, info.packing, info.layout_id)

    def _get(self, key: bytes, schema: Any, packing: Any, layout_id: str) -> Layout:
        layout = self._by_key.get(key)
        if layout is None:
            layout = Layout.from_messages(schema, packing)
            layout.layout_id = layout_id
            if len(self._by_key) >= self._size:  # a model has one layout (a re-created one another)
                self._by_key.clear()
                self._by_id.clear()
            self._by_key[key] = layout
        if layout_id:
            self._by_id[layout_id] = layout
        return layout


_LAYOUTS = LayoutCache()  # shared by every Model handle of the process: a layout is built once


class Pulled(NamedTuple):
    """What a pull's reply said: the step and incarnation of its header, the layout it was read
    with (None for a reply with no tensors), and the pytree (None when not modified)."""

    step: int
    incarnation: str
    layout: Layout | None
    params: Any
    heartbeat_seconds: float = 0.0  # the model's (ModelSettings.heartbeat_seconds)


class PullReader:
    """Reads the pull replies of one model (`Model` owns one; safe to use from several threads)."""

    def __init__(self, name: str):
        self.name = name
        self.layouts = _LAYOUTS
        self.handed_out = HandedOut()

    def read(
        self,
        replies: Iterable[bytes],
        structure: pytree.Structure | None,
        *,
        like: Any = None,
        out: Any = None,
        push_reply: list | None = None,
        packed: bool = False,
        known: Layout | None = None,
        shared: np.ndarray | None = None,
    ) -> Pulled:
        """Assembles a PullResponse stream into a pytree (of `like`'s structure, else `structure`, else
        nested dicts), `out` itself when given, or None when not modified. `packed`: the request was
        a packed pull; `known`: the layout it named (PullRequest.layout_id); `shared`: the span of
        the request's PullRequest.shared_memory, where a reply that says so has its tensors."""
        assembler: _IntoArrays | None = None
        targets: dict[str, np.ndarray] | None = None
        finish_out: Any = None
        step, incarnation, layout, heartbeat = -1, "", None, 0.0
        for raw in replies:
            msg, payload = parse_message(raw, pb.PullResponse)
            if msg.HasField("header") and msg.header.shared_memory:
                if shared is None or len(payload):
                    raise OptserveError(f"model {self.name!r}: a shared-memory reply to a pull that named no span")
                msg.header.ClearField("shared_memory")  # the layout cache keys on the header's bytes
                payload = shared[: sum(int(s.length) for s in msg.slices)].data
            if msg.HasField("header"):
                if push_reply is not None and msg.HasField("push"):
                    push_reply.append(msg.push)
                step, incarnation = msg.header.step, msg.header.incarnation
                heartbeat = msg.header.heartbeat_seconds
                if msg.header.not_modified:
                    return Pulled(step, incarnation, None, None, heartbeat)
                try:
                    layout = self.layouts.of_header(msg.header, packed, known)
                except WireError as e:
                    raise OptserveError(f"model {self.name!r}: pull header: {e}") from None
                targets = None
                if out is not None:
                    targets, finish_out = self._out_targets(layout, out, structure)
                assembler = _IntoArrays(layout.wire_schema, what=f"model {self.name!r}", targets=targets)
            if assembler is None:
                raise InvalidArgumentError(f"model {self.name!r}: pull stream did not start with a header")
            if msg.slices:
                if shared is not None and targets:
                    payload = _apart(payload, msg.slices, targets)
                assembler.add(msg.slices, payload)
        if assembler is None or layout is None:
            raise OptserveError(f"model {self.name!r}: empty pull stream")
        arrays = assembler.finish()
        if finish_out is not None:
            finish_out(arrays)
            return Pulled(step, incarnation, layout, out, heartbeat)
        for path, a in arrays.items():  # undo a narrower wire dtype, once per pack or leaf
            want = layout.wire_schema[path].dtype
            if dtypes.dtype_name(a.dtype) != want:
                arrays[path] = a.astype(dtypes.wire_dtype(want))
        if like is not None:
            structure = pytree.flatten(like)[1]
        if structure is None:
            structure = layout.default_structure
        plan = layout.plan(structure)
        if plan is None:
            raise self._mismatch(layout, structure)
        params = pytree.unflatten(structure, plan.leaves(arrays, self.handed_out))
        return Pulled(step, incarnation, layout, params, heartbeat)

    def _mismatch(self, layout: Layout, structure: pytree.Structure) -> InvalidArgumentError:
        missing = [p for p in structure.paths if p not in layout.schema]
        return InvalidArgumentError(
            f"model {self.name!r}: the structure given has {len(structure.paths)} leaves, the model "
            f"{len(layout.schema)}" + (f"; no leaf {missing[0]!r} on the server" if missing else "")
        )

    # -- out= -------------------------------------------------------------------------------------

    def _out_targets(
        self, layout: Layout, out: Any, structure: pytree.Structure | None
    ) -> tuple[dict[str, np.ndarray], Callable[[dict[str, np.ndarray]], None]]:
        """Where a pull `out=` is received (by wire path), and what completes it once received."""
        in_place = self._in_place(layout, out, structure)
        if in_place is not None:
            return in_place, lambda arrays: _copy_received(arrays, in_place)
        try:
            by_path = dict(pytree.writable_leaves(out))
        except TypeError as e:
            raise InvalidArgumentError(f"model {self.name!r}: out: {e}") from None
        self._check_out(layout.schema, by_path)
        targets = {p: by_path[p] for p in layout.loose}

        def finish(arrays: dict[str, np.ndarray]) -> None:
            _copy_received(arrays, targets)
            for pack in layout.packs:  # leaf by leaf: the caller's arrays are not one pack buffer
                views = pack_views(layout.runs[pack.name], arrays[pack.name])
                for path, view in zip(pack.leaves, views, strict=True):
                    np.copyto(by_path[path], view, casting="unsafe")

        return targets, finish

    def _in_place(self, layout: Layout, out: Any, structure: pytree.Structure | None) -> dict[str, np.ndarray] | None:
        """The targets of a pull `out=` the views an earlier pull returned of its packs: each pack's
        own buffer (so it is received in place, no copy), and the loose leaves, numpy arrays of the
        parameters' dtypes and shapes. None when `out` is anything else (checked leaf by leaf then)."""
        if not layout.packs:
            return None
        if structure is None:  # a handle that never saw the tree: its pulls returned nested dicts
            structure = layout.default_structure
        leaves = pytree.flatten_as(out, structure, convert=False)
        plan = layout.plan(structure) if leaves is not None else None
        if leaves is None or plan is None:
            return None
        targets: dict[str, np.ndarray] = {}
        for placed in plan.placed:
            flat = self.handed_out.buffer(placed.pack, placed.take(leaves))
            if flat is None:
                return None
            targets[placed.pack.name] = flat
        for path, i in plan.loose:
            a, spec = leaves[i], layout.schema[path]
            if not (
                type(a) is np.ndarray
                and a.flags.writeable
                and a.flags.c_contiguous
                and a.shape == spec.shape
                and a.dtype == dtypes.wire_dtype(spec.dtype)
            ):
                return None
            targets[path] = a
        return targets

    def _check_out(self, schema: dict[str, LeafSpec], targets: dict[str, np.ndarray]) -> None:
        """`out` must have exactly the model's leaves, each with the parameter's dtype and shape."""
        for path in targets:
            if path not in schema:
                raise InvalidArgumentError(f"model {self.name!r}: out leaf {path!r} is not a leaf of the model")
        for path, spec in schema.items():
            t = targets.get(path)
            if t is None:
                raise InvalidArgumentError(f"model {self.name!r}: out has no leaf {path!r}")
            if t.shape != spec.shape or t.dtype != dtypes.wire_dtype(spec.dtype):
                raise InvalidArgumentError(
                    f"model {self.name!r}: out leaf {path!r} is {t.dtype.name}{list(t.shape)}, the model's "
                    f"{spec.dtype}{list(spec.shape)}"
                )


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def _apart(payload: memoryview, slices: Any, targets: dict[str, np.ndarray]) -> memoryview:
    """A shared-memory reply's bytes, first copied aside when an `out=` target lies in the span other
    than exactly where the reply put its leaf (a region-backed `out` laid out for another layout):
    receiving into it would overwrite bytes not read yet. Otherwise the span itself (a target that
    is exactly there is not copied at all: `_IntoArrays.copy`)."""
    lo = _address(np.frombuffer(payload, dtype=np.uint8))
    hi = lo + len(payload)
    pos = 0
    for s in slices:
        t = targets.get(s.path)
        if t is not None:
            at = _address(t)
            if at < hi and at + t.nbytes > lo and at + int(s.offset) != lo + pos:
                return memoryview(bytes(payload))
        pos += int(s.length)
    return payload


def _copy_received(arrays: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> None:
    """Copies what was received apart from its target (another wire dtype) into it, converting."""
    for path, t in targets.items():
        a = arrays[path]
        if a.dtype != t.dtype or _address(a) != _address(t):
            np.copyto(t, a.reshape(t.shape), casting="unsafe")
