"""Which leaves of a compiled spec a lazy rule updates (spec/lazy.py): those get row-sparse
gradients applied to their touched rows only (core/step.py, `make_row_step`)."""

from __future__ import annotations

from typing import Any

from optserve.server.spec.compiler import CompiledOptimizer, PartitionNode, RuleNode
from optserve.server.spec.lazy import LAZY_RULES


def lazy_leaves(compiled: CompiledOptimizer) -> frozenset[str]:
    """The leaves (or buffers) of `compiled` whose whole update is one lazy rule: the spec itself,
    or the group of a partition that takes them. A row-sparse gradient on any other leaf is applied
    densely (its rows summed into zeros elsewhere)."""
    root = compiled.root
    if _lazy(root):
        return frozenset(compiled.leaf_paths)
    if isinstance(root, PartitionNode):
        return frozenset(leaf for leaf in compiled.leaf_paths if _lazy(root.groups[int(root.labels[leaf])][1]))
    return frozenset()


def _lazy(node: Any) -> bool:
    return isinstance(node, RuleNode) and node.rule.name in LAZY_RULES and node.mask is None
