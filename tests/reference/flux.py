"""Flux.Optimise presets (docs/optimizer-catalogue.md rows F1-F18; Flux master 089ec08, ADADelta v0.11.1).

Each class below transcribes Flux's ``apply!(o, x, Δ)``: it returns Flux's Δ, with the
learning rate η inside, and Flux applies ``p ← p − Δ``.  A preset ``flux:X`` is therefore
``Chain(X_Δ, Scale(−1))`` (u = −Δ, §Notation), and ``{"flux:Optimiser": [a, b, ...]}`` is
``Chain(a_Δ, b_Δ, ..., Scale(−1))``: each member applies its own η, so learning rates multiply,
and the sign is flipped exactly once, at the end (F13, §4.11, §4.18).

``ϵ = 1e-8`` is Flux's module constant, not a hyperparameter.  State is keyed by leaf path, not
by array identity (§4.11); ExpDecay's "first parameter to hit the boundary" trigger is therefore
a per-step schedule (it is the same thing whenever decay_step ≥ 2).

Hyperparameter names are the canonical ones (§3.5): η → learning_rate, β → b1, b2,
ρ → momentum (Momentum, Nesterov) / decay (RMSProp) / rho (ADADelta), ADAMW decay and
WeightDecay wd → weight_decay, ClipValue thresh → max_delta, ClipNorm thresh → max_norm,
InvDecay γ → gamma.  Decision for ExpDecay (§3.5 names none): η → learning_rate,
decay → decay_rate, decay_step → transition_steps, clip → end_value (the names of the
equivalent ``exponential_decay``).  η may also be a schedule spec, evaluated at the Flux step
count minus one (c = 0 at the first update), so LR placement differences show (§4.3).
"""

from __future__ import annotations

import math

import numpy as np

from .core import (
    REQUIRED,
    Chain,
    SpecError,
    Transform,
    full_like,
    leaf_norm,
    make_builder,
    register_builder,
    rule,
    split_spec,
    tree_map,
    zeros_like,
)
from .optax_rules import Scale
from .schedules import as_schedule

EPS = 1e-8  # Flux: const ϵ = 1e-8

# lower-case Flux name -> builder(args, path) of the unsigned Δ-transform (Optimiser members)
_DELTA_BUILDERS: dict[str, object] = {}


class FluxRule(Transform):
    """Base for Δ-transforms: per-leaf state dict plus the step count n = 1, 2, ...
    (``self.eta(n − 1)`` is the learning rate of step n)."""

    def __init__(self, learning_rate=0.0):
        self.eta = as_schedule(learning_rate)

    def init(self, params):
        return (0, self.init_leaves(params))

    def init_leaves(self, params):
        return None

    def update(self, updates, state, params):
        n, s = state
        n += 1
        out, s = self.step(updates, s, params, n, self.eta(n - 1))
        return out, (n, s)

    def step(self, g, s, p, n, eta):
        raise NotImplementedError


class Descent(FluxRule):
    """Δ = η·g  (F1)."""

    def step(self, g, s, p, n, eta):
        return tree_map(lambda g: eta * g, g), s


class Momentum(FluxRule):
    """v = ρ·v − η·g; Δ = −v: the LR is folded into the velocity (F2)."""

    def __init__(self, learning_rate, momentum):
        super().__init__(learning_rate)
        self.rho = float(momentum)

    def init_leaves(self, params):
        return zeros_like(params)

    def step(self, g, v, p, n, eta):
        v = tree_map(lambda g, v: self.rho * v - eta * g, g, v)
        return tree_map(lambda v: -v, v), v


class Nesterov(FluxRule):
    """d = ρ²·v − (1+ρ)·η·g; v = ρ·v − η·g; Δ = −d  (F3)."""

    def __init__(self, learning_rate, momentum):
        super().__init__(learning_rate)
        self.rho = float(momentum)

    def init_leaves(self, params):
        return zeros_like(params)

    def step(self, g, v, p, n, eta):
        r = self.rho
        d = tree_map(lambda g, v: r * r * v - (1 + r) * eta * g, g, v)
        v = tree_map(lambda g, v: r * v - eta * g, g, v)
        return tree_map(lambda d: -d, d), v


class RMSProp(FluxRule):
    """a = ρ·a + (1−ρ)·g²; Δ = η·g/(√a + ϵ): ϵ outside the sqrt (F4, §4.2)."""

    def __init__(self, learning_rate, decay):
        super().__init__(learning_rate)
        self.rho = float(decay)

    def init_leaves(self, params):
        return zeros_like(params)

    def step(self, g, a, p, n, eta):
        a = tree_map(lambda g, a: self.rho * a + (1 - self.rho) * g * g, g, a)
        return tree_map(lambda g, a: eta * g / (np.sqrt(a) + EPS), g, a), a


class _Betas(FluxRule):
    def __init__(self, learning_rate, b1, b2):
        super().__init__(learning_rate)
        self.b1, self.b2 = float(b1), float(b2)


class ADAM(_Betas):
    """m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²; Δ = m/(1−β1^n)/(√(v/(1−β2^n)) + ϵ)·η  (F5)."""

    def init_leaves(self, params):
        return (zeros_like(params), zeros_like(params))

    def step(self, g, s, p, n, eta):
        m, v = s
        b1, b2 = self.b1, self.b2
        m = tree_map(lambda g, m: b1 * m + (1 - b1) * g, g, m)
        v = tree_map(lambda g, v: b2 * v + (1 - b2) * g * g, g, v)
        out = tree_map(lambda m, v: m / (1 - b1**n) / (np.sqrt(v / (1 - b2**n)) + EPS) * eta, m, v)
        return out, (m, v)


class RADAM(_Betas):
    """ρ∞ = 2/(1−β2) − 1; ρ = ρ∞ − 2n·β2^n/(1−β2^n).  If ρ > 4 (strict, the paper's rule, §4.14):
    Δ = m̂/(√v̂ + ϵ)·η·r with r = √((ρ−4)(ρ−2)ρ∞/((ρ∞−4)(ρ∞−2)ρ)); else Δ = m̂·η  (F6)."""

    def init_leaves(self, params):
        return (zeros_like(params), zeros_like(params))

    def step(self, g, s, p, n, eta):
        m, v = s
        b1, b2 = self.b1, self.b2
        ri = 2 / (1 - b2) - 1
        m = tree_map(lambda g, m: b1 * m + (1 - b1) * g, g, m)
        v = tree_map(lambda g, v: b2 * v + (1 - b2) * g * g, g, v)
        rho = ri - 2 * n * b2**n / (1 - b2**n)
        if rho > 4:
            r = math.sqrt((rho - 4) * (rho - 2) * ri / ((ri - 4) * (ri - 2) * rho))
            out = tree_map(lambda m, v: m / (1 - b1**n) / (np.sqrt(v / (1 - b2**n)) + EPS) * eta * r, m, v)
        else:
            out = tree_map(lambda m: m / (1 - b1**n) * eta, m)
        return out, (m, v)


class AdaMax(_Betas):
    """m = β1·m + (1−β1)·g; u = max(β2·u, |g|); Δ = (η/(1−β1^n))·m/(u + ϵ): ϵ after the max
    (F7, §2.5)."""

    def init_leaves(self, params):
        return (zeros_like(params), zeros_like(params))

    def step(self, g, s, p, n, eta):
        m, u = s
        m = tree_map(lambda g, m: self.b1 * m + (1 - self.b1) * g, g, m)
        u = tree_map(lambda g, u: np.maximum(self.b2 * u, np.abs(g)), g, u)
        return tree_map(lambda m, u: (eta / (1 - self.b1**n)) * m / (u + EPS), m, u), (m, u)


class ADAGrad(FluxRule):
    """acc₀ = ϵ; acc = acc + g²; Δ = g·η/(√acc + ϵ)  (F8, §2.4)."""

    def init_leaves(self, params):
        return full_like(params, EPS)

    def step(self, g, acc, p, n, eta):
        acc = tree_map(lambda g, a: a + g * g, g, acc)
        return tree_map(lambda g, a: g * eta / (np.sqrt(a) + EPS), g, acc), acc


class ADADelta(FluxRule):
    """v0.11.1 working form (F9, §4.8): acc = ρ·acc + (1−ρ)·g²; Δ = g·√(Δacc + ϵ)/√(acc + ϵ);
    Δacc = ρ·Δacc + (1−ρ)·Δ².  (The documented 2020 form never moves, Δacc₀ = 0.)"""

    def __init__(self, rho):
        super().__init__(0.0)
        self.rho = float(rho)

    def init_leaves(self, params):
        return (zeros_like(params), zeros_like(params))

    def step(self, g, s, p, n, eta):
        acc, dacc = s
        r = self.rho
        acc = tree_map(lambda g, a: r * a + (1 - r) * g * g, g, acc)
        d = tree_map(lambda g, a, da: g * np.sqrt(da + EPS) / np.sqrt(a + EPS), g, acc, dacc)
        dacc = tree_map(lambda d, da: r * da + (1 - r) * d * d, d, dacc)
        return d, (acc, dacc)


class AMSGrad(_Betas):
    """m₀ = v₀ = v̂₀ = ϵ; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²; v̂ = max(v̂, v);
    Δ = η·m/(√v̂ + ϵ): no bias correction (F10, §2.6)."""

    def init_leaves(self, params):
        return (full_like(params, EPS), full_like(params, EPS), full_like(params, EPS))

    def step(self, g, s, p, n, eta):
        m, v, vh = s
        b1, b2 = self.b1, self.b2
        m = tree_map(lambda g, m: b1 * m + (1 - b1) * g, g, m)
        v = tree_map(lambda g, v: b2 * v + (1 - b2) * g * g, g, v)
        vh = tree_map(np.maximum, vh, v)
        return tree_map(lambda m, vh: eta * m / (np.sqrt(vh) + EPS), m, vh), (m, v, vh)


class NADAM(_Betas):
    """m, v as ADAM; Δ = (β1·m/(1−β1^{n+1}) + (1−β1)·g/(1−β1^n)) / (√(β2·v/(1−β2^n)) + ϵ)·η:
    Dozat's β2 kept in the denominator (F11, §4.15)."""

    def init_leaves(self, params):
        return (zeros_like(params), zeros_like(params))

    def step(self, g, s, p, n, eta):
        m, v = s
        b1, b2 = self.b1, self.b2
        m = tree_map(lambda g, m: b1 * m + (1 - b1) * g, g, m)
        v = tree_map(lambda g, v: b2 * v + (1 - b2) * g * g, g, v)
        out = tree_map(
            lambda g, m, v: (
                (b1 * m / (1 - b1 ** (n + 1)) + (1 - b1) * g / (1 - b1**n))
                / (np.sqrt(v * b2 / (1 - b2**n)) + EPS)
                * eta
            ),
            g,
            m,
            v,
        )
        return out, (m, v)


class ExpDecay(FluxRule):
    """η_n = η₀ while n < s, then max(η₀·decay^⌊n/s⌋, clip); Δ = η_n·g  (F14).
    (Flux mutates η at each multiple of s: η ← max(η·decay, clip); this closed form is the
    same, including η₀ < clip, where the first decay *raises* η to clip.)"""

    def __init__(self, learning_rate, decay_rate, transition_steps, end_value):
        super().__init__(0.0)
        self.eta0, self.decay, self.s, self.clip = (
            float(learning_rate),
            float(decay_rate),
            int(transition_steps),
            float(end_value),
        )

    def step(self, g, st, p, n, eta):
        k = n // self.s
        lr = self.eta0 if k == 0 else max(self.eta0 * self.decay**k, self.clip)
        return tree_map(lambda g: lr * g, g), st


class InvDecay(FluxRule):
    """Δ = g/(1 + γ·n), n = 1, 2, ...  (F15)."""

    def __init__(self, gamma):
        super().__init__(0.0)
        self.gamma = float(gamma)

    def step(self, g, st, p, n, eta):
        return tree_map(lambda g: g / (1 + self.gamma * n), g), st


class WeightDecay(FluxRule):
    """Δ = Δ + wd·p  (F16)."""

    def __init__(self, weight_decay):
        super().__init__(0.0)
        self.wd = float(weight_decay)

    def step(self, g, st, p, n, eta):
        return tree_map(lambda g, p: g + self.wd * p, g, p), st


class ClipValue(FluxRule):
    """Δ = clamp(Δ, −thresh, thresh)  (F17)."""

    def __init__(self, max_delta):
        super().__init__(0.0)
        self.thresh = float(max_delta)

    def step(self, g, st, p, n, eta):
        return tree_map(lambda g: np.clip(g, -self.thresh, self.thresh), g), st


class ClipNorm(FluxRule):
    """Per array: Δ·thresh/‖Δ‖ if ‖Δ‖ > thresh  (F18)."""

    def __init__(self, max_norm):
        super().__init__(0.0)
        self.thresh = float(max_norm)

    def step(self, g, st, p, n, eta):
        def f(d):
            nd = leaf_norm(d)
            return d * (self.thresh / nd) if nd > self.thresh else d

        return tree_map(f, g), st


# --------------------------------------------------------------------------------------------
# registration: every Δ-rule is kept unsigned (for Optimiser members) and registered as the
# signed preset ``flux:<Name>``.

_BETAS = dict(b1=0.9, b2=0.999)
_TABLE = {
    # name: (class, defaults)   defaults are Flux's code defaults (F1-F18)
    "Descent": (Descent, dict(learning_rate=0.1)),
    "Momentum": (Momentum, dict(learning_rate=0.01, momentum=0.9)),
    "Nesterov": (Nesterov, dict(learning_rate=0.001, momentum=0.9)),
    "RMSProp": (RMSProp, dict(learning_rate=0.001, decay=0.9)),
    "ADAM": (ADAM, dict(learning_rate=0.001, **_BETAS)),
    "RADAM": (RADAM, dict(learning_rate=0.001, **_BETAS)),
    "AdaMax": (AdaMax, dict(learning_rate=0.001, **_BETAS)),
    "ADAGrad": (ADAGrad, dict(learning_rate=0.1)),
    "ADADelta": (ADADelta, dict(rho=0.9)),
    "AMSGrad": (AMSGrad, dict(learning_rate=0.001, **_BETAS)),
    "NADAM": (NADAM, dict(learning_rate=0.001, **_BETAS)),
    "ExpDecay": (ExpDecay, dict(learning_rate=0.001, decay_rate=0.1, transition_steps=1000, end_value=1e-4)),
    "InvDecay": (InvDecay, dict(gamma=0.001)),
    "WeightDecay": (WeightDecay, dict(weight_decay=0.0)),
    "ClipValue": (ClipValue, dict(max_delta=REQUIRED)),
    "ClipNorm": (ClipNorm, dict(max_norm=REQUIRED)),
}


def _adamw(learning_rate, b1, b2, weight_decay):
    """ADAMW(η, β, decay) = Optimiser(ADAM(η, β), WeightDecay(decay)): Δ = η·adam + decay·p,
    the decay *not* multiplied by η (F12, §4.10)."""
    return Chain(ADAM(learning_rate, b1, b2), WeightDecay(weight_decay))


def _register(name, fn, defaults):
    _DELTA_BUILDERS[name.lower()] = make_builder(fn, defaults)

    @rule(f"flux:{name}", **defaults)
    def signed(**kw):
        return Chain(fn(**kw), Scale(-1.0))


for _name, (_cls, _defaults) in _TABLE.items():
    _register(_name, _cls, _defaults)
_register("ADAMW", _adamw, dict(learning_rate=0.001, **_BETAS, weight_decay=0.0))


def _member(spec, path) -> Transform:
    """An Optimiser member: a Flux rule name, with or without the ``flux:`` prefix."""
    name, args = split_spec(spec, path)
    bare = name.split(":", 1)[1] if name.lower().startswith("flux:") else name
    if bare.lower() == "optimiser":
        return _optimiser_delta(args, f"{path}.{name}")
    if bare.lower() not in _DELTA_BUILDERS:
        raise SpecError(f"{path}: {name!r} is not a Flux rule")
    return _DELTA_BUILDERS[bare.lower()](args, f"{path}.{name}")


def _optimiser_delta(args, path) -> Transform:
    if not isinstance(args, (list, tuple)) or not args:
        raise SpecError(f"{path}: expected a non-empty list of Flux rules")
    return Chain(*(_member(s, f"{path}[{i}]") for i, s in enumerate(args)))


def _optimiser(args, path) -> Transform:
    """Optimiser(a, b, ...): Δ through each member in order, own η each, one sign flip (F13)."""
    return Chain(_optimiser_delta(args, path), Scale(-1.0))


register_builder("flux:Optimiser", _optimiser)
