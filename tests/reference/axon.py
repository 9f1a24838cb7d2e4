"""Axon.Optimizers v0.4.1 / Polaris v0.1.0 presets (docs/optimizer-catalogue.md rows A1-A10, P1-P22).

Axon and Polaris run identical update code, so every preset is registered under both ``axon:``
and ``polaris:``.  Defaults are the *code* defaults, not the doc defaults (§4.7).  Where Axon
has a bug (§4.6) the preset serves the correct maths, and ``"compat": true`` reproduces the bug:
  - adabelief / scale_by_belief: compat = Adam on g² with eps_root inside the sqrt (A1, P11);
  - radam / scale_by_radam: compat = ρ∞ computed from b1 (A7, P12, §2.9).
Axon optimizers apply the LR last as ``scale_by_state(−lr)`` (a schedule: scale_by_schedule),
the same as optax's ``scale_by_learning_rate``.  Hyperparameter names are canonical (§3.5):
``:decay`` of adamw/lamb/add_decayed_weights → weight_decay, ``:delta`` → max_delta,
``:seed`` → key, ``scale_by_state(step)`` → step_size.
"""

from __future__ import annotations

from .core import REQUIRED, Chain, rule
from .optax_rules import (
    AddDecayedWeights,
    AddNoise,
    Centralize,
    Clip,
    ClipByGlobalNorm,
    Identity,
    Scale,
    ScaleByAdam,
    ScaleByBelief,
    ScaleByRAdam,
    ScaleByRms,
    ScaleByRss,
    ScaleBySchedule,
    ScaleByStddev,
    ScaleByTrustRatio,
    ScaleByYogi,
    Trace,
    rmsprop,
    scale_by_learning_rate,
    sgd,
)
from .schedules import as_schedule

NAMESPACES = ("axon", "polaris")


def preset(name: str, **defaults):
    """Register under ``axon:<name>`` and ``polaris:<name>``."""
    return rule(*(f"{ns}:{name}" for ns in NAMESPACES), **defaults)


class AddNoiseStddev(AddNoise):
    """u = g + σ_t·n with σ_t = eta/t^γ used as the *standard deviation* (P2, §4.4; optax uses
    √(eta/t^γ)).  Same statistical-only caveat as :class:`AddNoise`."""

    def std_at(self, t: int) -> float:
        return self.eta / t**self.gamma


def _lr(learning_rate):
    return scale_by_learning_rate(learning_rate)


def _belief(b1, b2, eps, eps_root, compat):
    if compat:  # A1 as built: update_moment(x, nu, b2, 2), eps_root inside the sqrt
        return ScaleByAdam(b1, b2, eps, eps_root)
    return ScaleByBelief(b1, b2, eps, eps_root)


# --------------------------------------------------------------------------------------------
# optimizers (A1-A10)


@preset("adabelief", learning_rate=1e-3, b1=0.9, b2=0.999, eps=0.0, eps_root=1e-16, compat=False)
def adabelief(learning_rate, b1, b2, eps, eps_root, compat):
    """Correct: s = b2·s + (1−b2)(g − m_t)² + eps_root; u = −lr·m̂/(√ŝ + eps).
    compat: s = b2·s + (1−b2)·g²; u = −lr·m̂/(√(ŝ + eps_root) + eps)  (A1)."""
    return Chain(_belief(b1, b2, eps, eps_root, compat), _lr(learning_rate))


@preset("adagrad", learning_rate=1e-3, eps=1e-7, initial_accumulator_value=0.1)
def adagrad(learning_rate, eps, initial_accumulator_value):
    """G₀ = 0.1; G = G + g²; u = −lr·g/√(G + eps)  (A2)."""
    return Chain(ScaleByRss(initial_accumulator_value, eps), _lr(learning_rate))


_ADAM = dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=1e-15)


@preset("adam", learning_rate=1e-3, **_ADAM)
def adam(learning_rate, b1, b2, eps, eps_root):
    """u = −lr·m̂/(√(v̂ + eps_root) + eps), eps_root = 1e-15 by default (A3)."""
    return Chain(ScaleByAdam(b1, b2, eps, eps_root), _lr(learning_rate))


@preset("adamw", learning_rate=1e-3, weight_decay=0.0, **_ADAM)
def adamw(learning_rate, weight_decay, b1, b2, eps, eps_root):
    """u = −lr·(m̂/(√(v̂ + eps_root) + eps) + λ·p); eps_root really 1e-15 (A4)."""
    return Chain(ScaleByAdam(b1, b2, eps, eps_root), AddDecayedWeights(weight_decay), _lr(learning_rate))


@preset("lamb", learning_rate=1e-2, weight_decay=0.0, min_norm=0.0, **_ADAM)
def lamb(learning_rate, weight_decay, min_norm, b1, b2, eps, eps_root):
    """r = m̂/(√(v̂ + eps_root) + eps) + λp; φ = ‖p‖/‖r‖ (norms floored at min_norm, 1 if either
    is 0); u = −lr·φ·r (A5).  Served for every rank (Nx's norm raises for rank 0 and ≥3, §4.16;
    that is a limitation, not maths)."""
    return Chain(
        ScaleByAdam(b1, b2, eps, eps_root),
        AddDecayedWeights(weight_decay),
        ScaleByTrustRatio(min_norm=min_norm),
        _lr(learning_rate),
    )


@preset("noisy_sgd", learning_rate=1e-2, eta=0.01, gamma=0.55, key=REQUIRED)
def noisy_sgd(learning_rate, eta, gamma, key):
    """u = −lr·g + σ_t·n with σ_t = eta/t^γ a std, *after* the LR (A6, §4.4, §2.10).
    Decision: the seed is required (Polaris's default is system time, §4.19)."""
    return Chain(_lr(learning_rate), AddNoiseStddev(eta, gamma, key))


@preset("radam", learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, threshold=5.0, compat=False)
def radam(learning_rate, b1, b2, eps, eps_root, threshold, compat):
    """optax radam maths; compat: ρ∞ = 2/(1−b1) − 1, first adaptive step ≈ 6890 (A7)."""
    return Chain(ScaleByRAdam(b1, b2, eps, eps_root, threshold, rho_inf_from_b1=compat), _lr(learning_rate))


@preset(
    "rmsprop", learning_rate=1e-2, decay=0.9, eps=1e-8, initial_scale=0.0, centered=False, momentum=None, nesterov=False
)
def rmsprop_(learning_rate, decay, eps, initial_scale, centered, momentum, nesterov):
    """Same as optax rmsprop (eps inside the sqrt, LR before the momentum trace) (A8)."""
    return rmsprop(learning_rate, decay, eps, initial_scale, True, centered, momentum, nesterov, False)


@preset("sgd", learning_rate=1e-2, momentum=None, nesterov=False)
def sgd_(learning_rate, momentum, nesterov):
    """τ = g + μτ; u = −lr·τ (nesterov −lr·(g + μτ)), trace before the LR (A9)."""
    return sgd(learning_rate, momentum, nesterov)


@preset("yogi", learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-3, eps_root=0.0, initial_accumulator_value=1e-6)
def yogi(learning_rate, b1, b2, eps, eps_root, initial_accumulator_value):
    """Code defaults eps = 1e-3, init = 1e-6 (not the doc's 1e-8 / 0.0) (A10, §4.7)."""
    return Chain(ScaleByYogi(b1, b2, eps, eps_root, initial_accumulator_value), _lr(learning_rate))


# --------------------------------------------------------------------------------------------
# Polaris.Updates transforms (P1-P22; P3 apply_updates, P7 compose, P20/P21 custom code are
# server operations, not chain elements)


@preset("add_decayed_weights", weight_decay=0.0)
def _add_decayed_weights(weight_decay):
    return AddDecayedWeights(weight_decay)


@preset("add_noise", eta=0.01, gamma=0.55, key=REQUIRED)
def _add_noise(eta, gamma, key):
    """σ_t = eta/t^γ as the std (P2)."""
    return AddNoiseStddev(eta, gamma, key)


@preset("centralize")
def _centralize():
    return Centralize()


@preset("clip", max_delta=2.0)
def _clip(max_delta):
    return Clip(max_delta)


@preset("clip_by_global_norm", max_norm=1.0)
def _clip_by_global_norm(max_norm):
    return ClipByGlobalNorm(max_norm)


@preset("identity")
def _identity():
    return Identity()


@preset("scale", step_size=REQUIRED)
def _scale(step_size):
    return Scale(step_size)


@preset("scale_by_state", step_size=REQUIRED)
def _scale_by_state(step_size):
    """u = α·g with α a (tunable) state value (P16); numerically a scale."""
    return Scale(step_size)


@preset("scale_by_adam", **_ADAM)
def _scale_by_adam(b1, b2, eps, eps_root):
    return ScaleByAdam(b1, b2, eps, eps_root)


@preset("scale_by_belief", b1=0.9, b2=0.999, eps=0.0, eps_root=1e-16, compat=False)
def _scale_by_belief(b1, b2, eps, eps_root, compat):
    return _belief(b1, b2, eps, eps_root, compat)


@preset("scale_by_radam", b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, threshold=5.0, compat=False)
def _scale_by_radam(b1, b2, eps, eps_root, threshold, compat):
    return ScaleByRAdam(b1, b2, eps, eps_root, threshold, rho_inf_from_b1=compat)


@preset("scale_by_rms", decay=0.9, eps=1e-8, initial_scale=0.0)
def _scale_by_rms(decay, eps, initial_scale):
    return ScaleByRms(decay, eps, initial_scale)


@preset("scale_by_rss", eps=1e-7, initial_accumulator_value=0.1)
def _scale_by_rss(eps, initial_accumulator_value):
    return ScaleByRss(initial_accumulator_value, eps)


@preset("scale_by_schedule", schedule=REQUIRED)
def _scale_by_schedule(schedule):
    return ScaleBySchedule(as_schedule(schedule))


@preset("scale_by_stddev", decay=0.9, eps=1e-8, initial_scale=0.0)
def _scale_by_stddev(decay, eps, initial_scale):
    return ScaleByStddev(decay, eps, initial_scale)


@preset("scale_by_trust_ratio", min_norm=0.0, trust_coefficient=1.0, eps=0.0)
def _scale_by_trust_ratio(min_norm, trust_coefficient, eps):
    return ScaleByTrustRatio(min_norm, trust_coefficient, eps)


@preset("scale_by_yogi", b1=0.9, b2=0.999, eps=1e-3, eps_root=0.0, initial_accumulator_value=1e-6)
def _scale_by_yogi(b1, b2, eps, eps_root, initial_accumulator_value):
    return ScaleByYogi(b1, b2, eps, eps_root, initial_accumulator_value)


@preset("trace", decay=0.9, nesterov=False)
def _trace(decay, nesterov):
    return Trace(decay, nesterov)
