"""Which leaves a spec treats alike, so that the server may run it on flat buffers of many leaves
(docs/optimizers.md, "Packed layouts"; docs/design.md, "Packed layouts").

Every rule is one of three kinds (`packing_of`):

- "elementwise": each element's new value depends on that element and on scalars shared by all
  leaves (the count, hyperparameters, schedules): Adam, SGD, RMSProp, every Flux rule but ClipNorm.
  On a buffer that holds several leaves back to back it computes, element for element, what it
  computes on each leaf: packed and unpacked agree bit for bit.
- "global": a reduction over every leaf it is given, then element-wise work (clip_by_global_norm):
  the same sum over the same elements, added in another order: agreement to float32 rounding.
- "leaf": the rule needs each leaf's own shape or a per-leaf statistic (LAMB's and LARS's trust
  ratio, centralize's per-leaf mean, clip_by_leaf_norm, a leaf's own noise key) or is a custom
  transform we cannot inspect: its leaves keep their shape.

A leaf may be packed with another when every rule it passes through (its partition group's rules,
in a partition) is "elementwise" or "global", and the two are alike for each of them: the same
partition group and the same mask values (`signatures`). The layout itself is the server's
(core/layout.py); `relabel` turns masks and partitions over leaves into masks and partitions over
the layout's buffers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from optserve.server.spec.compiler import ComboNode, CompiledOptimizer, Node, RuleNode
from optserve.server.spec.registry import Rule
from optserve.server.spec.rng import KEY_PER_LEAF

ELEMENTWISE, GLOBAL, LEAF = "elementwise", "global", "leaf"

# Rules that reduce over every leaf they are given (then scale element-wise).
_GLOBAL = frozenset({"clip_by_global_norm", "axon:clip_by_global_norm", "polaris:clip_by_global_norm"})
# Rules that need each leaf as a leaf: per-leaf norms (trust ratios, leaf-norm clipping), per-leaf means
# (centralize), per-leaf random keys (optax.add_noise splits its key once per leaf).
_PER_LEAF = frozenset(
    {
        "lamb",
        "lars",
        "scale_by_trust_ratio",
        "clip_by_leaf_norm",
        "centralize",
        "noisy_sgd",
        # lazy rules (spec/lazy.py): a table must keep its rows to be updated row by row
        "lazy_adam",
        "rowwise_adagrad",
        "sparse_sgd",
        "add_noise",
        "flux:clipnorm",
        "objax:lars",
        *(f"{lib}:{name}" for lib in ("axon", "polaris") for name in ("lamb", "noisy_sgd", "add_noise")),
        *(f"{lib}:{name}" for lib in ("axon", "polaris") for name in ("centralize", "scale_by_trust_ratio")),
    }
)


def rules_of(compiled: CompiledOptimizer) -> list[Rule]:
    """Every rule of the spec, in spec order (inside chains and partitions)."""
    out: list[Rule] = []

    def visit(node: Node) -> None:
        if isinstance(node, RuleNode):
            out.append(node.rule)
        elif isinstance(node, ComboNode):
            for child in node.children:
                visit(child)
        else:
            for _, child in node.groups:
                visit(child)

    visit(compiled.root)
    return out


def splits_key_over_leaves(rule: Rule) -> bool:
    """Whether `rule` splits one random key over the leaves it is given, in their order (noise)."""
    return rule.kind != "custom" and rule.name in KEY_PER_LEAF


def needs_whole(compiled: CompiledOptimizer) -> set[str]:
    """Leaves that pass through a LEAF rule needing the leaf whole: a per-leaf norm or mean, a
    lazy rule, a custom transform. A noise rule alone does not: its noise for rows start..stop of a
    leaf is those rows of the whole leaf's noise (core/shard_noise.py)."""

    def passes(node: Node, leaf: str) -> bool:
        if isinstance(node, RuleNode):
            return packing_of(node.rule) == LEAF and not splits_key_over_leaves(node.rule)
        if isinstance(node, ComboNode):
            return any(passes(child, leaf) for child in node.children)
        return passes(node.groups[int(node.labels[leaf])][1], leaf)

    return {leaf for leaf in compiled.leaf_paths if passes(compiled.root, leaf)}


def packing_of(rule: Rule) -> str:
    """How `rule` treats the leaves it is given: ELEMENTWISE, GLOBAL or LEAF (module docstring).
    Custom transforms are LEAF: the server cannot know what they compute across elements."""
    if rule.kind == "custom" or rule.name in _PER_LEAF:
        return LEAF
    if rule.name in _GLOBAL:
        return GLOBAL
    return ELEMENTWISE


def signatures(compiled: CompiledOptimizer) -> dict[str, tuple | None]:
    """For each leaf of `compiled`, what the spec does to it: leaves with equal signatures (not None)
    are treated alike by every rule and may share a buffer; None: the leaf must keep its shape."""
    return {leaf: _signature(compiled.root, leaf, ()) for leaf in compiled.leaf_paths}


def reduces(signature: tuple) -> bool:
    """Whether a leaf of this signature passes through a GLOBAL rule (a sum over leaves)."""
    return any(len(entry) == 3 and entry[2] == GLOBAL for entry in signature)


def for_buffers(compiled: CompiledOptimizer, members: Mapping[str, Sequence[str]]) -> CompiledOptimizer:
    """`compiled` for a model held in buffers: `members` maps each buffer's key to the leaves it
    holds (alike by `signatures`; a leaf kept as itself is its own one member). Same rules, slots
    and spec; masks and partitions are over the buffers."""
    return CompiledOptimizer(compiled.spec, _relabel(compiled.root, members), compiled.slots, list(members))


def _signature(node: Node, leaf: str, path: tuple) -> tuple | None:
    if isinstance(node, RuleNode):
        kind = packing_of(node.rule)
        if kind == LEAF:
            return None
        return ((path, None if node.mask is None else bool(node.mask[leaf]), kind),)
    if isinstance(node, ComboNode):
        out: tuple = ()
        for i, child in enumerate(node.children):
            sig = _signature(child, leaf, (*path, i))
            if sig is None:
                return None
            out += sig
        return out
    label = node.labels[leaf]
    sig = _signature(node.groups[int(label)][1], leaf, (*path, label))
    return None if sig is None else ((path, label), *sig)


def _relabel(node: Node, members: Mapping[str, Sequence[str]]) -> Node:
    """A copy of the spec tree whose masks and partition labels are over `members`' keys instead
    of over leaves (each key takes the value of its first leaf: they are all alike)."""
    if isinstance(node, RuleNode):
        if node.mask is None:
            return node
        return dataclasses.replace(node, mask={key: bool(node.mask[ls[0]]) for key, ls in members.items()})
    if isinstance(node, ComboNode):
        return dataclasses.replace(node, children=[_relabel(c, members) for c in node.children])
    groups = [(globs, _relabel(child, members)) for globs, child in node.groups]
    return dataclasses.replace(node, groups=groups, labels={key: node.labels[ls[0]] for key, ls in members.items()})
