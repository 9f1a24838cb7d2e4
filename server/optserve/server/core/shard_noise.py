"""Noise rules on a shard: the whole model's key split, whatever shard runs it (docs/design.md,
"Shards").

optax.add_noise, and every rule built on it (noisy_sgd, the Axon and Polaris presets), splits its
key into one key per leaf of the tree it is given, in the tree's order, and draws each leaf's
noise from that leaf's key and shape. An unsharded model gives it a dict of buffers keyed by leaf
path (core/step.py) in which only the float leaves that reach the rule (its partition group, its
mask) are arrays: every other entry is optax's MaskedNode, which has no leaves, and packs never
reach it (spec/packing.py keeps every leaf of a noise rule loose). JAX flattens a dict in sorted
key order, so leaf i of the rule is the i-th of those paths, sorted, packed layout or not.

On a shard the same rule is given its leaves only, so `keyed_over_model` presents it with the
whole model's tree instead: the shard's leaves where they are, a split leaf's rows put back at
their place in a zero leaf of the whole shape, and every other leaf as a scalar zero. The key is
then split over the whole model's leaves in the whole model's order, each leaf of the shard gets
the unsharded model's key and noise, a split leaf the rows start..stop of it (the whole leaf's
noise is drawn on each shard holding a piece of it, and sliced: the cost of that one leaf's
noise, not of the model's), and the rule's state (count, key: no per-leaf state) advances as the
unsharded model's does, so it is equal bit for bit on every shard (wire/resharding.py requires it
of replicated tensors). A scalar stands in for a leaf another shard holds because a leaf's noise
depends on its key and its own shape only. The rule runs between optimization barriers, sharded or
not (spec/rng.py), and its whole output is kept whole until the rows are taken, so XLA compiles the
same computation over the same shapes on a shard as on the unsharded model: bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optserve.server.spec import CompiledOptimizer
from optserve.server.spec import packing as spec_packing
from optserve.server.spec.compiler import ComboNode, Node, PartitionNode, RuleNode
from optserve.wire.dtypes import DTYPES, FLOAT_DTYPES, LeafSpec


@dataclass(frozen=True)
class ModelLeaves:
    """What a noise rule of the whole model is given: `paths` in the whole model's order, each
    leaf's whole `specs`, and for this shard's split leaves the first row of its piece (`starts`)."""

    paths: tuple[str, ...]
    specs: Mapping[str, LeafSpec]
    starts: Mapping[str, int]


def for_shard(compiled: CompiledOptimizer, schema: Sequence[LeafSpec], starts: Mapping[str, int]) -> CompiledOptimizer:
    """`compiled` (over the whole model's `schema`) with every noise rule keyed over the whole
    model (`keyed_over_model`); `starts`: the first row of each leaf this shard holds a piece of."""
    specs = {leaf.path: leaf for leaf in schema if leaf.dtype in FLOAT_DTYPES}
    floats = [path for path in compiled.leaf_paths if path in specs]

    def visit(node: Node, leaves: list[str]) -> Node:
        if isinstance(node, RuleNode):
            if not spec_packing.splits_key_over_leaves(node.rule):
                return node
            if node.mask is not None and node.rule.mask == "wrap":
                leaves = [leaf for leaf in leaves if node.mask[leaf]]
            # JAX's order of a dict's entries (sorted keys), as the unsharded model's tree has them
            order = tuple(jax.tree.leaves({path: path for path in leaves}))
            model = ModelLeaves(order, {p: specs[p] for p in order}, {p: starts[p] for p in order if p in starts})
            build = functools.partial(_built_over_model, node.rule.build, model)
            return dataclasses.replace(node, rule=dataclasses.replace(node.rule, build=build))
        if isinstance(node, ComboNode):  # chain and its aliases: every member gets every leaf
            return dataclasses.replace(node, children=[visit(child, leaves) for child in node.children])
        assert isinstance(node, PartitionNode)
        groups = [
            (globs, visit(child, [leaf for leaf in leaves if int(node.labels[leaf]) == i]))
            for i, (globs, child) in enumerate(node.groups)
        ]
        return dataclasses.replace(node, groups=groups)

    return CompiledOptimizer(compiled.spec, visit(compiled.root, floats), compiled.slots, compiled.leaf_paths)


def _built_over_model(build: Callable[..., Any], model: ModelLeaves, **kwargs: Any) -> optax.GradientTransformation:
    return keyed_over_model(build(**kwargs), model)


def keyed_over_model(inner: optax.GradientTransformation, model: ModelLeaves) -> optax.GradientTransformation:
    """`inner` (a noise rule) run on a shard's tree as if on the whole model's (module docstring)."""

    def init(params: Any) -> Any:
        return inner.init(_whole(params, model)[0])

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        whole, treedef, paths = _whole(updates, model)
        out, new_state = inner.update(whole, state, None if params is None else _whole(params, model)[0])
        # the rule's output whole, as the unsharded model computes it, before the rows are taken: the
        # same program over the same shape (XLA's code for another shape may round a last bit otherwise)
        out = jax.lax.optimization_barrier(out)
        mine = [_rows(out[path], model.starts.get(path), leaf) for path, leaf in paths]
        return jax.tree.unflatten(treedef, mine), new_state

    return optax.GradientTransformation(init, update)


def _whole(tree: Any, model: ModelLeaves) -> tuple[dict[str, Any], Any, list[tuple[str, Any]]]:
    """The whole model's tree for a shard's `tree` (a dict by leaf path; masked entries have no
    leaves), its treedef, and its (path, leaf) pairs."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    whole: dict[str, Any] = {}
    paths: list[tuple[str, Any]] = []
    for keys, leaf in flat:
        path = keys[0].key if len(keys) == 1 and isinstance(keys[0], jax.tree_util.DictKey) else None
        # for_shard gives the rule every leaf it reaches in the whole model: a shard's are among them
        if not isinstance(path, str) or path not in model.specs:
            raise AssertionError(f"a shard's noise rule was given {jax.tree_util.keystr(keys)}, not a leaf it reaches")
        start = model.starts.get(path)
        if start is not None:  # this shard's rows of a split leaf, at their place in the whole leaf
            after = model.specs[path].shape[0] - start - leaf.shape[0]
            padding = [(start, after, 0)] + [(0, 0, 0)] * (leaf.ndim - 1)
            whole[path] = jax.lax.pad(leaf, jnp.zeros((), leaf.dtype), padding)
        else:
            whole[path] = leaf
        paths.append((path, leaf))
    for path in model.paths:
        if path not in whole:  # another shard's leaf: only its key matters here
            whole[path] = jnp.zeros((), DTYPES[model.specs[path].dtype])
    return whole, treedef, paths


def _rows(x: jax.Array, start: int | None, piece: Any) -> jax.Array:
    """This shard's rows of a whole leaf's update `x` (all of it when the shard holds it whole)."""
    return x if start is None else jax.lax.slice_in_dim(x, start, start + piece.shape[0], axis=0)
