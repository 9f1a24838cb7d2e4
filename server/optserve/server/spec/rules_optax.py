"""Canonical rules: optax names, optax defaults, optax semantics.

One :func:`register` call per rule. Formulas follow docs/optimizer-catalogue.md (``g`` the
incoming update, ``p`` the parameter, ``t`` the 1-based count, ``u`` the
emitted update with ``p ← p + u``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from optserve.server.spec import schedules, transforms
from optserve.server.spec.hyperparams import (
    B1,
    B2,
    DECAY,
    DTYPE,
    EPS,
    EPS_ROOT,
    HP,
    INITIAL_SCALE,
    LEARNING_RATE,
    MOMENTUM_OPT,
    MU_DTYPE,
    NESTEROV,
    NONNEG,
    REQUIRED,
    SEED,
    UNIT_OPEN,
    WEIGHT_DECAY,
    Boolean,
    Custom,
    Number,
)
from optserve.server.spec.registry import Rule, register

ACCUMULATOR_DTYPE = HP("accumulator_dtype", DTYPE, None, "dtype of the momentum buffer (null = params' dtype)")
EPS_IN_SQRT = HP("eps_in_sqrt", Boolean(), True, "eps inside the square root (false: added after it)")
BIAS_CORRECTION = HP("bias_correction", Boolean(), False, "bias-correct the EMA")
CENTERED = HP("centered", Boolean(), False, "normalize by the variance estimate, not the second moment")
ETA = HP("eta", NONNEG, 0.01, "noise variance numerator (optax: σ_t² = eta/t^gamma)")
GAMMA = HP("gamma", NONNEG, 0.55, "noise variance decay exponent")
THRESHOLD = HP("threshold", Number(), 5.0, "use the rectified update when ρ_t ≥ threshold")


def _opt(
    name: str,
    build: Callable,
    hps: list,
    doc: str,
    formula: str,
    equivalent: str,
    *,
    kind: str = "optimizer",
    mask: str | None = None,
) -> None:
    # optax takes a schedule (a callable) for its learning rates and weight decays.
    native = tuple(h.name for h in hps if h.name in ("learning_rate", "weight_decay"))
    register(
        Rule(
            name=name,
            kind=kind,
            library="optax",
            build=build,
            hyperparams=tuple(hps),
            doc=doc,
            formula=formula,
            equivalent=equivalent,
            mask=mask,
            schedules=native,
        )
    )


def _tx(
    name: str, build: Callable, hps: list, doc: str, formula: str, equivalent: str, *, mask: str | None = "wrap"
) -> None:
    _opt(name, build, hps, doc, formula, equivalent, kind="transform", mask=mask)


def _adadelta(learning_rate: Any = 1.0, **kwargs: Any) -> optax.GradientTransformation:
    # optax's default learning_rate=None means identity(): the update would have the
    # sign of the gradient and ascend (docs/optimizer-catalogue.md §4.9). The LR defaults to 1.0.
    return optax.adadelta(learning_rate, **kwargs)


def _lars(mask: Any = True, **kwargs: Any) -> optax.GradientTransformation:
    # One `mask` selects the leaves that are both decayed and trust-ratio scaled
    # (biases and norm scales are usually excluded from both).
    return optax.lars(weight_decay_mask=mask, trust_ratio_mask=mask, **kwargs)


# ---------------------------------------------------------------- optimizers

_opt(
    "sgd",
    optax.sgd,
    [LEARNING_RATE, MOMENTUM_OPT, NESTEROV, ACCUMULATOR_DTYPE],
    "Stochastic gradient descent, optionally with (Nesterov) momentum; the LR is applied after the trace.",
    "τ = g + μ·τ; u = −α·τ (nesterov: u = −α·(g + μ·τ))",
    "optax.sgd(learning_rate, momentum, nesterov, accumulator_dtype)",
)
_opt(
    "noisy_sgd",
    optax.noisy_sgd,
    [LEARNING_RATE, ETA, GAMMA, SEED],
    "SGD with annealed Gaussian gradient noise (optax semantics: eta/t^γ is a variance, scaled by α).",
    "u = −α·(g + √(eta/t^γ)·n), n ~ N(0, I)",
    "optax.noisy_sgd(learning_rate, eta, gamma, key)",
)
_opt(
    "adam",
    optax.adam,
    [LEARNING_RATE, B1, B2, EPS, EPS_ROOT, MU_DTYPE, NESTEROV],
    "Adam (Kingma & Ba, Algorithm 1).",
    "m = b1·m + (1−b1)·g; v = b2·v + (1−b2)·g²; u = −α·m̂/(√(v̂ + eps_root) + eps)",
    "optax.adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)",
)
_opt(
    "nadam",
    optax.nadam,
    [LEARNING_RATE, B1, B2, EPS, EPS_ROOT, MU_DTYPE],
    "NAdam: Adam with a Nesterov first moment (no extra β2 factor; see flux:NADAM).",
    "m̂ = b1·m/(1−b1^{t+1}) + (1−b1)·g/(1−b1^t); u = −α·m̂/(√(v̂ + eps_root) + eps)",
    "optax.nadam(learning_rate, b1, b2, eps, eps_root, mu_dtype)",
)
_opt(
    "adamw",
    optax.adamw,
    [LEARNING_RATE, B1, B2, EPS, EPS_ROOT, MU_DTYPE, WEIGHT_DECAY.replace(default=1e-4), NESTEROV],
    "Adam with decoupled weight decay, multiplied by the LR. `mask` selects the decayed leaves.",
    "u = −α·(m̂/(√(v̂ + eps_root) + eps) + λ·p)",
    "optax.adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov=nesterov)",
    mask="mask",
)
_opt(
    "radam",
    optax.radam,
    [LEARNING_RATE, B1, B2, EPS, EPS_ROOT, THRESHOLD, NESTEROV],
    "Rectified Adam.",
    "ρ∞ = 2/(1−b2) − 1; ρ_t = ρ∞ − 2t·b2^t/(1−b2^t); ρ_t ≥ threshold: u = −α·r_t·m̂/(√(v̂+eps_root)+eps), "
    "else u = −α·m̂; r_t = √((ρ_t−4)(ρ_t−2)ρ∞/((ρ∞−4)(ρ∞−2)ρ_t))",
    "optax.radam(learning_rate, b1, b2, eps, eps_root, threshold, nesterov=nesterov)",
)
_opt(
    "adamax",
    optax.adamax,
    [LEARNING_RATE, B1, B2, EPS],
    "AdaMax: Adam with an infinity-norm second moment (eps inside the max).",
    "m = b1·m + (1−b1)·g; ν = max(b2·ν, |g| + eps); u = −α·m̂/ν",
    "optax.adamax(learning_rate, b1, b2, eps)",
)
_opt(
    "amsgrad",
    optax.amsgrad,
    [
        LEARNING_RATE,
        B1,
        B2,
        EPS,
        EPS_ROOT,
        MU_DTYPE,
        HP("bias_correction_mu", Boolean(), True, "bias-correct the first moment"),
        HP("bias_correction_nu", Boolean(), True, "bias-correct the second moment"),
    ],
    "AMSGrad: Adam with a non-decreasing second moment.",
    "v̂_max = max(v̂_max, v̂); u = −α·m̂/(√(v̂_max + eps_root) + eps)",
    "optax.amsgrad(learning_rate, b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu)",
)
_opt(
    "adagrad",
    optax.adagrad,
    [
        LEARNING_RATE,
        HP("initial_accumulator_value", Number(0.0, traced=False), 0.1, "initial sum of squares G₀"),
        EPS.replace(default=1e-7),
    ],
    "Adagrad.",
    "G = G + g²; u = −α·g/√(G + eps) (0 where G = 0)",
    "optax.adagrad(learning_rate, initial_accumulator_value, eps)",
)
_opt(
    "adadelta",
    _adadelta,
    [
        LEARNING_RATE.replace(default=1.0, doc="step size α (default 1.0: optax's None would ascend)"),
        HP("rho", UNIT_OPEN, 0.9, "decay rate of both EMAs"),
        EPS.replace(default=1e-6),
        WEIGHT_DECAY,
    ],
    "Adadelta. `mask` selects the decayed leaves.",
    "a = ρ·a + (1−ρ)·g²; d = √(Δa + eps)/√(a + eps)·g; Δa = ρ·Δa + (1−ρ)·d²; u = −α·(d + λ·p)",
    "optax.adadelta(learning_rate=1.0, rho, eps, weight_decay, weight_decay_mask)",
    mask="weight_decay_mask",
)
_opt(
    "rmsprop",
    optax.rmsprop,
    [LEARNING_RATE, DECAY, EPS, INITIAL_SCALE, EPS_IN_SQRT, CENTERED, MOMENTUM_OPT, NESTEROV, BIAS_CORRECTION],
    "RMSProp, optionally centered and with momentum (LR applied before the momentum trace).",
    "ν = decay·ν + (1−decay)·g²; x = −α·g/√(ν + eps) (centered: √(ν − μ² + eps)); τ = x + momentum·τ; u = τ",
    "optax.rmsprop(learning_rate, decay, eps, initial_scale, eps_in_sqrt, centered, momentum, nesterov, "
    "bias_correction)",
)
_opt(
    "adabelief",
    optax.adabelief,
    [LEARNING_RATE, B1, B2, EPS.replace(default=1e-16), EPS_ROOT.replace(default=1e-16), NESTEROV],
    "AdaBelief: the second moment tracks the belief (g − m)².",
    "s = b2·s + (1−b2)·(g − m)² + eps_root; u = −α·m̂/(√ŝ + eps)",
    "optax.adabelief(learning_rate, b1, b2, eps, eps_root, nesterov=nesterov)",
)
_opt(
    "lamb",
    optax.lamb,
    [LEARNING_RATE, B1, B2, EPS.replace(default=1e-6), EPS_ROOT, WEIGHT_DECAY],
    "LAMB: Adam direction plus weight decay, scaled per leaf by the trust ratio. `mask` selects the decayed leaves.",
    "r = m̂/(√(v̂+eps_root)+eps) + λ·p; φ = ‖p‖/‖r‖ (1 if either is 0); u = −α·φ·r",
    "optax.lamb(learning_rate, b1, b2, eps, eps_root, weight_decay, mask)",
    mask="mask",
)
_opt(
    "lars",
    _lars,
    [
        LEARNING_RATE,
        WEIGHT_DECAY,
        HP("trust_coefficient", NONNEG, 0.001, "trust coefficient tc"),
        EPS.replace(default=0.0),
        HP("momentum", Number(0.0, 1.0), 0.9, "momentum decay μ"),
        NESTEROV,
    ],
    "LARS (optax form). `mask` selects the leaves that are decayed and trust-ratio scaled.",
    "r = g + λ·p; φ = tc·‖p‖/(‖r‖ + eps) (1 if ‖p‖ or ‖r‖ is 0); τ = −α·φ·r + μ·τ; u = τ",
    "optax.lars(learning_rate, weight_decay, weight_decay_mask=mask, trust_coefficient, eps, "
    "trust_ratio_mask=mask, momentum, nesterov)",
    mask="mask",
)
_opt(
    "yogi",
    optax.yogi,
    [LEARNING_RATE, B1, B2, EPS.replace(default=1e-3)],
    "Yogi: additive second-moment update (state starts at 1e-6).",
    "m = b1·m + (1−b1)·g; v = v − (1−b2)·sign(v − g²)·g²; u = −α·m̂/(√v̂ + eps)",
    "optax.yogi(learning_rate, b1, b2, eps)",
)

# ---------------------------------------------------------------- transforms

_tx("identity", optax.identity, [], "Passes updates through.", "u = g", "optax.identity()")
_tx(
    "set_to_zero",
    optax.set_to_zero,
    [],
    "Zero updates (freezes the leaves it sees; use in a partition).",
    "u = 0",
    "optax.set_to_zero()",
)
_tx(
    "scale",
    optax.scale,
    [HP("step_size", Number(), REQUIRED, "the factor")],
    "Multiplies updates by a constant (or scheduled, or tunable) factor.",
    "u = step_size·g",
    "optax.scale(step_size)",
)
_tx(
    "scale_by_learning_rate",
    optax.scale_by_learning_rate,
    [LEARNING_RATE, HP("flip_sign", Boolean(), True, "multiply by −α instead of α")],
    "Scales by the (negated) learning rate.",
    "u = −α·g (flip_sign=false: α·g)",
    "optax.scale_by_learning_rate(learning_rate, flip_sign=flip_sign)",
)
_tx(
    "scale_by_schedule",
    optax.scale_by_schedule,
    [
        HP(
            "step_size_fn",
            Custom(schedules.schedule_or_number, "schedule (or number)"),
            REQUIRED,
            "the schedule s(c), c = 0, 1, ...",
            aliases=("schedule",),
        )
    ],
    "Scales by a schedule of the count.",
    "u = s(c)·g",
    "optax.scale_by_schedule(step_size_fn)",
)
_tx(
    "scale_by_adam",
    optax.scale_by_adam,
    [B1, B2, EPS, EPS_ROOT, MU_DTYPE, NESTEROV],
    "Adam's preconditioner (no LR).",
    "u = m̂/(√(v̂ + eps_root) + eps)",
    "optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)",
)
_tx(
    "scale_by_belief",
    optax.scale_by_belief,
    [B1, B2, EPS.replace(default=1e-16), EPS_ROOT.replace(default=1e-16), NESTEROV],
    "AdaBelief's preconditioner.",
    "s = b2·s + (1−b2)·(g − m)² + eps_root; u = m̂/(√ŝ + eps)",
    "optax.scale_by_belief(b1, b2, eps, eps_root, nesterov=nesterov)",
)
_tx(
    "scale_by_radam",
    optax.scale_by_radam,
    [B1, B2, EPS, EPS_ROOT, THRESHOLD, NESTEROV],
    "RAdam's rectified preconditioner.",
    "as radam, without the LR",
    "optax.scale_by_radam(b1, b2, eps, eps_root, threshold, nesterov=nesterov)",
)
_tx(
    "scale_by_rms",
    optax.scale_by_rms,
    [DECAY, EPS, INITIAL_SCALE, EPS_IN_SQRT, BIAS_CORRECTION],
    "RMS preconditioner.",
    "ν = decay·ν + (1−decay)·g²; u = g/√(ν + eps) (eps_in_sqrt=false: g/(√ν + eps))",
    "optax.scale_by_rms(decay, eps, initial_scale, eps_in_sqrt, bias_correction)",
)
_tx(
    "scale_by_rss",
    optax.scale_by_rss,
    [
        HP("initial_accumulator_value", Number(0.0, traced=False), 0.1, "initial sum of squares G₀"),
        EPS.replace(default=1e-7),
    ],
    "Root-sum-of-squares (Adagrad) preconditioner.",
    "G = G + g²; u = g/√(G + eps) (0 where G = 0)",
    "optax.scale_by_rss(initial_accumulator_value, eps)",
)
_tx(
    "scale_by_stddev",
    optax.scale_by_stddev,
    [DECAY, EPS, INITIAL_SCALE, EPS_IN_SQRT, BIAS_CORRECTION],
    "Centered RMS preconditioner.",
    "μ = decay·μ + (1−decay)·g; ν = decay·ν + (1−decay)·g²; u = g/√(ν − μ² + eps)",
    "optax.scale_by_stddev(decay, eps, initial_scale, eps_in_sqrt, bias_correction)",
)
_tx(
    "scale_by_trust_ratio",
    optax.scale_by_trust_ratio,
    [
        HP("min_norm", NONNEG, 0.0, "floor of both norms"),
        HP("trust_coefficient", NONNEG, 1.0, "trust coefficient tc"),
        EPS.replace(default=0.0),
    ],
    "Per-leaf trust ratio.",
    "φ = tc·max(‖p‖, min)/(max(‖g‖, min) + eps) (1 if a norm is 0); u = φ·g",
    "optax.scale_by_trust_ratio(min_norm, trust_coefficient, eps)",
)
_tx(
    "scale_by_yogi",
    optax.scale_by_yogi,
    [
        B1,
        B2,
        EPS.replace(default=1e-3),
        EPS_ROOT,
        HP("initial_accumulator_value", Number(0.0, traced=False), 1e-6, "initial value of both moments"),
    ],
    "Yogi's preconditioner.",
    "v = v − (1−b2)·sign(v − g²)·g²; u = m̂/(√(v̂ + eps_root) + eps)",
    "optax.scale_by_yogi(b1, b2, eps, eps_root, initial_accumulator_value)",
)
_tx(
    "scale_by_amsgrad",
    optax.scale_by_amsgrad,
    [
        B1,
        B2,
        EPS,
        EPS_ROOT,
        MU_DTYPE,
        HP("bias_correction_mu", Boolean(), True, "bias-correct the first moment"),
        HP("bias_correction_nu", Boolean(), True, "bias-correct the second moment"),
    ],
    "AMSGrad's preconditioner.",
    "u = m̂/(√(max(v̂_max, v̂) + eps_root) + eps)",
    "optax.scale_by_amsgrad(b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu)",
)
_tx(
    "scale_by_adamax",
    optax.scale_by_adamax,
    [B1, B2, EPS],
    "AdaMax's preconditioner.",
    "ν = max(b2·ν, |g| + eps); u = m̂/ν",
    "optax.scale_by_adamax(b1, b2, eps)",
)
_tx(
    "trace",
    optax.trace,
    [HP("decay", Number(0.0, 1.0), REQUIRED, "momentum decay μ"), NESTEROV, ACCUMULATOR_DTYPE],
    "Momentum trace.",
    "τ = g + μ·τ; u = τ (nesterov: u = g + μ·τ)",
    "optax.trace(decay, nesterov, accumulator_dtype)",
)
_tx(
    "add_decayed_weights",
    optax.add_decayed_weights,
    [HP("weight_decay", Number(), 0.0, "λ (negative after scale_by_learning_rate: docs/optimizer-catalogue.md §4.18)")],
    "Adds λ·p. `mask` selects the decayed leaves.",
    "u = g + λ·p",
    "optax.add_decayed_weights(weight_decay, mask)",
    mask="mask",
)
_tx(
    "add_noise",
    optax.add_noise,
    [ETA.replace(default=REQUIRED), GAMMA.replace(default=REQUIRED), SEED],
    "Annealed Gaussian noise (eta/t^γ is the variance).",
    "u = g + √(eta/t^γ)·n, n ~ N(0, I)",
    "optax.add_noise(eta, gamma, key)",
)
_tx(
    "centralize",
    optax.centralize,
    [],
    "Gradient centralization: subtracts the mean over all axes but the first (rank > 1 leaves).",
    "u = g − mean(g, axes 1..n−1)",
    "optax.centralize()",
)
_tx(
    "clip",
    optax.clip,
    [HP("max_delta", NONNEG, REQUIRED, "bound δ")],
    "Elementwise clipping.",
    "u = clip(g, −δ, δ)",
    "optax.clip(max_delta)",
)
_tx(
    "clip_by_global_norm",
    optax.clip_by_global_norm,
    [HP("max_norm", Number(0.0, lo_open=True), REQUIRED, "bound on the global norm")],
    "Clips the norm over all leaves together.",
    "N = √Σ‖g‖²; u = g if N < max_norm else g·max_norm/N",
    "optax.clip_by_global_norm(max_norm)",
)
_tx(
    "clip_by_leaf_norm",
    transforms.clip_by_leaf_norm,
    [HP("max_norm", Number(0.0, lo_open=True), REQUIRED, "bound on each leaf's norm")],
    "Clips each leaf's L2 norm separately (Flux ClipNorm; no optax 0.2.8 equivalent).",
    "per leaf: u = g if ‖g‖ ≤ max_norm else g·max_norm/‖g‖",
    "none in optax 0.2.8 (custom, docs/optimizer-catalogue.md §2.1)",
)


# ---------------------------------------------------------------- combinators

register(
    Rule(
        name="chain",
        kind="combinator",
        library="optax",
        build=optax.chain,
        doc='Applies transforms in order: {"chain": [spec, spec, ...]}.',
        formula="u = t_n(... t_2(t_1(g)))",
        equivalent="optax.chain(*transforms)",
    )
)
