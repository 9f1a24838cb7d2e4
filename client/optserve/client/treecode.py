"""Flatten and unflatten of one known pytree structure, compiled into plain Python functions.

Walking a structure node by node costs about a microsecond per node in Python, which is most of the
client's time in a push or pull of thousands of small leaves. A structure used again (every training
step pushes and pulls the same one) is compiled instead: unflatten becomes one expression building
the containers (`{'w': L[0], 'b': L[1]}`), flatten one function that checks each container and reads
its children into locals, the way `dataclasses` and `attrs` generate their methods. Structures that
cannot be compiled (nodes only jax knows, nesting deeper than Python's parser takes) return None and
the caller walks them (`pytree.unflatten`, `pytree.flatten_as`).

Node formats are `pytree._visit`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

_MISSING = object()  # what a compiled flatten reads for a key the tree lacks: no leaf, no container


class _Source:
    """Python source being generated, with the objects it refers to by name."""

    def __init__(self) -> None:
        self.names: dict[str, Any] = {}
        self.lines: list[str] = []
        self.leaves = 0

    def ref(self, value: Any) -> str:
        """A literal for strings and ints, else a global name bound to `value`."""
        if type(value) in (str, int):
            return repr(value)
        name = f"_k{len(self.names)}"
        self.names[name] = value
        return name

    def build(self, fn: str) -> Callable | None:
        try:
            code = compile("\n".join(self.lines) + "\n", f"<optserve {fn}>", "exec")
            namespace = dict(self.names)
            exec(code, namespace)  # the source is ours: containers and keys are referred to by name
        except (RecursionError, SyntaxError, MemoryError, ValueError):
            return None
        return namespace[fn]


def compile_unflatten(node: Any, from_numpy: Callable[[np.ndarray, str], Any], rebuild: Callable) -> Callable | None:
    """A function (leaves in flatten order) -> the pytree of `node`; None if it cannot be compiled.
    from_numpy and rebuild: `pytree.from_numpy` and `pytree._rebuild_mapping`."""
    src = _Source()
    src.names.update(_from_numpy=from_numpy, _rebuild=rebuild)
    try:
        expr = _expr(node, src)
    except (RecursionError, _Uncompilable):
        return None
    src.lines = ["def unflatten(L):", f"    return {expr}"]
    return src.build("unflatten")


class _Uncompilable(Exception):
    pass


def _expr(node: Any, src: _Source) -> str:
    tag = node[0]
    if tag == "leaf":
        i = src.leaves
        src.leaves += 1
        return f"L[{i}]" if node[1] == "numpy" else f"_from_numpy(L[{i}], {node[1]!r})"
    if tag == "none":
        return "None"
    if tag == "dict":
        _, cls, keys, children, order = node
        by_key = {k: _expr(c, src) for k, c in zip(keys, children, strict=True)}  # leaves in sorted order
        body = "{" + ", ".join(f"{src.ref(k)}: {by_key[k]}" for k in order) + "}"  # the caller's order
        return body if cls is dict else f"_rebuild({src.ref(cls)}, {body})"
    if tag == "namedtuple":
        return f"{src.ref(node[1])}(" + ", ".join(_expr(c, src) for c in node[2]) + ")"
    if tag == "list":
        return "[" + ", ".join(_expr(c, src) for c in node[1]) + "]"
    if tag == "tuple":
        items = [_expr(c, src) for c in node[1]]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    raise _Uncompilable(tag)  # "jax": a treedef only jax can rebuild


def compile_flatten(node: Any) -> Callable[[Any], list[Any] | None] | None:
    """A function tree -> its leaves (the caller's objects, in flatten order) when `tree` has the
    containers and keys of `node`, else None; None if `node` cannot be compiled."""
    src = _Source()
    src.names.update(_Mapping=Mapping, _M=_MISSING)
    src.lines = ["def flatten(n0):"]
    leaves: list[str] = []
    try:
        _check(node, "n0", src, leaves, [0])
    except (RecursionError, _Uncompilable):
        return None
    src.lines.append("    return [" + ", ".join(leaves) + "]")
    return src.build("flatten")


def _check(node: Any, var: str, src: _Source, leaves: list[str], counter: list[int]) -> None:
    """Appends the lines that check `var` against `node` and read its children into fresh locals."""
    tag = node[0]
    out = src.lines.append

    def child(expr: str) -> str:
        counter[0] += 1
        name = f"n{counter[0]}"
        out(f"    {name} = {expr}")
        return name

    if tag == "leaf":
        leaves.append(var)
    elif tag == "none":
        out(f"    if {var} is not None: return None")
    elif tag == "dict":
        keys, children = node[2], node[3]
        # `type is dict` first: an ABC's isinstance costs half a microsecond
        mapping = f"(type({var}) is dict or isinstance({var}, _Mapping))"
        out(f"    if not {mapping} or len({var}) != {len(keys)}: return None")
        for k, c in zip(keys, children, strict=True):
            _check(c, child(f"{var}.get({src.ref(k)}, _M)"), src, leaves, counter)  # get: no defaultdict grows
    elif tag == "namedtuple":
        out(f"    if type({var}) is not {src.ref(node[1])}: return None")
        for i, c in enumerate(node[2]):
            _check(c, child(f"{var}[{i}]"), src, leaves, counter)
    elif tag in ("list", "tuple"):
        out(f"    if type({var}) is not {tag} or len({var}) != {len(node[1])}: return None")
        for i, c in enumerate(node[1]):
            _check(c, child(f"{var}[{i}]"), src, leaves, counter)
    else:
        raise _Uncompilable(tag)


def leaves_as_numpy(
    leaves: Sequence[Any], convert: bool, leaf_kind: Callable[[Any], str | None], to_numpy: Callable
) -> list[Any] | None:
    """Checks that every item of a compiled flatten's result is a leaf (not a container where the
    structure has a leaf); converts them to numpy arrays with `convert`. None if one is not a leaf."""
    result = list(leaves)
    if set(map(type, result)) <= {np.ndarray}:  # the usual case, checked without a Python loop
        return result
    for i, a in enumerate(result):
        if type(a) is np.ndarray:
            continue
        kind = leaf_kind(a)
        if kind is None:
            return None
        if convert:
            result[i] = to_numpy(a, kind)
    return result
