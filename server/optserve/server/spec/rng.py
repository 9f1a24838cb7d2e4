"""Rules that draw random numbers, and their keys in the optimizer state.

optax.add_noise (and noisy_sgd, and the Axon and Polaris presets built on it) keeps a typed JAX
key (`jax.random.key`) in its state. A typed key has no numpy form: a model holding one could be
pulled but not checkpointed, downloaded or resharded (its state is saved as numpy arrays,
state/model_state.py). `key_data_state` keeps the key's data instead (uint32, `jax.random.key_data`)
and wraps it back into a key for each update: the same key, so the same noise bit for bit, and a
state tensor like any other (`.../rng_key`, equal on every shard of a sharded model).

The rule also runs between two optimization barriers, so that XLA fuses nothing before or after it
into its computation: a shard runs the rule over the whole model's shapes and then takes its rows
of a split leaf (core/shard_noise.py), and what XLA fused across that boundary on the unsharded
model rounded some of those rows differently (an ulp). With the barriers, both compute the rule's
output alike, bit for bit, at the cost of one pass over the rule's updates.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

# Rules that split one random key into one key per leaf of the tree they are given, in its order
# (spec/packing.py: LEAF; a sharded model runs them over the whole model's leaves, core/shard_noise.py).
KEY_PER_LEAF = frozenset(
    {"noisy_sgd", "add_noise", *(f"{lib}:{name}" for lib in ("axon", "polaris") for name in ("noisy_sgd", "add_noise"))}
)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array | jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def key_data_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` with every typed key of its state held as its key data (module docstring)."""

    def to_data(state: Any) -> Any:
        return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)

    def init(params: Any) -> Any:
        return to_data(inner.init(params))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        # which leaves are keys: those of the state `inner` would have (its init traced for shapes only;
        # the updates have the parameters' structure)
        shapes = jax.eval_shape(inner.init, updates)
        keyed = jax.tree.map(lambda s, x: jax.random.wrap_key_data(x) if _is_key(s) else x, shapes, state)
        new_updates, new_state = inner.update(jax.lax.optimization_barrier(updates), keyed, params)
        return jax.lax.optimization_barrier(new_updates), to_data(new_state)

    return optax.GradientTransformation(init, update)
