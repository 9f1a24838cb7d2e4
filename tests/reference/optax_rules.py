"""Canonical rules (optax names and code defaults, docs/optimizer-catalogue.md §3.1/§3.2, rows O1-O5, P1-P22).

Each transform is a small class with explicit state, written from the formulas of
docs/optimizer-catalogue.md in float64 NumPy (never calling optax).  ``t`` is the update count after the
increment (t = 1 at the first update), ``c = t - 1`` the count a schedule receives.
Signs follow optax: the ``scale_by_*`` transforms return the positive preconditioned direction
and ``scale_by_learning_rate`` flips the sign.
"""

from __future__ import annotations

import numpy as np

from .core import (
    REQUIRED,
    Chain,
    SpecError,
    Transform,
    bias_correction,
    full_like,
    leaf_norm,
    rule,
    tree_map,
    zeros_like,
)
from .schedules import as_schedule, is_constant

# --------------------------------------------------------------------------------------------
# stateless transforms


class Identity(Transform):
    """u = g  (P8)."""

    def update(self, updates, state, params):
        return dict(updates), state


class Scale(Transform):
    """u = α·g  (P9)."""

    def __init__(self, step_size: float):
        self.step_size = float(step_size)

    def update(self, updates, state, params):
        return tree_map(lambda g: self.step_size * g, updates), state


class ScaleBySchedule(Transform):
    """u = s(c)·g with c = 0, 1, 2, ... the count before the increment (P15, O5)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def init(self, params):
        return 0

    def update(self, updates, count, params):
        s = self.schedule(count)
        return tree_map(lambda g: s * g, updates), count + 1


def scale_by_learning_rate(learning_rate, flip_sign: bool = True, path: str = "") -> Transform:
    """u = -lr·g (flip_sign) or lr·g; a schedule becomes ScaleBySchedule(±s(c)) (optax
    ``scale_by_learning_rate``)."""
    m = -1.0 if flip_sign else 1.0
    if is_constant(learning_rate):
        return Scale(m * learning_rate)
    sched = as_schedule(learning_rate, path)
    return ScaleBySchedule(lambda c: m * sched(c))


class Centralize(Transform):
    """Rank > 1: g − mean(g over axes 1..n−1, keepdims); rank ≤ 1 unchanged (P4, §4.21)."""

    def update(self, updates, state, params):
        def f(g):
            if g.ndim <= 1:
                return g
            return g - g.mean(axis=tuple(range(1, g.ndim)), keepdims=True)

        return tree_map(f, updates), state


class Clip(Transform):
    """u = clip(g, −δ, δ)  (P5, F17)."""

    def __init__(self, max_delta: float):
        self.max_delta = float(max_delta)

    def update(self, updates, state, params):
        return tree_map(lambda g: np.clip(g, -self.max_delta, self.max_delta), updates), state


class ClipByGlobalNorm(Transform):
    """N = √(Σ_leaves Σ g²); u = g if N < max_norm else g·max_norm/N  (P6)."""

    def __init__(self, max_norm: float):
        self.max_norm = float(max_norm)

    def update(self, updates, state, params):
        n = float(np.sqrt(sum(np.sum(np.square(g)) for g in updates.values())))
        if n < self.max_norm:
            return dict(updates), state
        return tree_map(lambda g: g / n * self.max_norm, updates), state


class ClipByLeafNorm(Transform):
    """Per leaf: if ‖g‖ > max_norm then g·max_norm/‖g‖, else g  (§2.1, Flux ClipNorm F18)."""

    def __init__(self, max_norm: float):
        self.max_norm = float(max_norm)

    def update(self, updates, state, params):
        def f(g):
            n = leaf_norm(g)
            return g * (self.max_norm / n) if n > self.max_norm else g

        return tree_map(f, updates), state


class ScaleByTrustRatio(Transform):
    """Per leaf: pn = max(‖p‖, min_norm), gn = max(‖g‖, min_norm); φ = tc·pn/(gn + eps),
    φ = 1 if pn = 0 or gn = 0; u = φ·g  (P18).  Any rank (norm of the flattened leaf)."""

    def __init__(self, min_norm=0.0, trust_coefficient=1.0, eps=0.0):
        self.min_norm, self.tc, self.eps = float(min_norm), float(trust_coefficient), float(eps)

    def update(self, updates, state, params):
        def f(g, p):
            pn = max(leaf_norm(p), self.min_norm)
            gn = max(leaf_norm(g), self.min_norm)
            phi = 1.0 if (pn == 0.0 or gn == 0.0) else self.tc * pn / (gn + self.eps)
            return phi * g

        return tree_map(f, updates, params), state


class AddDecayedWeights(Transform):
    """u = g + λ(c)·p; λ may be a schedule of the count c (P1, F16)."""

    def __init__(self, weight_decay, path: str = ""):
        self.weight_decay = as_schedule(weight_decay, path)

    def init(self, params):
        return 0

    def update(self, updates, count, params):
        lam = self.weight_decay(count)
        return tree_map(lambda g, p: g + lam * p, updates, params), count + 1


class AddNoise(Transform):
    """u = g + σ_t·n, σ_t = √(eta / t^gamma), n ~ N(0, I)  (optax ``add_noise``, P2/A6).

    eta/t^gamma is a *variance* in optax.  The reference draws n from NumPy's generator seeded
    with ``key``; it cannot reproduce jax.random's stream, so noisy rules are checked by
    statistics (``std_at``), never element by element.
    """

    def __init__(self, eta, gamma, key):
        self.eta, self.gamma, self.key = float(eta), float(gamma), int(key)

    def std_at(self, t: int) -> float:
        return float(np.sqrt(self.eta / t**self.gamma))

    def init(self, params):
        return (0, np.random.default_rng(self.key))

    def update(self, updates, state, params):
        count, rng = state
        t = count + 1
        sd = self.std_at(t)
        return tree_map(lambda g: g + sd * rng.standard_normal(g.shape), updates), (t, rng)


# --------------------------------------------------------------------------------------------
# stateful scale_by_* transforms


class Trace(Transform):
    """τ = g + decay·τ; u = τ, or g + decay·τ_new with nesterov  (P22; momentum of sgd)."""

    def __init__(self, decay, nesterov=False):
        self.decay, self.nesterov = float(decay), bool(nesterov)

    def init(self, params):
        return zeros_like(params)

    def update(self, updates, tau, params):
        tau = tree_map(lambda g, t: g + self.decay * t, updates, tau)
        if self.nesterov:
            return tree_map(lambda g, t: g + self.decay * t, updates, tau), tau
        return dict(tau), tau


def _round_to(x: np.ndarray, dtype) -> np.ndarray:
    """Round a float64 array through ``dtype`` (optax casts mu to ``mu_dtype`` after each step)."""
    if dtype is None:
        return x
    import ml_dtypes  # noqa: F401 - registers bfloat16 with NumPy

    return np.asarray(x).astype(np.dtype(dtype)).astype(np.float64)


def _nesterov_mu_hat(m, g, b1, t):
    """Dozat's look-ahead: b1·m/(1 − b1^{t+1}) + (1 − b1)·g/(1 − b1^t)  (O2)."""
    return b1 * bias_correction(m, b1, t + 1) + (1.0 - b1) * bias_correction(g, b1, t)


class ScaleByAdam(Transform):
    """m = b1·m + (1−b1)·g; v = b2·v + (1−b2)·g²; m̂ = m/(1−b1^t) (nesterov: O2);
    v̂ = v/(1−b2^t); u = m̂/(√(v̂ + eps_root) + eps); m stored rounded to mu_dtype (O1-O4, P10)."""

    def __init__(self, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, nesterov=False, mu_dtype=None):
        self.b1, self.b2, self.eps, self.eps_root = map(float, (b1, b2, eps, eps_root))
        self.nesterov, self.mu_dtype = bool(nesterov), mu_dtype

    def init(self, params):
        return (0, zeros_like(params), zeros_like(params))

    def update(self, updates, state, params):
        t, m, v = state
        b1, b2 = self.b1, self.b2
        t += 1
        m = tree_map(lambda g, m: b1 * m + (1 - b1) * g, updates, m)
        v = tree_map(lambda g, v: b2 * v + (1 - b2) * g * g, updates, v)

        def u(g, m, v):
            m_hat = _nesterov_mu_hat(m, g, b1, t) if self.nesterov else bias_correction(m, b1, t)
            return m_hat / (np.sqrt(bias_correction(v, b2, t) + self.eps_root) + self.eps)

        out = tree_map(u, updates, m, v)
        m = tree_map(lambda x: _round_to(x, self.mu_dtype), m)
        return out, (t, m, v)


class ScaleByBelief(Transform):
    """m = b1·m + (1−b1)·g; s = b2·s + (1−b2)·(g − m_t)² + eps_root (eps_root accumulates in the
    state, §4.2); u = m̂/(√ŝ + eps)  (A1 intended form, P11; optax ≥0.2.4 uses m_t)."""

    def __init__(self, b1=0.9, b2=0.999, eps=1e-16, eps_root=1e-16, nesterov=False):
        self.b1, self.b2, self.eps, self.eps_root = map(float, (b1, b2, eps, eps_root))
        self.nesterov = bool(nesterov)

    def init(self, params):
        return (0, zeros_like(params), zeros_like(params))

    def update(self, updates, state, params):
        t, m, s = state
        b1, b2 = self.b1, self.b2
        t += 1
        m = tree_map(lambda g, m: b1 * m + (1 - b1) * g, updates, m)
        s = tree_map(lambda g, m, s: b2 * s + (1 - b2) * (g - m) ** 2 + self.eps_root, updates, m, s)

        def u(g, m, s):
            m_hat = _nesterov_mu_hat(m, g, b1, t) if self.nesterov else bias_correction(m, b1, t)
            return m_hat / (np.sqrt(bias_correction(s, b2, t)) + self.eps)

        return tree_map(u, updates, m, s), (t, m, s)


class ScaleByRAdam(Transform):
    """ρ∞ = 2/(1−b2) − 1; ρ_t = ρ∞ − 2t·b2^t/(1−b2^t).  If ρ_t ≥ threshold:
    u = r_t·m̂/(√(v̂ + eps_root) + eps), r_t = √((ρ_t−4)(ρ_t−2)ρ∞/((ρ∞−4)(ρ∞−2)ρ_t));
    otherwise u = m̂  (A7, P12).  ``rho_inf_from_b1`` is the Axon/Polaris bug (§2.9):
    ρ∞ = 2/(1−b1) − 1."""

    def __init__(self, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, threshold=5.0, nesterov=False, rho_inf_from_b1=False):
        self.b1, self.b2, self.eps, self.eps_root = map(float, (b1, b2, eps, eps_root))
        self.threshold, self.nesterov = float(threshold), bool(nesterov)
        self.rho_inf = 2.0 / (1.0 - (self.b1 if rho_inf_from_b1 else self.b2)) - 1.0

    def rho(self, t: int) -> float:
        b2t = self.b2**t
        return self.rho_inf - 2.0 * t * b2t / (1.0 - b2t)

    def init(self, params):
        return (0, zeros_like(params), zeros_like(params))

    def update(self, updates, state, params):
        t, m, v = state
        b1, b2 = self.b1, self.b2
        t += 1
        m = tree_map(lambda g, m: b1 * m + (1 - b1) * g, updates, m)
        v = tree_map(lambda g, v: b2 * v + (1 - b2) * g * g, updates, v)
        rho, ri = self.rho(t), self.rho_inf

        def u(g, m, v):
            m_hat = _nesterov_mu_hat(m, g, b1, t) if self.nesterov else bias_correction(m, b1, t)
            if rho >= self.threshold:
                r = np.sqrt((rho - 4) * (rho - 2) * ri / ((ri - 4) * (ri - 2) * rho))
                return r * m_hat / (np.sqrt(bias_correction(v, b2, t) + self.eps_root) + self.eps)
            return m_hat

        return tree_map(u, updates, m, v), (t, m, v)


class ScaleByRms(Transform):
    """ν₀ = initial_scale; ν = decay·ν + (1−decay)·g²; ν̂ = ν/(1−decay^t) if bias_correction
    else ν; u = g/√(ν̂ + eps) (eps_in_sqrt) or g/(√ν̂ + eps)  (P13, A8, F4)."""

    def __init__(self, decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=True, bias_correction=False):
        self.decay, self.eps, self.initial_scale = map(float, (decay, eps, initial_scale))
        self.eps_in_sqrt, self.bias_correction = bool(eps_in_sqrt), bool(bias_correction)

    def init(self, params):
        return (0, full_like(params, self.initial_scale))

    def update(self, updates, state, params):
        t, nu = state
        d = self.decay
        nu = tree_map(lambda g, n: d * n + (1 - d) * g * g, updates, nu)
        if self.bias_correction:
            t += 1
            nu_hat = tree_map(lambda n: bias_correction(n, d, t), nu)
        else:
            nu_hat = nu
        if self.eps_in_sqrt:
            out = tree_map(lambda g, n: g / np.sqrt(n + self.eps), updates, nu_hat)
        else:
            out = tree_map(lambda g, n: g / (np.sqrt(n) + self.eps), updates, nu_hat)
        return out, (t, nu)


class ScaleByStddev(Transform):
    """μ = decay·μ + (1−decay)·g; ν = decay·ν + (1−decay)·g² (ν₀ = initial_scale);
    u = g/√(ν̂ − μ̂² + eps) (eps_in_sqrt) or g/(√(ν̂ − μ̂²) + eps)  (P17; centered rmsprop)."""

    def __init__(self, decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=True, bias_correction=False):
        self.decay, self.eps, self.initial_scale = map(float, (decay, eps, initial_scale))
        self.eps_in_sqrt, self.bias_correction = bool(eps_in_sqrt), bool(bias_correction)

    def init(self, params):
        return (0, zeros_like(params), full_like(params, self.initial_scale))

    def update(self, updates, state, params):
        t, mu, nu = state
        d = self.decay
        mu = tree_map(lambda g, m: d * m + (1 - d) * g, updates, mu)
        nu = tree_map(lambda g, n: d * n + (1 - d) * g * g, updates, nu)
        if self.bias_correction:
            t += 1
            mu_hat = tree_map(lambda m: bias_correction(m, d, t), mu)
            nu_hat = tree_map(lambda n: bias_correction(n, d, t), nu)
        else:
            mu_hat, nu_hat = mu, nu
        if self.eps_in_sqrt:
            out = tree_map(lambda g, m, n: g / np.sqrt(n - m * m + self.eps), updates, mu_hat, nu_hat)
        else:
            out = tree_map(lambda g, m, n: g / (np.sqrt(n - m * m) + self.eps), updates, mu_hat, nu_hat)
        return out, (t, mu, nu)


class ScaleByRss(Transform):
    """G₀ = initial_accumulator_value; G = G + g²; u = g/√(G + eps), and 0 where G = 0
    (P14, A2)."""

    def __init__(self, initial_accumulator_value=0.1, eps=1e-7):
        self.initial, self.eps = float(initial_accumulator_value), float(eps)

    def init(self, params):
        return full_like(params, self.initial)

    def update(self, updates, acc, params):
        acc = tree_map(lambda g, a: a + g * g, updates, acc)

        def u(g, a):
            safe = np.where(a > 0, a, 1.0)
            return np.where(a > 0, g / np.sqrt(safe + self.eps), 0.0)

        return tree_map(u, updates, acc), acc


class ScaleByYogi(Transform):
    """m₀ = v₀ = initial_accumulator_value; m = b1·m + (1−b1)·g;
    v = v − (1−b2)·sign(v − g²)·g²; u = m̂/(√(v̂ + eps_root) + eps)  (A10, P19)."""

    def __init__(self, b1=0.9, b2=0.999, eps=1e-3, eps_root=0.0, initial_accumulator_value=1e-6):
        self.b1, self.b2, self.eps, self.eps_root = map(float, (b1, b2, eps, eps_root))
        self.initial = float(initial_accumulator_value)

    def init(self, params):
        return (0, full_like(params, self.initial), full_like(params, self.initial))

    def update(self, updates, state, params):
        t, m, v = state
        b1, b2 = self.b1, self.b2
        t += 1
        m = tree_map(lambda g, m: b1 * m + (1 - b1) * g, updates, m)
        v = tree_map(lambda g, v: v - (1 - b2) * np.sign(v - g * g) * g * g, updates, v)
        out = tree_map(
            lambda m, v: bias_correction(m, b1, t) / (np.sqrt(bias_correction(v, b2, t) + self.eps_root) + self.eps),
            m,
            v,
        )
        return out, (t, m, v)


class ScaleByAmsgrad(Transform):
    """m = b1·m + (1−b1)·g; v = b2·v + (1−b2)·g²; v_max = max(v_max, v̂ or v);
    u = (m̂ or m)/(√(v_max + eps_root) + eps)  (optax ``scale_by_amsgrad``, §4.12)."""

    def __init__(
        self, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, bias_correction_mu=True, bias_correction_nu=True, mu_dtype=None
    ):
        self.b1, self.b2, self.eps, self.eps_root = map(float, (b1, b2, eps, eps_root))
        self.bc_mu, self.bc_nu, self.mu_dtype = bool(bias_correction_mu), bool(bias_correction_nu), mu_dtype

    def init(self, params):
        return (0, zeros_like(params), zeros_like(params), zeros_like(params))

    def update(self, updates, state, params):
        t, m, v, vmax = state
        b1, b2 = self.b1, self.b2
        t += 1
        m = tree_map(lambda g, m: b1 * m + (1 - b1) * g, updates, m)
        v = tree_map(lambda g, v: b2 * v + (1 - b2) * g * g, updates, v)
        v_eff = tree_map(lambda v: bias_correction(v, b2, t) if self.bc_nu else v, v)
        vmax = tree_map(np.maximum, vmax, v_eff)
        out = tree_map(
            lambda m, vm: (bias_correction(m, b1, t) if self.bc_mu else m) / (np.sqrt(vm + self.eps_root) + self.eps),
            m,
            vmax,
        )
        m = tree_map(lambda x: _round_to(x, self.mu_dtype), m)
        return out, (t, m, v, vmax)


class ScaleByAdamax(Transform):
    """m = b1·m + (1−b1)·g; ν = max(|g| + eps, b2·ν) (eps inside the max, §4.2); u = m̂/ν."""

    def __init__(self, b1=0.9, b2=0.999, eps=1e-8):
        self.b1, self.b2, self.eps = map(float, (b1, b2, eps))

    def init(self, params):
        return (0, zeros_like(params), zeros_like(params))

    def update(self, updates, state, params):
        t, m, nu = state
        t += 1
        m = tree_map(lambda g, m: self.b1 * m + (1 - self.b1) * g, updates, m)
        nu = tree_map(lambda g, n: np.maximum(np.abs(g) + self.eps, self.b2 * n), updates, nu)
        return tree_map(lambda m, n: bias_correction(m, self.b1, t) / n, m, nu), (t, m, nu)


class ScaleByAdadelta(Transform):
    """E[g²] = ρ·E[g²] + (1−ρ)·g²; u = g·√(E[Δx²] + eps)/√(E[g²] + eps);
    E[Δx²] = ρ·E[Δx²] + (1−ρ)·u²  (F9 fixed form, optax ``scale_by_adadelta``)."""

    def __init__(self, rho=0.9, eps=1e-6):
        self.rho, self.eps = float(rho), float(eps)

    def init(self, params):
        return (zeros_like(params), zeros_like(params))

    def update(self, updates, state, params):
        e_g, e_x = state
        r = self.rho
        e_g = tree_map(lambda g, e: r * e + (1 - r) * g * g, updates, e_g)
        out = tree_map(lambda g, eg, ex: np.sqrt(ex + self.eps) / np.sqrt(eg + self.eps) * g, updates, e_g, e_x)
        e_x = tree_map(lambda u, e: r * e + (1 - r) * u * u, out, e_x)
        return out, (e_g, e_x)


# --------------------------------------------------------------------------------------------
# spec registration: transforms (§3.2)


@rule("identity")
def _identity():
    return Identity()


@rule("scale", step_size=REQUIRED)
def _scale(step_size):
    return Scale(step_size)


@rule("scale_by_learning_rate", learning_rate=REQUIRED, flip_sign=True)
def _scale_by_lr(learning_rate, flip_sign):
    return scale_by_learning_rate(learning_rate, flip_sign)


@rule("scale_by_schedule", schedule=REQUIRED)
def _scale_by_schedule(schedule):
    return ScaleBySchedule(as_schedule(schedule))


@rule("scale_by_adam", b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, nesterov=False)
def _scale_by_adam(**kw):
    return ScaleByAdam(**kw)


@rule("scale_by_belief", b1=0.9, b2=0.999, eps=1e-16, eps_root=1e-16, nesterov=False)
def _scale_by_belief(**kw):
    return ScaleByBelief(**kw)


@rule("scale_by_radam", b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, threshold=5.0, nesterov=False)
def _scale_by_radam(**kw):
    return ScaleByRAdam(**kw)


@rule("scale_by_rms", decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=True, bias_correction=False)
def _scale_by_rms(**kw):
    return ScaleByRms(**kw)


@rule("scale_by_rss", initial_accumulator_value=0.1, eps=1e-7)
def _scale_by_rss(**kw):
    return ScaleByRss(**kw)


@rule("scale_by_stddev", decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=True, bias_correction=False)
def _scale_by_stddev(**kw):
    return ScaleByStddev(**kw)


@rule("scale_by_trust_ratio", min_norm=0.0, trust_coefficient=1.0, eps=0.0)
def _scale_by_trust_ratio(**kw):
    return ScaleByTrustRatio(**kw)


@rule("scale_by_yogi", b1=0.9, b2=0.999, eps=1e-3, eps_root=0.0, initial_accumulator_value=1e-6)
def _scale_by_yogi(**kw):
    return ScaleByYogi(**kw)


@rule(
    "scale_by_amsgrad",
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    mu_dtype=None,
    bias_correction_mu=True,
    bias_correction_nu=True,
)
def _scale_by_amsgrad(**kw):
    return ScaleByAmsgrad(**kw)


@rule("scale_by_adamax", b1=0.9, b2=0.999, eps=1e-8)
def _scale_by_adamax(**kw):
    return ScaleByAdamax(**kw)


@rule("scale_by_adadelta", rho=0.9, eps=1e-6)
def _scale_by_adadelta(**kw):
    return ScaleByAdadelta(**kw)


@rule("trace", decay=REQUIRED, nesterov=False)
def _trace(decay, nesterov):
    return Trace(decay, nesterov)


@rule("add_decayed_weights", weight_decay=0.0)
def _add_decayed_weights(weight_decay):
    return AddDecayedWeights(weight_decay)


@rule("add_noise", eta=REQUIRED, gamma=REQUIRED, key=REQUIRED)
def _add_noise(eta, gamma, key):
    """Decision: the seed is required (issue 3, §4.19); it is named ``key`` as in optax (§3.5)."""
    return AddNoise(eta, gamma, key)


@rule("centralize")
def _centralize():
    return Centralize()


@rule("clip", max_delta=REQUIRED)
def _clip(max_delta):
    return Clip(max_delta)


@rule("clip_by_global_norm", max_norm=REQUIRED)
def _clip_by_global_norm(max_norm):
    return ClipByGlobalNorm(max_norm)


@rule("clip_by_leaf_norm", max_norm=REQUIRED)
def _clip_by_leaf_norm(max_norm):
    return ClipByLeafNorm(max_norm)


# --------------------------------------------------------------------------------------------
# spec registration: optimizers (§3.1), each the optax 0.2.8 alias composition

_ADAM_HP = dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None)


def _lr(learning_rate) -> Transform:
    return scale_by_learning_rate(learning_rate)


@rule("sgd", learning_rate=REQUIRED, momentum=None, nesterov=False)
def sgd(learning_rate, momentum, nesterov):
    """τ = g + μτ; u = −lr·τ (nesterov: −lr·(g + μτ)); trace *before* the LR (A9, J2)."""
    first = Trace(momentum, nesterov) if momentum is not None else Identity()
    return Chain(first, _lr(learning_rate))


@rule("noisy_sgd", learning_rate=REQUIRED, eta=0.01, gamma=0.55, key=REQUIRED)
def noisy_sgd(learning_rate, eta, gamma, key):
    """u = −lr·(g + √(eta/t^γ)·n): noise before the LR, eta/t^γ a variance (A6, §4.4)."""
    return Chain(AddNoise(eta, gamma, key), _lr(learning_rate))


@rule("adam", learning_rate=REQUIRED, nesterov=False, **_ADAM_HP)
def adam(learning_rate, nesterov, **kw):
    """chain(scale_by_adam, scale_by_learning_rate)  (O1)."""
    return Chain(ScaleByAdam(nesterov=nesterov, **kw), _lr(learning_rate))


@rule("nadam", learning_rate=REQUIRED, nesterov=True, **_ADAM_HP)
def nadam(learning_rate, nesterov, **kw):
    """adam with nesterov=True (O2): no extra β2 in the denominator (§4.15)."""
    return Chain(ScaleByAdam(nesterov=nesterov, **kw), _lr(learning_rate))


@rule("adamw", learning_rate=REQUIRED, weight_decay=1e-4, nesterov=False, **_ADAM_HP)
def adamw(learning_rate, weight_decay, nesterov, **kw):
    """u = −lr·(m̂/(√(v̂+eps_root)+eps) + λ·p): decay multiplied by the LR (§4.10)."""
    return Chain(ScaleByAdam(nesterov=nesterov, **kw), AddDecayedWeights(weight_decay), _lr(learning_rate))


@rule("radam", learning_rate=REQUIRED, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, threshold=5.0, nesterov=False)
def radam(learning_rate, **kw):
    return Chain(ScaleByRAdam(**kw), _lr(learning_rate))


@rule("adamax", learning_rate=REQUIRED, b1=0.9, b2=0.999, eps=1e-8)
def adamax(learning_rate, **kw):
    return Chain(ScaleByAdamax(**kw), _lr(learning_rate))


@rule("amsgrad", learning_rate=REQUIRED, bias_correction_mu=True, bias_correction_nu=True, **_ADAM_HP)
def amsgrad(learning_rate, **kw):
    return Chain(ScaleByAmsgrad(**kw), _lr(learning_rate))


@rule("adagrad", learning_rate=REQUIRED, initial_accumulator_value=0.1, eps=1e-7)
def adagrad(learning_rate, **kw):
    return Chain(ScaleByRss(**kw), _lr(learning_rate))


@rule("adadelta", learning_rate=1.0, rho=0.9, eps=1e-6, weight_decay=0.0)
def adadelta(learning_rate, rho, eps, weight_decay):
    """chain(add_decayed_weights, scale_by_adadelta, scale_by_learning_rate).  The LR defaults
    to 1.0, never optax's None, which would ascend (§4.9)."""
    if learning_rate is None:
        raise SpecError("adadelta.learning_rate: must be a number or a schedule (None ascends)")
    return Chain(AddDecayedWeights(weight_decay), ScaleByAdadelta(rho, eps), _lr(learning_rate))


@rule(
    "rmsprop",
    learning_rate=REQUIRED,
    decay=0.9,
    eps=1e-8,
    initial_scale=0.0,
    eps_in_sqrt=True,
    centered=False,
    momentum=None,
    nesterov=False,
    bias_correction=False,
)
def rmsprop(learning_rate, decay, eps, initial_scale, eps_in_sqrt, centered, momentum, nesterov, bias_correction):
    """x = −lr·g/√(ν + eps) (centered: √(ν − μ² + eps)); the LR comes *before* the momentum
    trace (A8)."""
    cls = ScaleByStddev if centered else ScaleByRms
    parts = [cls(decay, eps, initial_scale, eps_in_sqrt, bias_correction), _lr(learning_rate)]
    if momentum is not None:
        parts.append(Trace(momentum, nesterov))
    return Chain(*parts)


@rule("adabelief", learning_rate=REQUIRED, b1=0.9, b2=0.999, eps=1e-16, eps_root=1e-16, nesterov=False)
def adabelief(learning_rate, **kw):
    return Chain(ScaleByBelief(**kw), _lr(learning_rate))


@rule("lamb", learning_rate=REQUIRED, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0, weight_decay=0.0)
def lamb(learning_rate, b1, b2, eps, eps_root, weight_decay):
    """r = m̂/(√(v̂+eps_root)+eps) + λp; u = −lr·φ·r with the per-leaf trust ratio (A5)."""
    return Chain(
        ScaleByAdam(b1, b2, eps, eps_root), AddDecayedWeights(weight_decay), ScaleByTrustRatio(), _lr(learning_rate)
    )


@rule("lars", learning_rate=REQUIRED, weight_decay=0.0, trust_coefficient=1e-3, eps=0.0, momentum=0.9, nesterov=False)
def lars(learning_rate, weight_decay, trust_coefficient, eps, momentum, nesterov):
    """r = g + λp; φ = tc·‖p‖/(‖r‖ + eps); LR *inside* the momentum buffer (§4.5)."""
    return Chain(
        AddDecayedWeights(weight_decay),
        ScaleByTrustRatio(0.0, trust_coefficient, eps),
        _lr(learning_rate),
        Trace(momentum, nesterov),
    )


@rule("yogi", learning_rate=REQUIRED, b1=0.9, b2=0.999, eps=1e-3)
def yogi(learning_rate, b1, b2, eps):
    """optax.yogi: scale_by_yogi with its built-in init 1e-6 and eps_root 0 (A10)."""
    return Chain(ScaleByYogi(b1, b2, eps), _lr(learning_rate))
