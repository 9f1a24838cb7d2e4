"""The jitted update of a model: optimizer step, parameter EMA and the non-finite check in one
computation, with donated buffers."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optserve.server.core.layout import Packing
from optserve.server.core.placement import ModelPlacement
from optserve.server.core.settings import ModelSettings
from optserve.server.spec import CompiledOptimizer, ema

# The highest step a model may reach: steps stay exact in JSON and in JavaScript readers of the
# manifest (Number.MAX_SAFE_INTEGER). Uploads, checkpoints and restores accept [0, MAX_STEP]; an
# update that would go past it is refused (Model.check_step_room), so every step a model reaches
# can be saved and restored.
MAX_STEP = 2**53 - 1


def _apply_updates(params: dict, updates: dict, scale: jax.Array) -> dict:
    # optax.apply_updates with an update scale (staleness scaling); x * 1.0 is exact, so an
    # unscaled step equals optax bit for bit.
    return {k: (p + scale * updates[k]).astype(p.dtype) if k in updates else p for k, p in params.items()}


def _finish_step(
    params: dict,
    opt_state: Any,
    ema_state: Any,
    new_params: dict,
    new_opt_state: Any,
    trainable: Sequence[str],
    decay: Any,
    check: bool,
) -> tuple:
    """The end of every compiled step (traced): the EMA of the new trainable parameters, then, with
    `check`, the NaN/Inf flags of the new state and the old state kept whole if any is not finite."""
    new_ema = ema_state
    if ema_state is not None:
        assert decay is not None  # the model keeps an EMA state exactly when its settings set ema_decay
        new_ema = ema.ema_update(ema_state, {k: new_params[k] for k in trainable}, decay)
    if not check:
        return new_params, new_opt_state, new_ema
    flags, firsts = _finite_flags({k: new_params[k] for k in trainable}, new_opt_state, new_ema)
    ok = jnp.all(flags)

    def keep(new: Any, old: Any) -> Any:
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    return keep(new_params, params), keep(new_opt_state, opt_state), keep(new_ema, ema_state), flags, firsts


def _finite_flags(trainable: dict, opt_state: Any, ema_state: Any) -> tuple[jax.Array, jax.Array]:
    """Per floating-point buffer of (trainable params, optimizer state, EMA), in the order of
    `nonfinite_leaf_name`: whether every value is finite, and the flat index of the first that is not
    (0 when all are), which names the leaf at fault inside a pack."""
    leaves = [*trainable.values(), *jax.tree.leaves(opt_state), *jax.tree.leaves(ema_state)]
    bad = [~jnp.isfinite(x).reshape(-1) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not bad:
        return jnp.ones([0], bool), jnp.zeros([0], jnp.int32)
    return jnp.stack([~jnp.any(b) for b in bad]), jnp.stack([jnp.argmax(b).astype(jnp.int32) for b in bad])


def nonfinite_leaf_name(packing: Packing, opt_state: Any, ema_state: Any, index: int, element: int) -> str:
    """The leaf of `_finite_flags`'s buffer `index` that holds its flat `element`, for the refusal's
    message: a parameter by path, or an optimizer-state or EMA leaf by its key path over leaves."""
    layout = packing.layout
    if index < len(layout.trainable):
        key = layout.trainable[index]
        pack = layout.pack_named.get(key)
        return f"parameter {key if pack is None else pack.locate(element)[0]!r}"
    index -= len(layout.trainable)
    for what, tree, smap in (("optimizer state", opt_state, packing.opt_map), ("EMA", ema_state, packing.ema_map)):
        floats = [i for i, x in enumerate(jax.tree.leaves(tree)) if jnp.issubdtype(x.dtype, jnp.inexact)]
        if index < len(floats):
            assert smap is not None  # a tree with leaves has its map (an EMA only when the model keeps one)
            _, paths, shapes = smap.entries[floats[index]]
            sizes = np.cumsum([math.prod(s) for s in shapes])
            return f"{what} {'/'.join(paths[int(np.searchsorted(sizes, element, side='right'))])}"
        index -= len(floats)
    raise IndexError(index)


def make_step(
    compiled: CompiledOptimizer,
    trainable: tuple[str, ...],
    donate_params: bool,
    settings: ModelSettings,
    shardings: StepShardings | None = None,
):
    """The jitted update: (params, opt_state, ema_state, grads, scale) -> (params, opt_state, ema_state),
    plus, with settings.reject_nonfinite_updates, per buffer whether it is finite and where not.

    grads may arrive in a narrower wire dtype; the cast to the parameter dtype happens here, fused
    into the update. Non-float leaves are carried unchanged (they are not trainable). The parameter
    EMA (objax semantics, `spec.ema`), when the model keeps one, is updated in the same computation.
    The optimizer state is always donated; parameters and EMA only when no pull pins them.

    reject_nonfinite_updates: when any new floating-point value is not finite, every output is the
    corresponding input (a select inside the computation, bit for bit), so the donated buffers are
    still valid and the caller only has to read the flags back to know whether to count the step.

    shardings: on a mesh (core/placement.py), the step is one SPMD program with these in and out
    shardings (the state keeps its sharding from step to step, a padded pack's padding is set back
    to zero); None on one device: jitted without, as it always was.
    """
    decay = settings.ema_decay
    check = settings.reject_nonfinite_updates

    # The name is how core/compilation.py tells this step's compilations from others (UPDATE_STEP_FUNCTION).
    def model_update_step(params: dict, opt_state: Any, ema_state: Any, grads: dict, scale: jax.Array):
        train = {k: params[k] for k in trainable}
        g = {k: grads[k].astype(train[k].dtype) for k in trainable}
        updates, new_opt_state = compiled.update(g, opt_state, train)
        new_params = _apply_updates(params, updates, scale)
        if shardings is not None:
            new_params = shardings.placement.zero_padding(new_params)
        return _finish_step(params, opt_state, ema_state, new_params, new_opt_state, trainable, decay, check)

    donate = (0, 1, 2) if donate_params else (1,)
    if shardings is None:
        return jax.jit(model_update_step, donate_argnums=donate)
    s = shardings
    scalar = s.placement.placement.replicated()
    grads = {k: s.params[k] for k in trainable}
    out = (s.params, s.opt_state, s.ema_state) + ((scalar, scalar) if check else ())
    return jax.jit(
        model_update_step,
        donate_argnums=donate,
        in_shardings=(s.params, s.opt_state, s.ema_state, grads, scalar),
        out_shardings=out,
    )


def _rows_of(tree: Any, row_ids: dict, rows: dict[str, int], fn: Any, *others: Any) -> Any:
    """Maps fn(leaf, ids, *other leaves) over the leaves of an optimizer state that hold per-row
    values of a row-sparse buffer (under its key, first dimension its row count: moments,
    accumulators, traces); every other leaf (counts, hyperparameters, other buffers' state) is the
    last tree's: the state itself, or with `others` the new state."""

    def one(path: tuple, x: Any, *rest: Any) -> Any:
        for entry in path:
            key = getattr(entry, "key", None)
            if isinstance(key, str) and key in row_ids and getattr(x, "ndim", 0) >= 1 and x.shape[0] == rows[key]:
                return fn(x, row_ids[key], *rest)
        return rest[-1] if rest else x

    return jax.tree_util.tree_map_with_path(one, tree, *others)


def make_row_step(
    compiled: CompiledOptimizer,
    trainable: tuple[str, ...],
    donate_params: bool,
    settings: ModelSettings,
    shardings: StepShardings | None = None,
):
    """The jitted update of a push some of whose buffers are the padded rows of a lazy rule
    (core/rows.py): (params, opt_state, ema_state, grads, row_ids, scale) -> as `make_step`.

    For each buffer in row_ids, its touched rows of the parameters and of its per-row optimizer
    state are gathered (ids past the end read zeros), the rule runs on those rows and the other
    buffers as `make_step` would, and the new rows are scattered back (ids past the end dropped):
    untouched rows keep parameters and state bitwise, and the cost follows the rows, not the table.
    Lazy rules are row-local (spec/lazy.py), so this equals their dense update on the touched rows.
    jit compiles one program per set of bucket sizes (core/rows.py, `bucket`). The EMA and the
    non-finite check, when the model keeps them, run over whole buffers as in `make_step`.

    shardings: on a mesh, the outputs keep the model's shardings (as `make_step`'s); the inputs are
    taken as they come (the padded rows and their ids replicated, every other buffer with its
    sharding: core/placement.py, `put`), since which buffers come as rows changes from push to push.
    """
    decay = settings.ema_decay
    check = settings.reject_nonfinite_updates

    # The name contains make_step's, so core/compilation.py counts its compilations as update steps.
    def model_update_step_rows(
        params: dict, opt_state: Any, ema_state: Any, grads: dict, row_ids: dict, scale: jax.Array
    ):
        rows = {k: params[k].shape[0] for k in row_ids}

        def gather(x: jax.Array, ids: jax.Array) -> jax.Array:
            return x.at[ids].get(mode="fill", fill_value=0)

        def scatter(x: jax.Array, ids: jax.Array, new: jax.Array) -> jax.Array:
            return x.at[ids].set(new.astype(x.dtype), mode="drop")

        train = {k: gather(params[k], row_ids[k]) if k in row_ids else params[k] for k in trainable}
        state = _rows_of(opt_state, row_ids, rows, gather)
        g = {k: grads[k].astype(train[k].dtype) for k in trainable}
        updates, new_state = compiled.update(g, state, train)
        new_train = _apply_updates(train, updates, scale)
        new_params = dict(params)
        for k in trainable:
            new_params[k] = scatter(params[k], row_ids[k], new_train[k]) if k in row_ids else new_train[k]
        if shardings is not None:
            new_params = shardings.placement.zero_padding(new_params)
        new_opt_state = _rows_of(opt_state, row_ids, rows, scatter, new_state)
        return _finish_step(params, opt_state, ema_state, new_params, new_opt_state, trainable, decay, check)

    donate = (0, 1, 2) if donate_params else (1,)
    if shardings is None:
        return jax.jit(model_update_step_rows, donate_argnums=donate)
    s = shardings
    scalar = s.placement.placement.replicated()
    out = (s.params, s.opt_state, s.ema_state) + ((scalar, scalar) if check else ())
    return jax.jit(model_update_step_rows, donate_argnums=donate, out_shardings=out)


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """The shardings of a model's step on a mesh: parameters by buffer key, optimizer and EMA state
    as pytrees of shardings (ModelPlacement.state_shardings; None: the model keeps no EMA)."""

    placement: ModelPlacement
    params: dict[str, Any]
    opt_state: Any
    ema_state: Any


def own_buffers(tree: Any) -> Any:
    """The tree with every array leaf in a buffer of its own.

    An optimizer's init may put one array in two places (e.g. two accumulators starting from the
    same zeros); donating that state would donate the buffer twice, which XLA refuses. Copies are
    made only for the repeats, so a well-behaved state costs nothing.
    """
    seen: set[int] = set()

    def own(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        if id(x) in seen:
            return jnp.array(x, copy=True)
        seen.add(id(x))
        return x

    return jax.tree.map(own, tree)
