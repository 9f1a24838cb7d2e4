"""Pytrees <-> flat lists of (leaf path, numpy array), without importing jax or torch.

A leaf path is the "/"-joined list of keys from the root (`encoder/layers/0/kernel`); keys that
contain "/" or "%" are percent-escaped. `flatten` records a `Structure` so that `unflatten` rebuilds
the caller's containers (dicts, lists, tuples, namedtuples, None) and leaf types (numpy arrays and
scalars, Python numbers, jax arrays, torch tensors). jax and torch are imported only when the caller
handed us one of their arrays (or a pytree type only jax knows). A structure that was never seen
comes back as nested dicts (`nested_dicts`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optserve.client import treecode
from optserve.client.tables import TABLE_LEAVES


def escape_key(key: Any) -> str:
    text = str(key)
    return text.replace("%", "%25").replace("/", "%2F")


def unescape_key(text: str) -> str:
    return text.replace("%2F", "/").replace("%25", "%")


def join_path(prefix: str, key: Any) -> str:
    return f"{prefix}/{escape_key(key)}" if prefix else escape_key(key)


# ---------------------------------------------------------------------------------------------
# Leaves


def _module_of(x: Any) -> str:
    return type(x).__module__.split(".", 1)[0]


def leaf_kind(x: Any) -> str | None:
    """'numpy', 'npscalar', 'python', 'jax', 'torch', 'table' (an `Init` or `Rows`: kept as it is
    for the caller that sends it), or None if x is not a leaf."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if isinstance(x, TABLE_LEAVES):
        return "table"
    if isinstance(x, np.generic):
        return "npscalar"
    if isinstance(x, (bool, int, float)):
        return "python"
    mod = _module_of(x)
    if mod in ("jax", "jaxlib") and hasattr(x, "shape") and hasattr(x, "dtype"):
        return "jax"
    if mod == "torch" and hasattr(x, "detach"):
        return "torch"
    return None


def to_numpy(x: Any, kind: str) -> np.ndarray:
    """The leaf as a numpy array (no copy where the source allows it)."""
    if kind == "torch":
        import torch  # only reached when the caller passed a torch tensor

        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            import ml_dtypes

            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if kind == "python":
        return np.asarray(x, dtype=np.float32 if isinstance(x, float) else None)
    if kind == "table":
        return x  # type: ignore[no-any-return]  # the sender reads it (client.py, model.py)
    return np.asarray(x)


def from_numpy(a: np.ndarray, kind: str) -> Any:
    """Converts a pulled numpy array back into the leaf type the caller used."""
    if kind == "jax":
        import jax.numpy as jnp

        return jnp.asarray(a)
    if kind == "torch":
        import torch

        if a.dtype.name == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(a))
    if kind == "npscalar":
        return a[()]
    if kind == "python":
        return a.item()
    return a


# ---------------------------------------------------------------------------------------------
# Structure


@dataclass(frozen=True)
class Structure:
    """How to rebuild a pytree from its leaves, in flatten order."""

    node: Any
    paths: tuple[str, ...]
    # Its flatten and unflatten compiled (`treecode`) once it is used again: "uses", "flatten", ...
    compiled: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def fast(self, what: str) -> Any:
        """The compiled `what` ("flatten" or "unflatten") of this structure from its second use on
        (compiling costs about as much as one walk); None before, or when it cannot be compiled."""
        c = self.compiled
        if what in c:
            return c[what]
        uses = c.get(f"uses-{what}", 0) + 1
        c[f"uses-{what}"] = uses
        if uses < 2:
            return None
        if what == "flatten":
            c[what] = treecode.compile_flatten(self.node)
        else:
            c[what] = treecode.compile_unflatten(self.node, from_numpy, _rebuild_mapping)
        return c[what]


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _visit(x: Any, prefix: str, leaves: list[tuple[str, np.ndarray]]) -> Any:
    """Appends x's leaves to `leaves`; returns its structure node.

    A plain recursive function on purpose: a recursive closure is a reference cycle, which would
    keep every array it saw alive until the cyclic garbage collector happens to run.
    """
    kind = leaf_kind(x)
    if kind is not None:
        leaves.append((prefix, to_numpy(x, kind)))
        return ("leaf", kind)
    if x is None:
        return ("none",)
    if isinstance(x, Mapping):
        keys = sorted(x.keys(), key=lambda k: (str(type(k)), k))
        children = tuple(_visit(x[k], join_path(prefix, k), leaves) for k in keys)
        return ("dict", type(x), tuple(keys), children, tuple(x.keys()))  # last: the caller's order
    if _is_namedtuple(x):
        fields = type(x)._fields
        return ("namedtuple", type(x), tuple(_visit(getattr(x, f), join_path(prefix, f), leaves) for f in fields))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_visit(v, join_path(prefix, i), leaves) for i, v in enumerate(x)))
    if "jax" in sys.modules:  # a registered pytree node that only jax knows
        import jax

        flat, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
        if not (len(flat) == 1 and flat[0][1] is x):
            return ("jax", treedef, tuple(_visit(c, join_path(prefix, _jax_key(p[-1])), leaves) for p, c in flat))
    raise TypeError(f"cannot send a leaf of type {type(x).__name__} at {prefix or '<root>'!r}")


def flatten(tree: Any) -> tuple[list[tuple[str, np.ndarray]], Structure]:
    """Returns ([(path, numpy array)], structure). Dict keys are visited in sorted order, as jax does."""
    leaves: list[tuple[str, np.ndarray]] = []
    node = _visit(tree, "", leaves)
    if leaves and leaves[0][0] == "" and node[0] == "leaf":
        raise TypeError("a bare array is not a pytree of parameters: wrap it, e.g. {'w': array}")
    paths = [p for p, _ in leaves]
    if len(set(paths)) != len(paths):
        raise TypeError("two leaves map to the same path; use distinct keys")
    return leaves, Structure(node, tuple(paths))


_MISSING = object()  # not a leaf of any kind: a key the tree lacks


def flatten_as(tree: Any, structure: Structure, *, convert: bool = True) -> list[Any] | None:
    """The leaves of `tree` in the order of `structure` when `tree` has exactly that structure (the
    same containers with the same keys; leaves of any kind), else None (then `flatten` it). The fast
    path of a push or pull of a structure seen before: it skips what `flatten` recomputes, sorting
    keys and joining paths, and checks containers, not leaves.

    convert: the leaves as numpy arrays (as `flatten` gives them); False: the caller's own objects."""
    compiled = structure.fast("flatten")
    if compiled is not None:
        found = compiled(tree)
        return None if found is None else treecode.leaves_as_numpy(found, convert, leaf_kind, to_numpy)
    leaves: list[Any] = []
    try:
        ok = _match(structure.node, tree, leaves, convert)
    except (KeyError, IndexError, TypeError):
        return None
    return leaves if ok else None


def _match(node: Any, x: Any, leaves: list[Any], convert: bool) -> bool:
    """Appends x's leaves if x has the structure `node` (a plain recursive function: see `_visit`)."""
    tag = node[0]
    if tag == "leaf":
        if type(x) is np.ndarray or not convert:
            leaves.append(x)
            return leaf_kind(x) is not None if not convert else True
        kind = leaf_kind(x)
        if kind is None:
            return False
        leaves.append(to_numpy(x, kind))
        return True
    if tag == "dict":
        keys, children = node[2], node[3]
        if not isinstance(x, Mapping) or len(x) != len(keys):
            return False
        # get, not x[k]: a defaultdict must not grow a key it lacks
        return all(_match(c, x.get(k, _MISSING), leaves, convert) for k, c in zip(keys, children, strict=True))
    if tag == "none":
        return x is None
    if tag == "namedtuple":
        return type(x) is node[1] and all(_match(c, v, leaves, convert) for c, v in zip(node[2], x, strict=True))
    if tag in ("list", "tuple"):
        children = node[1]
        return (
            type(x).__name__ == tag
            and isinstance(x, (list, tuple))
            and len(x) == len(children)
            and all(_match(c, v, leaves, convert) for c, v in zip(children, x, strict=True))
        )
    return False  # a node only jax knows: `flatten` asks jax


def _jax_key(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _build(node: Any, it: Iterator[np.ndarray]) -> Any:
    """Rebuilds one node, taking leaves from `it` (a plain recursive function: see `_visit`)."""
    tag = node[0]
    if tag == "leaf":
        return next(it) if node[1] == "numpy" else from_numpy(next(it), node[1])
    if tag == "none":
        return None
    if tag == "dict":
        _, cls, keys, children, order = node
        d = dict(zip(keys, [_build(c, it) for c in children], strict=True))
        if order != keys:  # the caller's order, not the sorted one
            d = {k: d[k] for k in order}
        return d if cls is dict else _rebuild_mapping(cls, d)
    if tag == "namedtuple":
        _, cls, children = node
        return cls(*[_build(c, it) for c in children])
    if tag == "list":
        return [_build(c, it) for c in node[1]]
    if tag == "tuple":
        return tuple(_build(c, it) for c in node[1])
    if tag == "jax":
        _, treedef, children = node
        return treedef.unflatten([_build(c, it) for c in children])
    raise AssertionError(f"unknown node {tag}")


_CHILDREN_AT = {"dict": 3, "namedtuple": 2, "list": 1, "tuple": 1, "jax": 2}  # where _visit put them


def writable_leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
    """The leaves of `tree` as numpy arrays that write through to the caller's own (numpy arrays
    and CPU torch tensors, C-contiguous and writable); TypeError naming the first that is not."""
    leaves, structure = flatten(tree)
    kinds: list[str] = []
    _leaf_kinds(structure.node, kinds)
    for (path, a), kind in zip(leaves, kinds, strict=True):
        if kind not in ("numpy", "torch") or not (a.flags.writeable and a.flags.c_contiguous):
            what = f"a {kind} leaf" if kind not in ("numpy", "torch") else "not a writable C-contiguous array"
            raise TypeError(f"leaf {path!r} cannot be written in place ({what}); use numpy arrays or CPU torch tensors")
    return leaves


def _leaf_kinds(node: Any, kinds: list[str]) -> None:
    if node[0] == "leaf":
        kinds.append(node[1])
    elif node[0] in _CHILDREN_AT:
        for child in node[_CHILDREN_AT[node[0]]]:
            _leaf_kinds(child, kinds)


def unflatten(structure: Structure, leaves: Sequence[np.ndarray]) -> Any:
    """Rebuilds the pytree recorded in `structure` from leaves given in its path order."""
    compiled = structure.fast("unflatten")
    if compiled is not None:
        return compiled(leaves)
    return _build(structure.node, iter(leaves))


def _rebuild_mapping(cls: type, d: dict) -> Any:
    try:
        return cls(d)
    except TypeError:
        return d


def nested_dicts(items: Sequence[tuple[str, np.ndarray]]) -> dict:
    """Nested dicts from (path, array) pairs: the shape a client that never saw the tree gets."""
    root: dict = {}
    for path, value in items:
        keys = [unescape_key(k) for k in path.split("/")]
        node = root
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return root
