"""Parameter EMA exactly as objax's ``ExponentialMovingAverage`` (docs/optimizer-catalogue.md J5, §2.11).

Not a gradient transform: the server keeps an :class:`EmaState` beside the
parameters and calls :func:`ema_update` after each applied step.

objax (9dd7dc3, ``objax/optimizer/ema.py``)::

    step += 1;  m += (1 − momentum)·(w − m)          (m₀ = 0)
    read: m,  or with debias:  m · 1/(1 − (1 − eps)·momentum^step)

Without debias the average is biased toward 0 early (m₁ = (1 − μ)·w₁), as in
objax. ``optax.ema(debias=True)`` has no eps, so it differs slightly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class EmaState(NamedTuple):
    """Update count (objax ``step``), the decay of the last update, the averages.

    ``decay`` is kept so that :func:`ema_value` can debias without being told it.
    """

    # Shadows tuple.count on purpose: named as in optax's states, and saved under this name.
    count: jax.Array  # type: ignore[assignment]
    decay: jax.Array
    ema: Any


def ema_init(params: Any) -> EmaState:
    """Zero averages shaped like ``params`` and a zero count."""
    return EmaState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32), jax.tree.map(jnp.zeros_like, params))


def ema_update(ema_state: EmaState, params: Any, decay: float, debias: bool = False) -> EmaState:
    """One objax EMA step: ``m += (1 − decay)·(w − m)``; count += 1.

    Args:
      ema_state: the current state.
      params: the parameters just after the optimizer step.
      decay: objax's ``momentum`` (default there 0.999).
      debias: accepted for symmetry with :func:`ema_value`; as in objax it only
        affects reading, never the stored average.
    """
    del debias
    ema = jax.tree.map(lambda m, w: m + ((1 - decay) * (w - m)).astype(m.dtype), ema_state.ema, params)
    return EmaState(optax.safe_increment(ema_state.count), jnp.asarray(decay, jnp.float32), ema)


def ema_value(ema_state: EmaState, debias: bool, eps: float = 1e-6) -> Any:
    """The averaged parameters; with debias, ``m / (1 − (1 − eps)·decay^count)``.

    Before any update (count 0) the debiased value divides 0 by ``eps`` and is 0,
    as in objax.
    """
    if not debias:
        return ema_state.ema
    factor = 1 / (1 - (1 - eps) * ema_state.decay**ema_state.count)
    return jax.tree.map(lambda m: m * factor.astype(m.dtype), ema_state.ema)
