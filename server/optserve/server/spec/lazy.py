"""Lazy rules for embedding tables: lazy_adam, rowwise_adagrad, sparse_sgd.

Each is an ordinary optax GradientTransformation over whole leaves, written so that every row's
new parameters and state depend only on that row's gradient, parameters and state (and on scalars:
the count, hyperparameters). That is what makes them lazy on the server: for a row-sparse push
(proto RowSparseGradient) the model gathers the touched rows of each table and of its state, runs
the rule on those rows only, and scatters the results back (core/step.py, `make_row_step`), so
untouched rows keep their parameters and state bitwise. Given a dense gradient they treat every
row as touched. The count (bias correction of lazy_adam) advances once per update, as the model's
step does: TF LazyAdam and MXNet `lazy_update` use the global step too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optserve.server.spec.hyperparams import B1, B2, EPS, HP, LEARNING_RATE, MOMENTUM_OPT, NONNEG
from optserve.server.spec.registry import Rule, register

# The rule names that update only the rows a row-sparse gradient names (spec/laziness.py).
LAZY_RULES = frozenset({"lazy_adam", "rowwise_adagrad", "sparse_sgd"})
LAZY_NOTE = (
    " Lazy: under a row-sparse gradient (client `Rows`) only the rows it names change, parameters and "
    "state alike; a dense gradient touches every row."
)


class ScaleByLazyAdamState(NamedTuple):
    """Update count and the two moments, each of the parameters' shape."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: optax.Updates
    nu: optax.Updates


def scale_by_lazy_adam(b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8) -> optax.GradientTransformation:
    """Adam with TF LazyAdam's / MXNet's bias correction folded into the step size, row-local.

    m = b1·m + (1−b1)·g; v = b2·v + (1−b2)·g²; u = √(1−b2ᵗ)/(1−b1ᵗ) · m/(√v + eps)
    (eps added to the uncorrected √v: "epsilon hat" of Kingma & Ba, section 2; the positive direction).

    Args:
      b1, b2: decay rates of the moments.
      eps: added to √v.

    References:
      TensorFlow Addons ``tfa.optimizers.LazyAdam`` (``_resource_apply_sparse``); MXNet
      ``adam_update(lazy_update=True)``; Kingma & Ba, "Adam", ICLR 2015, end of section 2.
    """

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ScaleByLazyAdamState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        correction = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        out = jax.tree.map(lambda m, v: (correction * m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
        return out, ScaleByLazyAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def lazy_adam(learning_rate: Any, b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8) -> optax.GradientTransformation:
    """``scale_by_lazy_adam`` then ``scale_by_learning_rate``: u = −α·√(1−b2ᵗ)/(1−b1ᵗ)·m/(√v + eps)."""
    return optax.chain(scale_by_lazy_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate))


class ScaleByRowwiseAdagradState(NamedTuple):
    """One accumulator per row: shape [rows] (a scalar leaf has one)."""

    sum_of_row_means: optax.Updates


def scale_by_rowwise_adagrad(initial_accumulator_value: Any = 0.0, eps: Any = 1e-8) -> optax.GradientTransformation:
    """FBGEMM's exact row-wise Adagrad: one accumulator per row, the mean of the row's g².

    a_r = a_r + mean_j(g_rj²); u_r = g_r/(√a_r + eps)  (the positive direction).

    Args:
      initial_accumulator_value: a₀ of every row.
      eps: added to √a.

    References:
      FBGEMM ``EmbOptimType.EXACT_ROWWISE_ADAGRAD``
      (``fbgemm_gpu/codegen/training/optimizer/embedding_optimizer_code_generator.py``, rowwise_adagrad);
      TorchRec ``EXACT_ROWWISE_ADAGRAD``.
    """

    def init_fn(params):
        return ScaleByRowwiseAdagradState(
            jax.tree.map(lambda p: jnp.full(p.shape[:1], initial_accumulator_value, p.dtype), params)
        )

    def row_mean(g):
        sq = jnp.square(g.astype(jnp.float32))
        return sq if g.ndim <= 1 else jnp.mean(sq.reshape(g.shape[0], -1), axis=1)

    def update_fn(updates, state, params=None):
        del params
        acc = jax.tree.map(lambda a, g: a + row_mean(g).astype(a.dtype), state.sum_of_row_means, updates)

        def scale(g, a):
            denom = (jnp.sqrt(a) + eps).reshape(a.shape + (1,) * (g.ndim - a.ndim))
            return (g / denom).astype(g.dtype)

        return jax.tree.map(scale, updates, acc), ScaleByRowwiseAdagradState(acc)

    return optax.GradientTransformation(init_fn, update_fn)


def rowwise_adagrad(
    learning_rate: Any, initial_accumulator_value: Any = 0.0, eps: Any = 1e-8
) -> optax.GradientTransformation:
    """``scale_by_rowwise_adagrad`` then ``scale_by_learning_rate``: u_r = −α·g_r/(√a_r + eps)."""
    return optax.chain(
        scale_by_rowwise_adagrad(initial_accumulator_value, eps), optax.scale_by_learning_rate(learning_rate)
    )


def sparse_sgd(learning_rate: Any, momentum: Any = None) -> optax.GradientTransformation:
    """SGD with (heavy-ball) momentum, row-local: τ = g + μ·τ; u = −α·τ (no momentum: u = −α·g).

    optax.sgd's trace is already row-local; under a row-sparse gradient only the touched rows'
    traces decay (MXNet ``sgd_mom_update(lazy_update=True)``, PyTorch ``SparseAdam``'s convention
    for untouched rows).

    References:
      MXNet ``sgd_mom_update`` with ``lazy_update=True``; optax ``sgd``.
    """
    return optax.sgd(learning_rate, momentum)


def _register(name: str, build: Any, hps: list, doc: str, formula: str, equivalent: str) -> None:
    register(
        Rule(
            name=name,
            kind="optimizer",
            library="optserve",
            build=build,
            hyperparams=tuple(hps),
            doc=doc + LAZY_NOTE,
            formula=formula,
            equivalent=equivalent,
            schedules=("learning_rate",),
        )
    )


_register(
    "lazy_adam",
    lazy_adam,
    [LEARNING_RATE, B1, B2, EPS],
    "Adam for embedding tables with TF LazyAdam / MXNet `adam_update(lazy_update=True)` semantics: moments "
    "and parameters of untouched rows unchanged; bias correction by the update count (the model's step).",
    "m = b1·m + (1−b1)·g; v = b2·v + (1−b2)·g²; u = −α·√(1−b2ᵗ)/(1−b1ᵗ)·m/(√v + eps), touched rows only",
    "tfa.optimizers.LazyAdam(learning_rate, beta_1=b1, beta_2=b2, epsilon=eps)",
)
_register(
    "rowwise_adagrad",
    rowwise_adagrad,
    [
        LEARNING_RATE,
        HP("initial_accumulator_value", NONNEG, 0.0, "a₀ of every row's accumulator"),
        HP("eps", NONNEG, 1e-8, "added to √a"),
    ],
    "FBGEMM's exact row-wise Adagrad (TorchRec `EXACT_ROWWISE_ADAGRAD`): one accumulator per row (shape "
    "[rows]), the running sum of the mean of the row's squared gradient.",
    "a_r = a_r + mean_j(g_rj²); u_r = −α·g_r/(√a_r + eps), touched rows only",
    "fbgemm_gpu EmbOptimType.EXACT_ROWWISE_ADAGRAD(learning_rate, eps) without weight decay",
)
_register(
    "sparse_sgd",
    sparse_sgd,
    [LEARNING_RATE, MOMENTUM_OPT],
    "SGD with optional heavy-ball momentum for embedding tables (MXNet `sgd_mom_update(lazy_update=True)`): "
    "the momentum of untouched rows does not decay.",
    "τ = g + μ·τ; u = −α·τ (no momentum: u = −α·g), touched rows only",
    "optax.sgd(learning_rate, momentum) restricted to the touched rows",
)
