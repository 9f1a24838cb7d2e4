"""One model over several servers: placing it (PlanShards) and admitting one shard of it
(docs/design.md, "Shards").

A shard is an ordinary model holding some of the model's leaves (whole leaves, and row ranges of
large ones under the leaf's path) plus the shard map (`optserve.wire.shards`). Its spec is read
over the whole model (a mask or partition names leaves of every shard) and then restricted to the
shard's leaves, so each shard applies exactly what the unsharded model applies to those leaves.
That holds for every rule that works leaf by leaf or element by element. clip_by_global_norm at
the head of the chain of an async model works too (`GlobalClip`): the client, which holds the
whole gradient, sends its squared norm with every push (PushHeader.global_norm_sq), and each shard
scales its part by the factor the rule would apply. Noise rules, which split one random key over
the leaves in order, are run on each shard over the whole model's leaves (core/shard_noise.py), so
each leaf, and each row of a split one, gets the noise it gets unsharded. What would need the shards
to exchange values before they apply is refused at placement and at creation, with the reason
(`check_shardable`): any other reduction over every leaf, a custom transform the server cannot
inspect, and reject_nonfinite_updates (one shard could refuse an update the others apply). Sync
rounds that each shard could close with other contributors (quorum below workers, a sync_timeout,
leases: each shard would see its own joins and expiries), or whose mean gradient a head
clip_by_global_norm clips, are decided by shard 0 and relayed by the clients (core/shard_rounds.py).
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import optax

from optserve.server.core import shard_noise
from optserve.server.core.errors import InvalidArgument
from optserve.server.core.settings import ModelSettings
from optserve.server.spec import CompiledOptimizer
from optserve.server.spec import packing as spec_packing
from optserve.server.spec.compiler import ComboNode, RuleNode, Slot
from optserve.server.spec.laziness import lazy_leaves
from optserve.server.spec.schedules import ScheduleValue
from optserve.wire.dtypes import FLOAT_DTYPES, LeafSpec
from optserve.wire.errors import WireError
from optserve.wire.shards import DEFAULT_SPLIT_BYTES, ShardMap, place


@dataclass(frozen=True)
class GlobalClip:
    """clip_by_global_norm at the head of a sharded model's chain: a push's gradient part is scaled
    by `factor` (optax's: 1 below max_norm, else max_norm / norm) before the chain, in which the
    rule itself is the identity. The norm is the whole gradient's, sent by the client."""

    rule: str
    max_norm: float | None  # a constant
    slot: str | None  # else the state key of its tunable value

    def factor(self, norm_sq: float, hyperparams: Callable[[], Mapping[str, float]]) -> float:
        """The scale of the gradient for a push whose whole gradient has this squared norm."""
        max_norm = hyperparams()[self.slot] if self.slot is not None else self.max_norm
        assert max_norm is not None  # one of the two is set (_clip_of)
        norm = math.sqrt(norm_sq)
        return 1.0 if norm < max_norm else float(max_norm) / norm


@dataclass(frozen=True)
class Shard:
    """This model is shard `index` of the model that `map` places; `clip`: its GlobalClip, derived
    from the spec when it is admitted (not part of the map)."""

    map: ShardMap
    index: int
    clip: GlobalClip | None = None

    @property
    def target(self) -> str:
        return self.map.targets[self.index]

    def same_placement(self, other: Shard | None) -> bool:
        """Whether `other` is this very shard of this very placement (a state to restore into it)."""
        return (
            other is not None
            and other.index == self.index
            and other.map.model_id == self.map.model_id
            and other.map.version == self.map.version
        )


def check_shardable(name: str, compiled: CompiledOptimizer, settings: ModelSettings, shards: int) -> None:
    """INVALID_ARGUMENT naming the rule or setting that a model spread over `shards` servers could
    not compute as the unsharded model does (module docstring); nothing for one shard."""
    if shards <= 1:
        return
    why = f"model {name!r}: a model over {shards} shards"
    head = _head_clip(compiled)
    for rule in spec_packing.rules_of(compiled):
        if spec_packing.packing_of(rule) == spec_packing.GLOBAL and (head is None or rule is not head.rule):
            raise InvalidArgument(
                f"{why} can use {rule.name!r} only as the first rule of its chain, unmasked, with a constant or "
                "tunable max_norm (each push then carries its whole gradient's norm); here it reduces over values "
                "the shards would have to exchange (use one server for this spec)"
            )
        if rule.kind == "custom":
            raise InvalidArgument(
                f"{why} cannot use {rule.name!r}: a custom transform, which may compute across leaves "
                "(use one server for this spec)"
            )
    if settings.reject_nonfinite_updates:
        raise InvalidArgument(
            f"{why} cannot use reject_nonfinite_updates: one shard could refuse an update the others apply"
        )


def kept_whole(compiled: CompiledOptimizer) -> set[str]:
    """Leaves that placement must not split: those a rule needs whole (a per-leaf norm or mean;
    spec/packing.py, `needs_whole`). A table under a lazy rule alone (spec/lazy.py) is row-local,
    and a leaf's noise is row by row that of the whole leaf (core/shard_noise.py), so those may be
    split by rows although they are never packed."""
    return spec_packing.needs_whole(compiled) - lazy_leaves(compiled)


def plan(
    name: str,
    compiled: CompiledOptimizer,
    settings: ModelSettings,
    schema: Sequence[LeafSpec],
    targets: Sequence[str],
    split_bytes: int = 0,
) -> ShardMap:
    """Places model `name` (its spec compiled over the whole `schema`) over `targets`."""
    check_shardable(name, compiled, settings, len(targets))
    try:
        return place(
            schema,
            targets,
            model_id=uuid.uuid4().hex,
            split_bytes=split_bytes or DEFAULT_SPLIT_BYTES,
            whole=kept_whole(compiled),
            global_norm=len(targets) > 1 and _head_clip(compiled) is not None,
        )
    except WireError as e:
        raise InvalidArgument(f"model {name!r}: {e}") from None


def check_shard(name: str, schema: Sequence[LeafSpec], shard: Shard) -> list[LeafSpec]:
    """The whole model's schema, once the map is consistent and `schema` is exactly what it gives
    this shard (INVALID_ARGUMENT naming the first difference otherwise)."""
    try:
        shard.map.check(f"model {name!r}: shard map")
    except WireError as e:
        raise InvalidArgument(str(e)) from None
    if not 0 <= shard.index < shard.map.shards:
        raise InvalidArgument(f"model {name!r}: shard index {shard.index} is not one of the map's {shard.map.shards}")
    expected = shard.map.shard_schema(shard.index)
    where = f"model {name!r}: shard {shard.index} ({shard.target})"
    for i, (got, want) in enumerate(zip(schema, expected, strict=False)):
        if got != want:
            raise InvalidArgument(
                f"{where}: schema leaf {i} is {got.path!r} {got.dtype}{list(got.shape)}, the shard map gives "
                f"this shard {want.path!r} {want.dtype}{list(want.shape)}"
            )
    if len(schema) != len(expected):
        raise InvalidArgument(f"{where}: the schema has {len(schema)} leaves, the shard map gives it {len(expected)}")
    return shard.map.schema()


def _head_clip(compiled: CompiledOptimizer) -> RuleNode | None:
    """The spec's clip_by_global_norm (GLOBAL) node when it is the first rule of the top chain (or
    the whole spec), unmasked, with a max_norm that is not scheduled; else None."""
    root = compiled.root
    node = root.children[0] if isinstance(root, ComboNode) and root.rule.name == "chain" and root.children else root
    if not isinstance(node, RuleNode) or spec_packing.packing_of(node.rule) != spec_packing.GLOBAL:
        return None
    value = node.args.get("max_norm")
    if node.mask is not None or isinstance(value, ScheduleValue) or (isinstance(value, Slot) and value.schedule):
        return None
    return node


def _identity(**_: object) -> optax.GradientTransformation:
    return optax.identity()  # the same (empty) state as clip_by_global_norm's


def _clip_of(compiled: CompiledOptimizer) -> tuple[CompiledOptimizer, GlobalClip | None]:
    """`compiled` with its head clip_by_global_norm made the identity, and the GlobalClip that
    replaces it (the same spec, slots and state structure: checkpoints keep their keys)."""
    node = _head_clip(compiled)
    if node is None:
        return compiled, None
    value = node.args.get("max_norm")
    if isinstance(value, Slot):
        clip = GlobalClip(node.rule.name, None, value.key)
    else:
        default = next((h.default for h in node.rule.hyperparams if h.name == "max_norm"), 1.0)
        clip = GlobalClip(node.rule.name, float(value if value is not None else default), None)
    identity = dataclasses.replace(node, rule=dataclasses.replace(node.rule, build=_identity))
    root = compiled.root
    if isinstance(root, ComboNode) and root.children and root.children[0] is node:
        root = dataclasses.replace(root, children=[identity, *root.children[1:]])
    else:
        root = identity
    return CompiledOptimizer(compiled.spec, root, compiled.slots, compiled.leaf_paths), clip


def for_shard(
    name: str, compiled: CompiledOptimizer, settings: ModelSettings, shard: Shard
) -> tuple[CompiledOptimizer, Shard]:
    """The spec compiled over the whole model, restricted to the leaves of `shard` (a head
    clip_by_global_norm made a `GlobalClip`, returned in the shard; noise rules keyed over the
    whole model's leaves, core/shard_noise.py), once the spec and settings allow the placement
    (`check_shardable`, and no split leaf that a rule needs whole)."""
    check_shardable(name, compiled, settings, shard.map.shards)
    whole = kept_whole(compiled)
    for leaf in shard.map.leaves:
        if leaf.split and leaf.spec.path in whole:
            raise InvalidArgument(
                f"model {name!r}: shard map splits leaf {leaf.spec.path!r}, but its update rule needs the whole leaf"
            )
    pieces = shard.map.pieces_of(shard.index)
    mine = [leaf.spec.path for leaf, _ in pieces if leaf.spec.dtype in FLOAT_DTYPES]
    if shard.map.shards == 1:
        return spec_packing.for_buffers(compiled, {path: [path] for path in mine}), shard
    starts = {leaf.spec.path: piece.start for leaf, piece in pieces if leaf.split}
    compiled = shard_noise.for_shard(compiled, shard.map.schema(), starts)
    restricted = spec_packing.for_buffers(compiled, {path: [path] for path in mine})
    restricted, clip = _clip_of(restricted)
    if (clip is not None) != shard.map.global_norm:
        raise InvalidArgument(
            f"model {name!r}: shard map says global_norm={shard.map.global_norm}, but the spec "
            + ("starts" if clip is not None else "does not start")
            + " with clip_by_global_norm"
        )
    return restricted, dataclasses.replace(shard, clip=clip)
