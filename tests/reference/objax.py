"""objax.optimizer presets (docs/optimizer-catalogue.md rows J1-J5, §2.7, §2.8, §2.11; objax 9dd7dc3).

objax passes the learning rate on every call and mutates ``p`` in place; here the per-call LR is
the ``learning_rate`` hyperparameter (required: objax has no default), a number or a schedule of
the count c = t − 1, and ``p -= x`` is expressed as u = −x.  Names are canonical (§3.5):
beta1/beta2 → b1/b2, tc → trust_coefficient.
"""

from __future__ import annotations

import math

import numpy as np

from .core import REQUIRED, Transform, leaf_norm, rule, tree_map, zeros_like
from .schedules import as_schedule


class _ObjaxRule(Transform):
    def __init__(self, learning_rate):
        self.lr = as_schedule(learning_rate)


class SGD(_ObjaxRule):
    """p −= lr·g  (J3)."""

    def init(self, params):
        return 0

    def update(self, g, count, params):
        lr = self.lr(count)
        return tree_map(lambda g: -lr * g, g), count + 1


class Momentum(_ObjaxRule):
    """m = g + μ·m; p −= lr·m (nesterov: p −= lr·(g + μ·m))  (J2).  LR after the trace."""

    def __init__(self, learning_rate, momentum, nesterov):
        super().__init__(learning_rate)
        self.mu, self.nesterov = float(momentum), bool(nesterov)

    def init(self, params):
        return (0, zeros_like(params))

    def update(self, g, state, params):
        count, m = state
        lr = self.lr(count)
        m = tree_map(lambda g, m: g + self.mu * m, g, m)
        out = tree_map(lambda g, m: -lr * (g + self.mu * m), g, m) if self.nesterov else tree_map(lambda m: -lr * m, m)
        return out, (count + 1, m)


class Adam(_ObjaxRule):
    """t += 1; lr_t = lr·√(1−β2^t)/(1−β1^t); m += (1−β1)(g − m); v += (1−β2)(g² − v);
    p −= lr_t·m/√(v + eps)  (J1, §2.7): eps inside the sqrt on the *uncorrected* v, i.e. a
    time-varying eps_root = eps/(1−β2^t) and no outer eps (§4.1)."""

    def __init__(self, learning_rate, b1, b2, eps):
        super().__init__(learning_rate)
        self.b1, self.b2, self.eps = float(b1), float(b2), float(eps)

    def init(self, params):
        return (0, zeros_like(params), zeros_like(params))

    def update(self, g, state, params):
        t, m, v = state
        lr = self.lr(t)
        t += 1
        lr_t = lr * math.sqrt(1 - self.b2**t) / (1 - self.b1**t)
        m = tree_map(lambda g, m: m + (1 - self.b1) * (g - m), g, m)
        v = tree_map(lambda g, v: v + (1 - self.b2) * (g * g - v), g, v)
        return tree_map(lambda m, v: -lr_t * m / np.sqrt(v + self.eps), m, v), (t, m, v)


class LARS(_ObjaxRule):
    """Per leaf: tr = tc·‖p‖/(‖g‖ + wd·‖p‖ + eps); k = max(1[‖p‖ = 0 or ‖g‖ = 0], tr);
    m = μ·m + lr·k·(g + wd·p); p −= m  (J4, §2.8, §4.5): the paper's sum of norms, not optax's
    ‖g + wd·p‖, and LR inside the momentum buffer."""

    def __init__(self, learning_rate, momentum, weight_decay, trust_coefficient, eps):
        super().__init__(learning_rate)
        self.mu, self.wd = float(momentum), float(weight_decay)
        self.tc, self.eps = float(trust_coefficient), float(eps)

    def init(self, params):
        return (0, zeros_like(params))

    def update(self, g, state, params):
        count, m = state
        lr = self.lr(count)

        def step(g, p, m):
            pn, gn = leaf_norm(p), leaf_norm(g)
            with np.errstate(divide="ignore", invalid="ignore"):  # jnp semantics: x/0 = inf
                tr = np.float64(self.tc * pn) / np.float64(gn + self.wd * pn + self.eps)
            k = max(1.0 if (pn == 0.0 or gn == 0.0) else 0.0, tr)
            return self.mu * m + lr * k * (g + self.wd * p)

        m = tree_map(step, g, params, m)
        return tree_map(lambda m: -m, m), (count + 1, m)


@rule("objax:SGD", learning_rate=REQUIRED)
def _sgd(learning_rate):
    return SGD(learning_rate)


@rule("objax:Momentum", learning_rate=REQUIRED, momentum=0.9, nesterov=False)
def _momentum(learning_rate, momentum, nesterov):
    return Momentum(learning_rate, momentum, nesterov)


@rule("objax:Adam", learning_rate=REQUIRED, b1=0.9, b2=0.999, eps=1e-8)
def _adam(learning_rate, b1, b2, eps):
    return Adam(learning_rate, b1, b2, eps)


@rule("objax:LARS", learning_rate=REQUIRED, momentum=0.9, weight_decay=1e-4, trust_coefficient=1e-3, eps=1e-5)
def _lars(learning_rate, momentum, weight_decay, trust_coefficient, eps):
    return LARS(learning_rate, momentum, weight_decay, trust_coefficient, eps)


class ParamsEMA:
    """objax ExponentialMovingAverage over parameters (J5, §2.11), not a gradient transform.

    After each applied step: t += 1; e = e + (1 − μ)(w − e), with e₀ = 0.
    Read: e, or e/(1 − (1 − eps)·μ^t) when debias is on.
    Defaults are objax's: momentum μ = 0.999, debias False, eps 1e-6 (μ is named ``decay``, the
    canonical name of an EMA rate in §3.5).
    """

    def __init__(self, decay=0.999, debias=False, eps=1e-6):
        self.mu, self.debias, self.eps = float(decay), bool(debias), float(eps)

    def init(self, params):
        return (0, zeros_like({k: np.asarray(v, np.float64) for k, v in params.items()}))

    def update(self, params, state):
        t, e = state
        e = tree_map(lambda w, e: e + (1 - self.mu) * (np.asarray(w, np.float64) - e), params, e)
        return (t + 1, e)

    def read(self, state):
        t, e = state
        if not self.debias:
            return dict(e)
        return tree_map(lambda e: e / (1 - (1 - self.eps) * self.mu**t), e)
