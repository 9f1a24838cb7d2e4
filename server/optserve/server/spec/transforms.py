"""GradientTransformations with no direct optax 0.2.8 equivalent (docs/optimizer-catalogue.md §2).

Written like optax: a state NamedTuple where there is state, ``jax.tree.map``
over leaves (no per-element Python), signs as optax (the ``scale_by_*``
transforms return the positive direction; an LR transform follows them).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def clip_by_leaf_norm(max_norm: Any) -> optax.GradientTransformation:
    """Clips each leaf's L2 norm separately (Flux ``ClipNorm``, docs/optimizer-catalogue.md §2.1).

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


def _tree_norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(jnp.abs(x))))


class ScaleByRssState(NamedTuple):
    """Sum of squared gradients."""

    sum_of_squares: optax.Updates


def scale_by_rss_eps_outside(initial_accumulator_value: Any = 1e-8, eps: Any = 1e-8) -> optax.GradientTransformation:
    """Adagrad with eps outside the square root (Flux ``ADAGrad``, docs/optimizer-catalogue.md §2.4).

    a₀ = initial_accumulator_value; a = a + g²; u = g/(√a + eps).

    Args:
      initial_accumulator_value: a₀ (Flux: its ε, 1e-8).
      eps: added after the square root (Flux: 1e-8).

    References:
      Flux.jl 089ec08 ``apply!(::ADAGrad)``.
    """

    def init_fn(params):
        return ScaleByRssState(jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator_value), params))

    def update_fn(updates, state, params=None):
        del params
        acc = jax.tree.map(lambda a, g: a + jnp.square(g), state.sum_of_squares, updates)
        updates = jax.tree.map(lambda g, a: g / (jnp.sqrt(a) + eps), updates, acc)
        return updates, ScaleByRssState(acc)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdamaxState(NamedTuple):
    """Step count, first moment and infinity-norm second moment."""

    # Shadows tuple.count on purpose: the field is named as in optax's states (ScaleByAdamState).
    count: jax.Array  # type: ignore[assignment]
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adamax_eps_outside(b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8) -> optax.GradientTransformation:
    """AdaMax with eps added after the max (Flux ``AdaMax``, docs/optimizer-catalogue.md §2.5).

    m = b1·m + (1−b1)·g; w = max(b2·w, |g|); u = m/(1 − b1^t) / (w + eps).
    (optax puts eps inside the max: ν = max(b2·ν, |g| + eps).)

    References:
      Flux.jl 089ec08 ``apply!(::AdaMax)``.
    """

    def init_fn(params):
        zeros = optax.tree.zeros_like(params)
        return ScaleByAdamaxState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda w, g: jnp.maximum(b2 * w, jnp.abs(g)), state.nu, updates)
        correction = 1 - b1**count
        updates = jax.tree.map(lambda m, w: (m / correction.astype(m.dtype)) / (w + eps), mu, nu)
        return updates, ScaleByAdamaxState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAmsgradState(NamedTuple):
    """First moment, second moment and its running maximum."""

    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


def scale_by_amsgrad_flux(
    b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8, initial_value: Any = 1e-8
) -> optax.GradientTransformation:
    """AMSGrad without bias correction, state starting at ε (Flux ``AMSGrad``, §2.6).

    m₀ = v₀ = v̂₀ = initial_value; m = b1·m + (1−b1)·g; v = b2·v + (1−b2)·g²;
    v̂ = max(v̂, v); u = m/(√v̂ + eps).

    References:
      Flux.jl 089ec08 ``apply!(::AMSGrad)``.
    """

    def init_fn(params):
        full = jax.tree.map(lambda p: jnp.full_like(p, initial_value), params)
        return ScaleByAmsgradState(full, full, full)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu_max)
        return updates, ScaleByAmsgradState(mu, nu, nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adam_objax(b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8) -> optax.GradientTransformation:
    """objax ``Adam``: eps inside the square root of the *uncorrected* v (§2.7).

    m += (1−b1)·(g − m); v += (1−b2)·(g² − v);
    u = [√(1 − b2^t)/(1 − b1^t)]·m/√(v + eps), i.e. a time-varying eps_root of
    eps/(1 − b2^t) and no outer eps.

    References:
      objax 9dd7dc3 ``objax/optimizer/adam.py``.
    """

    def init_fn(params):
        zeros = optax.tree.zeros_like(params)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: m + (1 - b1) * (g - m), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v + (1 - b2) * (jnp.square(g) - v), state.nu, updates)
        k = jnp.sqrt(1 - b2**count) / (1 - b1**count)
        updates = jax.tree.map(lambda m, v: k.astype(m.dtype) * m / jnp.sqrt(v + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_trust_ratio_objax(
    weight_decay: Any = 1e-4, trust_coefficient: Any = 1e-3, eps: Any = 1e-5
) -> optax.GradientTransformation:
    """objax ``LARS``'s decayed, trust-ratio-scaled direction (§2.8).

    Per leaf: tr = tc·‖p‖/(‖g‖ + wd·‖p‖ + eps); k = max(1[‖p‖ = 0 or ‖g‖ = 0], tr);
    u = k·(g + wd·p). (optax's LARS uses tc·‖p‖/(‖g + wd·p‖ + eps).) Followed by
    the LR and ``trace(momentum)`` to make objax LARS.

    References:
      objax 9dd7dc3 ``objax/optimizer/lars.py``.
    """

    def update_fn(updates, state, params):
        def leaf(g, p):
            p_norm, g_norm = _tree_norm(p), _tree_norm(g)
            ratio = trust_coefficient * p_norm / (g_norm + weight_decay * p_norm + eps)
            fallback = jnp.logical_or(p_norm == 0, g_norm == 0).astype(ratio.dtype)
            k = jnp.maximum(fallback, ratio)
            return (k * (g + weight_decay * p)).astype(g.dtype)

        return jax.tree.map(leaf, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_radam_axon(
    b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8, eps_root: Any = 0.0, threshold: Any = 5.0
) -> optax.GradientTransformation:
    """Axon/Polaris RAdam *with its bug*: ρ∞ computed from b1 (§2.9; compat only).

    As ``optax.scale_by_radam`` but ρ∞ = 2/(1 − b1) − 1 (19 instead of 1999), so
    the rectified branch first runs around step 6890.

    References:
      axon v0.4.1 ``lib/axon/updates.ex`` ``apply_scale_by_radam``.
    """
    ro_inf = 2.0 / (1.0 - b1) - 1.0

    def init_fn(params):
        zeros = optax.tree.zeros_like(params)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        b2t = b2**count
        ro = ro_inf - 2 * count * b2t / (1 - b2t)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        # Guard the sqrt argument: it is negative (NaN) on the branch not taken.
        r = jnp.sqrt(jnp.maximum((ro - 4.0) * (ro - 2.0) * ro_inf / ((ro_inf - 4.0) * (ro_inf - 2.0) * ro), 0.0))
        updates = jax.tree.map(
            lambda m, v: jnp.where(ro >= threshold, r.astype(m.dtype) * m / (jnp.sqrt(v + eps_root) + eps), m),
            mu_hat,
            nu_hat,
        )
        return updates, optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)
