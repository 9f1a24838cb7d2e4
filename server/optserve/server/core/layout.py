"""How a model's leaves are held on the device: a few flat buffers of many leaves each, and the
leaves that keep their own shape (docs/design.md, "Packed layouts").

A model of 5,000 small leaves compiled leaf by leaf costs XLA minutes and every push thousands of
small operations; held as a few buffers, it costs what one leaf of the same bytes costs. The leaves
that the spec treats alike (spec/packing.py, `signatures`) and that share a dtype are packed, in
schema order, into buffers of at most PACK_MAX_BYTES; everything else is *loose* (kept as itself):
leaves a rule needs whole (LAMB, centralize, ...), large leaves (no per-leaf cost worth saving, and
a copy saved on both ends), leaves alone in their group, non-float leaves (not trained),
bfloat16 and float16 leaves under a global norm (optax sums their squares in their own dtype, so
another order would differ by a half-precision ulp), and scalars (rank 0: XLA compiles their
arithmetic as scalar code, which may round a division or a square root of Adam's differently from
the same arithmetic over an array, by one ulp; measured on 11 of the 130 conformance cases).

Every group of packed leaves is split into at least two buffers. Not for speed: XLA's algebraic
simplifier rewrites `x / s` as `x * (1 / s)` when the scalar `s` has a single consumer, so an Adam
whose bias correction feeds one buffer rounds differently from the same Adam over many leaves (one
ulp in a few elements); with two buffers or more, packed and unpacked agree bit for bit.

The layout is fixed at creation; checkpoints, downloads and `info()` stay keyed by leaf path
(`StateMap` converts optimizer and EMA state between the two forms).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from optserve.server.spec import CompiledOptimizer, ema
from optserve.server.spec.packing import for_buffers, reduces, signatures
from optserve.wire.dtypes import DTYPES, FLOAT_DTYPES, LeafSpec, leaf_nbytes
from optserve.wire.packing import Pack

PACK_LEAF_MAX_BYTES = 1 << 20  # leaves from this size on stay loose: their per-leaf cost is negligible
PACK_MAX_BYTES = 64 << 20  # a buffer holds at most this much (one leaf below the limit may overshoot)
MIN_PACK_LEAVES = 4  # a group of fewer alike leaves stays loose (two buffers of one leaf gain nothing)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each leaf of a model lives: in one of `packs`, or as itself (`loose`).

    keys: every buffer the model holds, packs first, then loose leaves in schema order.
    trainable: the keys the update rule sees (packs and loose float leaves).
    paths: every leaf, in schema order.
    """

    packs: tuple[Pack, ...]
    loose: tuple[str, ...]
    trainable: tuple[str, ...]
    paths: tuple[str, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return (*(p.name for p in self.packs), *self.loose)

    @functools.cached_property
    def pack_named(self) -> dict[str, Pack]:
        """Pack name -> pack."""
        return {p.name: p for p in self.packs}

    @functools.cached_property
    def pack_of(self) -> dict[str, tuple[Pack, int]]:
        """Leaf path -> its pack and its index there, for packed leaves."""
        return {leaf: (p, i) for p in self.packs for i, leaf in enumerate(p.leaves)}

    def members(self) -> dict[str, list[str]]:
        """Trainable key -> the leaves it holds (a loose leaf holds itself)."""
        packs = {p.name: list(p.leaves) for p in self.packs}
        return {k: packs.get(k, [k]) for k in self.trainable}

    def storage_schema(self, schema: Sequence[LeafSpec]) -> list[LeafSpec]:
        """The buffers as wire leaves: each pack as [elements], loose leaves as they are."""
        by_path = {leaf.path: leaf for leaf in schema}
        return [*(p.spec for p in self.packs), *(by_path[k] for k in self.loose)]

    def pack_arrays(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays by leaf path -> by key (each pack gathered with one copy; loose ones as given)."""
        out: dict[str, np.ndarray] = {p.name: p.gather(arrays) for p in self.packs}
        out.update((k, arrays[k]) for k in self.loose)
        return out

    def leaf_arrays(self, buffers: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays by key -> by leaf path (views of the packs: no copy)."""
        out: dict[str, np.ndarray] = {}
        for p in self.packs:
            out.update(p.views(buffers[p.name]))
        out.update((k, buffers[k]) for k in self.loose)
        return {k: out[k] for k in self.paths}


def unpacked(schema: Sequence[LeafSpec]) -> Layout:
    """The layout that packs nothing (every leaf as itself)."""
    paths = tuple(leaf.path for leaf in schema)
    return Layout((), paths, tuple(leaf.path for leaf in schema if leaf.dtype in FLOAT_DTYPES), paths)


def plan_layout(
    schema: Sequence[LeafSpec],
    compiled: CompiledOptimizer,
    *,
    leaf_max_bytes: int = PACK_LEAF_MAX_BYTES,
    pack_max_bytes: int = PACK_MAX_BYTES,
) -> Layout:
    """The layout of a model (module docstring): alike small float leaves of one dtype packed in
    schema order, at least two buffers per group, each at most `pack_max_bytes`."""
    sigs = signatures(compiled)
    groups: dict[tuple, list[LeafSpec]] = {}
    for leaf in schema:
        sig = sigs.get(leaf.path)
        nbytes = leaf_nbytes(DTYPES[leaf.dtype], leaf.shape)
        # a global norm over half-precision leaves is summed in their dtype leaf by leaf (optax):
        # packed, the same sum in another order would differ by a half-precision ulp, not float32's
        half = leaf.dtype != "float32" and sig is not None and reduces(sig)
        if sig is not None and nbytes < leaf_max_bytes and leaf.shape and not half:
            groups.setdefault((sig, leaf.dtype), []).append(leaf)
    taken = {leaf.path for leaves in groups.values() if len(leaves) >= MIN_PACK_LEAVES for leaf in leaves}
    names = _names({leaf.path for leaf in schema})
    packs: list[Pack] = []
    for leaves in groups.values():
        if len(leaves) < MIN_PACK_LEAVES:
            continue
        for part in _split(leaves, pack_max_bytes):
            packs.append(Pack(next(names), part[0].dtype, tuple(x.path for x in part), tuple(x.shape for x in part)))
    loose = tuple(leaf.path for leaf in schema if leaf.path not in taken)
    float_loose = tuple(leaf.path for leaf in schema if leaf.path not in taken and leaf.dtype in FLOAT_DTYPES)
    paths = tuple(leaf.path for leaf in schema)
    return Layout(tuple(packs), loose, (*(p.name for p in packs), *float_loose), paths)


def _split(leaves: list[LeafSpec], max_bytes: int) -> list[list[LeafSpec]]:
    """Consecutive runs of `leaves` of about equal bytes: at least two, each about <= max_bytes."""
    sizes = [leaf_nbytes(DTYPES[x.dtype], x.shape) for x in leaves]
    total = sum(sizes)
    count = min(len(leaves), max(2, math.ceil(total / max_bytes)))
    parts: list[list[LeafSpec]] = [[]]
    done = 0
    for leaf, size in zip(leaves, sizes, strict=True):
        # start the next part once this one holds its share (and leaves remain for the others)
        if parts[-1] and done >= total * len(parts) / count and len(parts) < count:
            parts.append([])
        parts[-1].append(leaf)
        done += size
    if len(parts) < 2:  # all bytes in the first leaves (zero-size ones after): split by count
        half = len(leaves) // 2
        parts = [leaves[:half], leaves[half:]]
    return parts


def _names(taken: set[str]):
    """Pack names that are no leaf path: "@pack0", "@pack1", ... (more "@" if a leaf has the name)."""
    prefix = "@pack"
    while any(p.startswith(prefix) for p in taken):
        prefix = "@" + prefix
    i = 0
    while True:
        yield f"{prefix}{i}"
        i += 1


# ---------------------------------------------------------------------------------------------
# optimizer and EMA state: by buffer on the device, by leaf in checkpoints


def key_part(k: Any) -> str:
    """One step of a pytree key path as text (DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_keys(tree: Any) -> list[tuple[str, ...]]:
    """The key path of every leaf of a pytree, as text parts, in leaf order."""
    return [tuple(key_part(k) for k in path) for path, _ in jax.tree.flatten_with_path(tree)[0]]


@dataclasses.dataclass(frozen=True)
class StateMap:
    """How the leaves of a state pytree over buffers (the optimizer state, the EMA) correspond to
    the leaves of the same state over leaves, which checkpoints hold.

    entries: per leaf of the buffer form, in its leaf order: (its key path, the key paths of the
        leaf form it holds back to back, their shapes). A leaf that is not per-parameter (a count,
        a hyperparameter) or belongs to a loose leaf holds exactly one, of its own shape.
    """

    entries: tuple[tuple[tuple[str, ...], tuple[tuple[str, ...], ...], tuple[tuple[int, ...], ...]], ...]
    order: tuple[tuple[str, ...], ...]  # the leaf form's key paths, in its leaf order
    treedef: Any  # the buffer form's pytree structure

    @functools.cached_property
    def names(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """The leaf form's `/`-joined key paths (as checkpoints name them), in its order: the buffer
        form's leaf that holds each, and its shape."""
        where = {
            path: (i, shape)
            for i, (_, paths, shapes) in enumerate(self.entries)
            for path, shape in zip(paths, shapes, strict=True)
        }
        return {"/".join(path): where[path] for path in self.order}

    def check(self, arrays: Mapping[str, np.ndarray], dtypes: Sequence[frozenset], group: str) -> str:
        """What is wrong with `arrays` as this state's leaf form, a message naming `group` and the
        leaf ("" when nothing): every leaf present with its shape and one of the dtypes `dtypes`
        allows for the buffer-form leaf holding it, and nothing else."""
        names = self.names
        missing = next((n for n in names if n not in arrays), None)
        if missing is not None:
            return f"{group}: missing leaf {missing!r}"
        extra = next((n for n in arrays if n not in names), None)
        if extra is not None:
            return f"{group}: unexpected leaf {extra!r}"
        for name, (i, shape) in names.items():
            a = arrays[name]
            if tuple(a.shape) != shape or a.dtype not in dtypes[i]:
                want = "|".join(sorted(d.name for d in dtypes[i]))
                return f"{group} leaf {name!r}: expected {want}{list(shape)}, got {a.dtype}{list(a.shape)}"
        return ""

    def to_leaves(self, buffers: Sequence[np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
        """Host leaves of the buffer form (in its leaf order) -> by key path of the leaf form (views),
        in the leaf form's order."""
        out: dict[tuple[str, ...], np.ndarray] = {}
        for (_, paths, shapes), a in zip(self.entries, buffers, strict=True):
            if len(paths) == 1 and a.shape == shapes[0]:
                out[paths[0]] = a
                continue
            flat, start = a.reshape(-1), 0
            for path, shape in zip(paths, shapes, strict=True):
                n = math.prod(shape)
                out[path] = flat[start : start + n].reshape(shape)
                start += n
        return {path: out[path] for path in self.order}

    def to_buffers(self, leaves: Mapping[tuple[str, ...], np.ndarray]) -> list[np.ndarray]:
        """Host leaves by key path of the leaf form -> the buffer form's leaves, in its order (each
        buffer gathered with one copy)."""
        out = []
        for key, paths, _ in self.entries:
            if paths == (key,):  # a loose leaf, or state that is not per-parameter: itself
                out.append(leaves[key])
                continue
            # a pack, 1-D, even when it holds a single leaf (whose own shape is not the buffer's)
            out.append(np.concatenate([leaves[p].reshape(-1) for p in paths]))
        return out


def state_map(buffer_tree: Any, leaf_tree: Any, layout: Layout) -> StateMap | None:
    """The StateMap between the same state over buffers and over leaves (shapes suffice, e.g.
    jax.eval_shape results), or None when they do not correspond leaf for leaf (a rule whose state
    is not per-parameter in the way the layout assumed; `leaf_tree` None): then the model must not
    be packed."""
    if leaf_tree is None:
        return None
    packs = layout.pack_named
    order = leaf_keys(leaf_tree)
    wanted = dict(zip(order, (tuple(x.shape) for x in jax.tree.leaves(leaf_tree)), strict=True))
    entries = []
    covered: set[tuple[str, ...]] = set()
    for path, x in zip(leaf_keys(buffer_tree), jax.tree.leaves(buffer_tree), strict=True):
        at = [i for i, part in enumerate(path) if part in packs]
        paths: tuple[tuple[str, ...], ...]
        shapes: tuple[tuple[int, ...], ...]
        if not at:
            paths, shapes = (path,), (tuple(x.shape),)
        else:
            pack = packs[path[at[0]]]
            if len(at) > 1 or tuple(x.shape) != (pack.elements,):
                return None
            paths = tuple((*path[: at[0]], leaf, *path[at[0] + 1 :]) for leaf in pack.leaves)
            shapes = pack.shapes
        if any(wanted.get(p) != s for p, s in zip(paths, shapes, strict=True)):
            return None
        covered.update(paths)
        entries.append((path, paths, shapes))
    if covered != set(wanted) or len(order) != len(wanted):
        return None
    return StateMap(tuple(entries), tuple(order), jax.tree.structure(buffer_tree))


class _Shaped:
    """A leaf's shape and dtype (what leaf_form needs of jax.ShapeDtypeStruct, built 20x faster)."""

    __slots__ = ("dtype", "shape")

    def __init__(self, shape: tuple[int, ...], dtype: Any):
        self.shape, self.dtype = shape, dtype


def leaf_form(tree: Any, layout: Layout) -> Any:
    """The leaf form of a state pytree over the layout's buffers (shapes, e.g. jax.eval_shape
    results): each dict entry of a pack becomes one entry per leaf of the pack, of the leaf's shape
    (an entry without leaves, such as optax's MaskedNode, is repeated). None when an entry of a pack
    is not one value per element of the pack: that state does not map leaf for leaf.

    Derived, not traced: tracing the optimizer's init over thousands of leaves is what packing saves
    (seconds per model at creation and at restore)."""
    packs = layout.pack_named

    class Unmapped(Exception):
        pass

    def holds_pack(x: Any) -> bool:
        return isinstance(x, dict) and any(k in packs for k in x)

    def expand(x: Any) -> Any:
        if not holds_pack(x):
            return x
        out = {}
        for k, v in x.items():
            pack = packs.get(k)
            if pack is None:
                out[k] = v
            elif not jax.tree.leaves(v):
                out.update((leaf, v) for leaf in pack.leaves)
            elif isinstance(v, jax.ShapeDtypeStruct) and v.shape == (pack.elements,):
                out.update(
                    (leaf, jax.ShapeDtypeStruct(s, v.dtype)) for leaf, s in zip(pack.leaves, pack.shapes, strict=True)
                )
            else:
                raise Unmapped
        return out

    try:
        return jax.tree.map(expand, tree, is_leaf=holds_pack)
    except Unmapped:
        return None


@dataclasses.dataclass(frozen=True)
class Packing:
    """A model's layout with what it needs beside it: the optimizer for its buffers, its state's
    shapes, and the maps of its optimizer and EMA state between buffer form and leaf form."""

    layout: Layout
    optimizer: CompiledOptimizer  # the model's spec, with masks and partitions over the buffers
    shapes: dict[str, jax.ShapeDtypeStruct]  # the trainable buffers
    opt_shapes: Any  # the optimizer state over the buffers after init (jax.eval_shape)
    opt_map: StateMap
    ema_map: StateMap | None  # None: the model keeps no parameter EMA
    ema_shapes: Any  # the EMA state over the buffers (jax.eval_shape); None without an EMA

    @property
    def opt_bytes(self) -> int:
        """Bytes of the optimizer state (what init allocates)."""
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(self.opt_shapes))

    @property
    def state_bytes(self) -> int:
        """Bytes of the optimizer state and of the parameter EMA, if the model keeps one."""
        leaves = jax.tree.leaves(self.ema_shapes)  # [] without an EMA
        return self.opt_bytes + sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)

    @functools.cached_property
    def opt_dtypes(self) -> tuple[frozenset, ...]:
        """Per leaf of the optimizer state's buffer form, the dtypes a checkpoint may hold it in: its
        dtype after init and after one update (some rules change it at the first update: adam's
        moments of a bfloat16 parameter become float32)."""
        after = jax.eval_shape(lambda s, g: self.optimizer.update(g, s, g)[1], self.opt_shapes, self.shapes)
        init = jax.tree.leaves(self.opt_shapes)
        structure: Any = jax.tree.structure(self.opt_shapes)  # Any: jax's stubs leave PyTreeDef unresolved (no ==)
        if jax.tree.structure(after) != structure:
            return tuple(frozenset({x.dtype}) for x in init)
        return tuple(frozenset({x.dtype, y.dtype}) for x, y in zip(init, jax.tree.leaves(after), strict=True))

    @functools.cached_property
    def ema_dtypes(self) -> tuple[frozenset, ...]:
        """Per leaf of the EMA state's buffer form, its dtype (empty: the model keeps no EMA)."""
        return tuple(frozenset({x.dtype}) for x in jax.tree.leaves(self.ema_shapes))


def plan_packing(
    schema: Sequence[LeafSpec], compiled: CompiledOptimizer, *, keeps_ema: bool, enabled: bool = True
) -> Packing:
    """The layout of a new model and its maps; falls back to `unpacked` when packing gains nothing
    or its state does not map leaf for leaf (checked on shapes only: nothing is allocated)."""
    by_leaf = {x.path: jax.ShapeDtypeStruct(x.shape, DTYPES[x.dtype]) for x in schema}
    planned = plan_layout(schema, compiled) if enabled else unpacked(schema)
    for layout in (planned, unpacked(schema)) if planned.packs else (planned,):
        optimizer = for_buffers(compiled, layout.members()) if layout.packs else compiled
        shapes = {p.name: jax.ShapeDtypeStruct((p.elements,), DTYPES[p.dtype]) for p in layout.packs}
        shapes.update((k, by_leaf[k]) for k in layout.trainable if k in by_leaf)
        opt = jax.eval_shape(optimizer.init, shapes)
        opt_map = state_map(opt, leaf_form(opt, layout), layout)
        ema_map = ema_state = None
        if keeps_ema:
            ema_state = jax.eval_shape(ema.ema_init, shapes)
            ema_map = state_map(ema_state, leaf_form(ema_state, layout), layout)
        if opt_map is not None and (ema_map is not None or not keeps_ema):
            return Packing(layout, optimizer, shapes, opt, opt_map, ema_map, ema_state)
    raise AssertionError("the unpacked layout maps every state leaf to itself")
