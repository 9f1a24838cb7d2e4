"""The one way a model comes into being: CreateModel, Upload and restore at start all go through
`admit` (and so does resharding, through Upload and restore), so every door validates and checks
limits in the same order.

1. Everything that can be checked without allocating, cheapest first: the name and the limits for
   the parameters' bytes (`ModelStore.check_can_create`), the settings and the schema (validated
   again: cheap next to compiling, and a door that skipped it cannot slip past), the optimizer spec
   compiled for the schema (INVALID_ARGUMENT naming the model), and the door's own checks of its
   data (`validate`, e.g. an uploaded file's tensors against its schema).
2. The name and the bytes of parameters plus optimizer state (computed with jax.eval_shape, never
   allocated) are reserved in the store: two creates of one name cannot both succeed, and the limits
   hold while the bytes stream in.
3. Only then is anything allocated: the parameters (received or loaded), the model, the state it
   restores. The model enters the store complete; whatever fails, the reservation is released and
   nothing remains (all or nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from optserve.server.core.errors import InvalidArgument
from optserve.server.core.layout import Packing, plan_packing
from optserve.server.core.model import Model, ModelState
from optserve.server.core.schema import check_schema, schema_bytes
from optserve.server.core.settings import ModelSettings
from optserve.server.core.sharding import Shard, check_shard, for_shard
from optserve.server.core.store import ModelStore, check_model_name
from optserve.server.spec import CompiledOptimizer, SpecError, compile_spec
from optserve.wire.dtypes import FLOAT_DTYPES, LeafSpec


def compile_for(name: str, spec: Any, schema: Sequence[LeafSpec]) -> CompiledOptimizer:
    """Compiles a spec for a schema; SpecError becomes INVALID_ARGUMENT naming the model and field."""
    trainable = [leaf.path for leaf in schema if leaf.dtype in FLOAT_DTYPES]
    try:
        return compile_spec(spec, trainable)
    except SpecError as e:
        raise InvalidArgument(f"model {name!r}: optimizer {e}") from None


@dataclasses.dataclass(frozen=True)
class Admitted:
    """A model that passed every check and holds its reservation: `create` builds it."""

    store: ModelStore
    name: str
    schema: list[LeafSpec]
    compiled: CompiledOptimizer
    settings: ModelSettings
    param_bytes: int  # what the schema's parameters take: the most a client may send for them
    packing: Packing  # how the model will hold its leaves (core/layout.py)
    shard: Shard | None  # which shard of a model over several servers it is (core/sharding.py)

    def create(self, params: Mapping[str, np.ndarray], restore: Callable[[Model], ModelState] | None = None) -> Model:
        """Builds the model from its parameters (one array per schema leaf, validated by the caller,
        e.g. by the assembler that received them) and registers it; `restore(model)`: the state it
        continues from (validated against the model and put on its device), installed first."""
        model = Model(
            self.name, self.schema, params, self.compiled, self.settings, self.store.placement, self.packing, self.shard
        )
        if restore is not None:
            model.replace_state(restore(model))
        self.store.add(model)
        return model


@contextmanager
def admit(
    store: ModelStore,
    name: str,
    schema: Sequence[LeafSpec],
    spec: Any,
    settings: ModelSettings,
    *,
    validate: Callable[[], None] | None = None,
    shard: Shard | None = None,
) -> Iterator[Admitted]:
    """Checks and reserves model `name` (module docstring, steps 1 and 2); inside the block, build it
    with `Admitted.create`. The reservation is released when the block ends, whether or not it did.
    `shard`: the model is that shard of a model over several servers; `schema` is the shard's part,
    and the spec is compiled over the whole model's, then restricted (core/sharding.py)."""
    check_model_name(name)
    settings = settings.validated(name)
    schema = check_schema(name, [(leaf.path, leaf.dtype, leaf.shape) for leaf in schema])
    declared = schema_bytes(schema)
    store.check_can_create(name, declared)  # cheap checks first: limits before compiling
    if shard is None:
        compiled = compile_for(name, spec, schema)  # a bad spec is refused before any bytes are received
    else:
        compiled, shard = for_shard(name, compile_for(name, spec, check_shard(name, schema, shard)), settings, shard)
    if validate is not None:
        validate()
    packing = plan_packing(schema, compiled, keeps_ema=settings.ema_decay is not None, enabled=store.packed)
    store.reserve(name, declared + packing.state_bytes)
    try:
        yield Admitted(store, name, schema, compiled, settings, declared, packing, shard)
    finally:
        store.release(name)


def create_model(
    store: ModelStore,
    name: str,
    schema: Sequence[LeafSpec],
    spec: Any,
    settings: ModelSettings,
    params: Mapping[str, np.ndarray],
) -> Model:
    """A model from parameters already in memory (benchmarks, tests), through `admit`."""
    with admit(store, name, schema, spec, settings) as admitted:
        return admitted.create(params)
