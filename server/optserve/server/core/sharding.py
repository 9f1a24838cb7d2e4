"""One model over several servers: placing it (PlanShards) and admitting one shard of it
(docs/design.md, "Shards").

A shard is an ordinary model holding some of the model's leaves (whole leaves, and row ranges of
large ones under the leaf's path) plus the shard map (`optserve.wire.shards`). Its spec is read
over the whole model (a mask or partition names leaves of every shard) and then restricted to the
shard's leaves, so each shard applies exactly what the unsharded model applies to those leaves.
That holds for every rule that works leaf by leaf or element by element. What would need the
shards to exchange values before they apply is refused at placement and at creation, with the
reason (`check_shardable`): a reduction over every leaf (clip_by_global_norm), a random key split
over the leaves in order, a custom transform the server cannot inspect, sync rounds that each
shard could close with other contributors (quorum below workers, a sync timeout), and
reject_nonfinite_updates (one shard could refuse an update the others apply).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from optserve.server.core.errors import InvalidArgument
from optserve.server.core.settings import ModelSettings
from optserve.server.spec import CompiledOptimizer
from optserve.server.spec import packing as spec_packing
from optserve.wire.dtypes import FLOAT_DTYPES, LeafSpec
from optserve.wire.errors import WireError
from optserve.wire.shards import DEFAULT_SPLIT_BYTES, ShardMap, place


@dataclass(frozen=True)
class Shard:
    """This model is shard `index` of the model that `map` places."""

    map: ShardMap
    index: int

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
    for rule in spec_packing.rules_of(compiled):
        if spec_packing.packing_of(rule) == spec_packing.GLOBAL:
            raise InvalidArgument(
                f"{why} cannot use {rule.name!r}: it reduces over every leaf, and the shards do not "
                "exchange partial sums yet (use one server for this spec)"
            )
        if spec_packing.depends_on_leaf_order(rule):
            what = "a custom transform" if rule.kind == "custom" else "it splits one random key over the leaves"
            raise InvalidArgument(f"{why} cannot use {rule.name!r}: {what} (use one server for this spec)")
    if settings.mode == "sync" and settings.quorum and settings.quorum < (settings.workers or 0):
        raise InvalidArgument(
            f"{why} needs quorum == workers in sync mode: with quorum {settings.quorum} of "
            f"{settings.workers} each shard could close a round with other contributors"
        )
    if settings.sync_timeout:
        raise InvalidArgument(f"{why} cannot use sync_timeout: each shard could close a round with other contributors")
    if settings.reject_nonfinite_updates:
        raise InvalidArgument(
            f"{why} cannot use reject_nonfinite_updates: one shard could refuse an update the others apply"
        )


def kept_whole(compiled: CompiledOptimizer) -> set[str]:
    """Leaves that placement must not split: those a rule needs whole (a per-leaf norm or mean;
    spec/packing.py, LEAF)."""
    return {leaf for leaf, sig in spec_packing.signatures(compiled).items() if sig is None}


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


def for_shard(name: str, compiled: CompiledOptimizer, settings: ModelSettings, shard: Shard) -> CompiledOptimizer:
    """The spec compiled over the whole model, restricted to the leaves of `shard`, once the spec
    and settings allow the placement (`check_shardable`, and no split leaf that a rule needs whole)."""
    check_shardable(name, compiled, settings, shard.map.shards)
    whole = kept_whole(compiled)
    for leaf in shard.map.leaves:
        if leaf.split and leaf.spec.path in whole:
            raise InvalidArgument(
                f"model {name!r}: shard map splits leaf {leaf.spec.path!r}, but its update rule needs the whole leaf"
            )
    mine = [leaf.spec.path for leaf, _ in shard.map.pieces_of(shard.index) if leaf.spec.dtype in FLOAT_DTYPES]
    return spec_packing.for_buffers(compiled, {path: [path] for path in mine})
