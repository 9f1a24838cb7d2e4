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

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

_MISSING = object()  # what a compiled flatten reads for a key the tree lacks: no leaf, no container


class _Source:
    """Python source being generated, with the objects it refers to by name."""

    def __init__(self) -> None:
        self.names: dict[str, Any] = {}
        self._named: dict[int, str] = {}  # id of an object -> its name
        self.lines: list[str] = []
        self.leaves = 0

    def ref(self, value: Any) -> str:
        """A literal for strings and ints, else a global name bound to `value`."""
        if type(value) in (str, int):
            return repr(value)
        if value is dict or value is list or value is tuple:
            return value.__name__
        name = self._named.get(id(value))
        if name is None:
            name = self._named[id(value)] = f"_k{len(self.names)}"
            self.names[name] = value  # kept alive here, so its id is not reused meanwhile
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
    containers and keys of `node`, else None (a leaf the tree lacks comes back as a non-leaf, which
    `leaves_as_numpy` refuses); None if `node` cannot be compiled.

    Two expressions and no statement per node (Python compiles a function of thousands of
    statements slowly, and its time grows with the source's size): the checks of every container's
    type and size, joined by `and` so that nothing is read from a node of another type (a defaultdict
    must not grow a key it lacks: keys are read with `get`), then the list of the leaves. A container
    is read once per expression, into the local of its depth (`(n2 := n1.get('k', _M))`), where its
    first descendant reads it; expressions run left to right, so later siblings find it bound."""
    src = _Source()
    src.names["_M"] = _MISSING
    checks: list[str] = []
    leaves: list[str] = []
    try:
        _emit(node, "t", True, 0, src, checks, checking=True)
        _emit(node, "t", True, 0, src, leaves, checking=False)
    except (RecursionError, _Uncompilable):
        return None
    src.lines = [
        "def flatten(t):",
        "    try:",
        f"        if not ({' and '.join(checks) or 'True'}): return None",
        f"        return [{', '.join(leaves)}]",
        "    except (TypeError, AttributeError, IndexError, KeyError):",  # not the container expected
        "        return None",
    ]
    return src.build("flatten")


def _emit(node: Any, ref: str, bound: bool, depth: int, src: _Source, out: list[str], *, checking: bool) -> None:
    """Appends the expressions of `node` to `out`: its checks, or its leaves. `ref` reads the node: a
    bound local, or (bound False) the expression its first use binds to the local of its depth."""
    tag = node[0]
    if tag == "leaf":
        if not checking:
            out.append(ref)
        return
    if tag == "none":
        if checking:
            out.append(f"{ref} is None")
        return
    if tag == "dict":
        cls = node[1]
        children = [(f".get({src.ref(k)}, _M)", c) for k, c in zip(node[2], node[3], strict=True)]
    elif tag == "namedtuple":
        cls, children = node[1], [(f"[{i}]", c) for i, c in enumerate(node[2])]
    elif tag in ("list", "tuple"):
        cls, children = (list if tag == "list" else tuple), [(f"[{i}]", c) for i, c in enumerate(node[1])]
    else:
        raise _Uncompilable(tag)
    var = ref if bound else f"n{depth}"
    first = var if bound else f"({var} := {ref})"  # until an expression has read it
    if checking:
        out.extend((f"type({first}) is {src.ref(cls)}", f"len({var}) == {len(children)}"))
        first = var
    for access, child in children:
        before = len(out)
        _emit(child, first + access, False, depth + 1, src, out, checking=checking)
        if len(out) > before:
            first = var


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
