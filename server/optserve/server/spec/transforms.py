"""GradientTransformations with no direct optax 0.2.8 equivalent (optimizers.md §2).

Written like optax: a state NamedTuple where there is state, ``jax.tree.map``
over leaves (no per-element Python), signs as optax (the ``scale_by_*``
transforms return the positive direction; an LR transform follows them).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def clip_by_leaf_norm(max_norm: Any) -> optax.GradientTransformation:
  """Clips each leaf's L2 norm separately (Flux ``ClipNorm``, optimizers.md §2.1).

  u = g if ‖g‖ ≤ max_norm, else g · (max_norm / ‖g‖), per leaf.

  Args:
    max_norm: the bound on each leaf's norm.

  References:
    Flux.jl 089ec08 ``src/optimise/optimisers.jl``, ``apply!(::ClipNorm)``.
  """

  def update_fn(updates, state, params=None):
    del params

    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(jnp.abs(g))))
      # The ratio is only used where norm > max_norm > 0, so it is finite there.
      factor = jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1), 1)
      return g * factor.astype(g.dtype)

    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
