"""In-process optax counterparts of *canonical* specs, for the comparisons "canonical rules also
match in-process optax".  This is the one module here that imports optax/jax; it is not the
reference.  Every canonical rule maps to the optax call of the same name with the same keyword
arguments (so optax's own defaults apply to anything the spec leaves out); the two rules optax
0.2.8 lacks (docs/optimizer-catalogue.md §4.20) are written here with jnp: ``clip_by_leaf_norm`` (§2.1) and the
``inverse_time_decay`` schedule (§2.2).  Presets are not handled (they have no optax call of
their name; their optax equivalents are written as canonical specs in the tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .core import SpecError, split_spec

_SCHEDULES = {
    "constant": "constant_schedule",
    "constant_schedule": "constant_schedule",
    "exponential_decay": "exponential_decay",
    "polynomial": "polynomial_schedule",
    "polynomial_schedule": "polynomial_schedule",
    "linear": "linear_schedule",
    "linear_schedule": "linear_schedule",
    "cosine_decay": "cosine_decay_schedule",
    "cosine_decay_schedule": "cosine_decay_schedule",
    "warmup_cosine_decay": "warmup_cosine_decay_schedule",
    "warmup_cosine_decay_schedule": "warmup_cosine_decay_schedule",
    "piecewise_constant": "piecewise_constant_schedule",
    "piecewise_constant_schedule": "piecewise_constant_schedule",
}


def optax_schedule(value: Any):
    """A number (or None) stays as it is; a schedule spec becomes an optax schedule function."""
    if value is None or (isinstance(value, Real) and not isinstance(value, bool)):
        return value
    name, args = split_spec(value)
    args = dict(args or {})
    offset = int(args.pop("count_offset", 0))
    if name in ("join", "join_schedules"):
        fn = optax.join_schedules(
            [_as_fn(optax_schedule(s)) for s in args["schedules"]], [int(b) for b in args["boundaries"]]
        )
    elif name == "inverse_time_decay":
        init, rate = args["init_value"], args["decay_rate"]
        steps, stair = args.get("transition_steps", 1), args.get("staircase", False)

        def fn(count):
            p = count / steps
            if stair:
                p = jnp.floor(p)
            return init / (1.0 + rate * p)
    elif name in _SCHEDULES:
        if "boundaries_and_scales" in args and args["boundaries_and_scales"] is not None:
            bs = args["boundaries_and_scales"]
            items = bs.items() if isinstance(bs, Mapping) else bs
            args["boundaries_and_scales"] = {int(b): float(s) for b, s in items}
        fn = getattr(optax, _SCHEDULES[name])(**args)
    else:
        raise SpecError(f"no optax schedule for {name!r}")
    if offset:
        base = fn
        return lambda count: base(count + offset)
    return fn


def _as_fn(s):
    return s if callable(s) else optax.constant_schedule(s)


def clip_by_leaf_norm(max_norm: float) -> optax.GradientTransformation:
    """Per leaf: g·max_norm/‖g‖ if ‖g‖ > max_norm (§2.1; not in optax 0.2.8)."""

    def update_fn(updates, state, params=None):
        def f(g):
            n = jnp.sqrt(jnp.sum(g * g))
            return jnp.where(n > max_norm, g * (max_norm / jnp.where(n > 0, n, 1.0)), g)

        return jax.tree.map(f, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


_SCHEDULE_ARGS = ("learning_rate", "weight_decay")


def optax_for(spec: Any) -> optax.GradientTransformation:
    """The optax transformation of a canonical spec (rules, transforms, chains, schedules)."""
    name, args = split_spec(spec)
    if name == "chain":
        return optax.chain(*(optax_for(s) for s in args))
    if ":" in name:
        raise SpecError(f"{name!r} is a preset; optax_for handles canonical rules only")
    kw = dict(args or {})
    for k in _SCHEDULE_ARGS:
        if k in kw:
            kw[k] = optax_schedule(kw[k])
    if "mu_dtype" in kw and kw["mu_dtype"] is not None:
        kw["mu_dtype"] = jnp.dtype(kw["mu_dtype"])
    if name == "scale_by_schedule":
        return optax.scale_by_schedule(_as_fn(optax_schedule(kw["schedule"])))
    if name == "clip_by_leaf_norm":
        return clip_by_leaf_norm(**kw)
    if name == "adadelta":
        kw.setdefault("learning_rate", 1.0)  # never optax's ascending None (§4.9)
    if name == "identity":
        return optax.identity()
    return getattr(optax, name)(**kw)


def run_optax(spec: Any, params: Mapping[str, np.ndarray], grads_seq, dtype=None) -> list[dict]:
    """Run an optax spec from ``params`` over ``grads_seq``; the params after each step, as
    NumPy.  ``dtype`` defaults to the dtype of the params (float64 needs jax_enable_x64).
    The whole trajectory is one jitted ``lax.scan`` (one compilation, no per-step dispatch)."""
    tx = optax_for(spec)
    p0 = {k: jnp.asarray(v, dtype=dtype) for k, v in params.items()}
    stacked = {k: jnp.asarray(np.stack([g[k] for g in grads_seq]), dtype=p0[k].dtype) for k in p0}

    @jax.jit
    def trajectory(p, gs):
        def step(carry, g):
            p, state = carry
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
            return (p, state), p

        return jax.lax.scan(step, (p, tx.init(p)), gs)[1]

    traj = {k: np.asarray(v) for k, v in trajectory(p0, stacked).items()}
    return [{k: v[i] for k, v in traj.items()} for i in range(len(grads_seq))]
