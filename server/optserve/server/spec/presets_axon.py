"""``axon:`` and ``polaris:`` presets: Axon.Optimizers/Updates v0.4.1, Polaris v0.1.0.

Both libraries run the same update code (Polaris only adds an explicit RNG key
to add_noise), so every name is registered in both namespaces. Defaults are
the *code* defaults, not the documented ones (docs/optimizer-catalogue.md §4.7). Where Axon
has a bug (adabelief computes Adam; radam takes ρ∞ from b1) the preset serves
the intended maths and ``compat: true`` reproduces the bug (§4.6).
Hyperparameters use canonical names: ``:decay`` of adamw/lamb/
add_decayed_weights → weight_decay, ``:delta`` → max_delta, ``:seed`` → key.

Not reproduced: Axon keeps optimizer state in f32 whatever the params' dtype,
and its trust-ratio norm rejects rank-0 and rank ≥ 3 leaves; here the state
follows the params (as optax) and every rank works.
"""

from __future__ import annotations

import optax

from optserve.server.spec import schedules, transforms
from optserve.server.spec.hyperparams import (
    B1,
    B2,
    EPS,
    EPS_ROOT,
    HP,
    INITIAL_SCALE,
    MOMENTUM_OPT,
    NESTEROV,
    NONNEG,
    REQUIRED,
    SEED,
    UNIT_OPEN,
    Boolean,
    Custom,
    Number,
)
from optserve.server.spec.presets import lr, preset

COMPAT = HP("compat", Boolean(), False, "reproduce Axon's bug instead of the intended maths")
WD = HP("weight_decay", NONNEG, 0.0, ":decay")
ETA = HP("eta", NONNEG, 0.01, "noise standard deviation at t = 1 (code default; the doc says 0.1)")
GAMMA = HP("gamma", NONNEG, 0.55, "decay exponent of the noise standard deviation")
RSS_INIT = HP("initial_accumulator_value", Number(0.0, traced=False), 0.1, "initial sum of squares")
LR_NATIVE = ("learning_rate",)


def _both(name, build, hps, doc, formula, equivalent, schedules=LR_NATIVE, tunable=(), absent=()):
    for library in ("axon", "polaris"):
        preset(
            library,
            f"{library}:{name}",
            build,
            hps,
            doc,
            formula,
            equivalent,
            schedules=schedules,
            tunable=tunable,
            absent=absent,
        )


# ---------------------------------------------------------------- optimizers


def adabelief(learning_rate, b1, b2, eps, eps_root, compat):
    if compat:  # Axon squares g, not g − m: Adam(eps=0, eps_root=1e-16) (§4.6)
        return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    return optax.adabelief(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root)


def adagrad(learning_rate, eps, initial_accumulator_value):
    return optax.adagrad(learning_rate, initial_accumulator_value=initial_accumulator_value, eps=eps)


def adam(learning_rate, b1, b2, eps, eps_root):
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root)


def adamw(learning_rate, b1, b2, eps, eps_root, weight_decay):
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay)


def lamb(learning_rate, b1, b2, eps, eps_root, weight_decay, min_norm):
    # optax.lamb has no min_norm; this is its chain with the trust-ratio floor.
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_trust_ratio(min_norm=min_norm),
        optax.scale_by_learning_rate(learning_rate),
    )


def add_noise(eta, gamma, key):
    # Axon's eta/t^γ is a standard deviation; optax's is a variance (§4.4).
    return optax.add_noise(eta=eta**2, gamma=2 * gamma, key=key)


def noisy_sgd(learning_rate, eta, gamma, key):
    # Axon adds the noise after the LR, unscaled by it (§2.10).
    return optax.chain(optax.scale_by_learning_rate(learning_rate), add_noise(eta, gamma, key))


def scale_by_radam(b1, b2, eps, eps_root, threshold, compat):
    if compat:
        return transforms.scale_by_radam_axon(b1, b2, eps, eps_root, threshold)
    return optax.scale_by_radam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, threshold=threshold)


def radam(learning_rate, b1, b2, eps, eps_root, threshold, compat):
    return optax.chain(
        scale_by_radam(b1, b2, eps, eps_root, threshold, compat), optax.scale_by_learning_rate(learning_rate)
    )


def rmsprop(learning_rate, centered, momentum, nesterov, initial_scale, decay, eps):
    return optax.rmsprop(
        learning_rate,
        decay=decay,
        eps=eps,
        initial_scale=initial_scale,
        centered=centered,
        momentum=momentum,
        nesterov=nesterov,
    )


def sgd(learning_rate, momentum, nesterov):
    return optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)


def scale_by_yogi(initial_accumulator_value, b1, b2, eps, eps_root):
    return optax.scale_by_yogi(
        b1=b1, b2=b2, eps=eps, eps_root=eps_root, initial_accumulator_value=initial_accumulator_value
    )


def yogi(learning_rate, initial_accumulator_value, b1, b2, eps, eps_root):
    return optax.chain(
        scale_by_yogi(initial_accumulator_value, b1, b2, eps, eps_root), optax.scale_by_learning_rate(learning_rate)
    )


ADAM_EPS_ROOT = EPS_ROOT.replace(default=1e-15, doc="inside the sqrt (code default 1e-15; the doc says 0.0)")
YOGI = [
    HP("initial_accumulator_value", Number(0.0, traced=False), 1e-6, "initial moments (code; doc 0.0)"),
    B1,
    B2,
    EPS.replace(default=1e-3, doc="code default (the doc says 1e-8)"),
    EPS_ROOT,
]
NO_MASK = (("mask", "Axon/Polaris have no masks (use a partition)"),)

_both(
    "adabelief",
    adabelief,
    [lr(1e-3), B1, B2, EPS.replace(default=0.0), EPS_ROOT.replace(default=1e-16), COMPAT],
    "AdaBelief (intended maths; compat: Axon's Adam-on-g² bug).",
    "s = b2·s + (1−b2)·(g − m)² + eps_root; u = −α·m̂/(√ŝ + eps) (compat: Adam with eps_root inside the sqrt)",
    "optax.adabelief(lr, b1, b2, eps=0.0, eps_root=1e-16) (compat: optax.adam(lr, eps=0.0, eps_root=1e-16))",
)
_both(
    "adagrad",
    adagrad,
    [lr(1e-3), EPS.replace(default=1e-7), RSS_INIT],
    "Adagrad.",
    "G₀ = 0.1; G = G + g²; u = −α·g/√(G + eps)",
    "optax.adagrad(lr, initial_accumulator_value=0.1, eps=1e-7)",
)
_both(
    "adam",
    adam,
    [lr(1e-3), B1, B2, EPS, ADAM_EPS_ROOT],
    "Adam (eps_root 1e-15).",
    "u = −α·m̂/(√(v̂ + eps_root) + eps)",
    "optax.adam(lr, b1, b2, eps=1e-8, eps_root=1e-15)",
)
_both(
    "adamw",
    adamw,
    [lr(1e-3), B1, B2, EPS, ADAM_EPS_ROOT, WD],
    "AdamW, decay multiplied by the LR, applied to every leaf.",
    "u = −α·(m̂/(√(v̂ + eps_root) + eps) + λ·p)",
    "optax.adamw(lr, b1, b2, eps=1e-8, eps_root=1e-15, weight_decay=decay)",
    absent=NO_MASK,
)
_both(
    "lamb",
    lamb,
    [lr(1e-2), B1, B2, EPS, ADAM_EPS_ROOT, WD, HP("min_norm", NONNEG, 0.0, "floor of both norms")],
    "LAMB with a trust-ratio norm floor.",
    "r = m̂/(√(v̂+eps_root)+eps) + λ·p; φ = max(‖p‖, min)/max(‖r‖, min) (1 if a norm is 0); u = −α·φ·r",
    "optax.chain(optax.scale_by_adam(b1, b2, eps, eps_root), optax.add_decayed_weights(λ), "
    "optax.scale_by_trust_ratio(min_norm), optax.scale_by_learning_rate(lr))",
    absent=NO_MASK,
)
_both(
    "noisy_sgd",
    noisy_sgd,
    [lr(1e-2), ETA, GAMMA, SEED],
    "SGD plus Gaussian noise of standard deviation eta/t^γ added after the LR.",
    "u = −α·g + (eta/t^γ)·n, n ~ N(0, I)",
    "optax.chain(optax.scale_by_learning_rate(lr), optax.add_noise(eta**2, 2*gamma, key))",
)
_both(
    "radam",
    radam,
    [lr(1e-3), B1, B2, EPS, EPS_ROOT, HP("threshold", Number(), 5.0, "rectify when ρ_t ≥ threshold"), COMPAT],
    "Rectified Adam (intended ρ∞ = 2/(1−b2) − 1; compat: Axon's ρ∞ = 2/(1−b1) − 1).",
    "as optax.radam",
    "optax.radam(lr, b1, b2, eps=1e-8, eps_root=0.0, threshold=5.0)",
)
_both(
    "rmsprop",
    rmsprop,
    [
        lr(1e-2),
        HP("centered", Boolean(), False, "centered variant"),
        MOMENTUM_OPT,
        NESTEROV,
        INITIAL_SCALE,
        HP("decay", UNIT_OPEN, 0.9, "EMA decay"),
        EPS,
    ],
    "RMSProp; LR applied before the momentum trace.",
    "ν = decay·ν + (1−decay)·g²; x = −α·g/√(ν + eps); τ = x + μ·τ; u = τ",
    "optax.rmsprop(lr, decay=0.9, eps=1e-8, initial_scale=0.0, centered, momentum, nesterov)",
)
_both(
    "sgd",
    sgd,
    [lr(1e-2), MOMENTUM_OPT, NESTEROV],
    "SGD; LR applied after the trace.",
    "τ = g + μ·τ; u = −α·τ",
    "optax.sgd(lr, momentum, nesterov)",
)
_both(
    "yogi",
    yogi,
    [lr(1e-2), *YOGI],
    "Yogi with the code defaults (eps 1e-3, moments start at 1e-6).",
    "v = v − (1−b2)·sign(v − g²)·g²; u = −α·m̂/(√(v̂ + eps_root) + eps)",
    "optax.chain(optax.scale_by_yogi(b1, b2, eps=1e-3, eps_root=0.0, initial_accumulator_value=1e-6), "
    "optax.scale_by_learning_rate(lr))",
)

# ---------------------------------------------------------------- Polaris.Updates / Axon.Updates

_both(
    "add_decayed_weights",
    optax.add_decayed_weights,
    [WD],
    "Adds λ·p.",
    "u = g + λ·p",
    "optax.add_decayed_weights(decay)",
    schedules=("weight_decay",),
)
_both(
    "add_noise",
    add_noise,
    [SEED, ETA, GAMMA],
    "Gaussian noise of standard deviation eta/t^γ.",
    "u = g + (eta/t^γ)·n",
    "optax.add_noise(eta**2, 2*gamma, key)",
    schedules=(),
)
_both(
    "centralize",
    optax.centralize,
    [],
    "Gradient centralization (rank > 1 leaves).",
    "u = g − mean(g, axes 1..n−1)",
    "optax.centralize()",
    schedules=(),
)
_both(
    "clip",
    optax.clip,
    [HP("max_delta", NONNEG, 2.0, ":delta")],
    "Elementwise clipping.",
    "u = clip(g, −δ, δ)",
    "optax.clip(2.0)",
    schedules=(),
)
_both(
    "clip_by_global_norm",
    optax.clip_by_global_norm,
    [HP("max_norm", Number(0.0, lo_open=True), 1.0, "bound")],
    "Global-norm clipping.",
    "u = g·min(1, max_norm/‖g‖_global)",
    "optax.clip_by_global_norm(1.0)",
    schedules=(),
)
_both("identity", optax.identity, [], "Passes updates through.", "u = g", "optax.identity()", schedules=())
_both(
    "scale",
    optax.scale,
    [HP("step_size", Number(), REQUIRED, "the factor")],
    "Constant scaling.",
    "u = α·g",
    "optax.scale(step_size)",
    schedules=(),
)
_both(
    "scale_by_state",
    optax.scale,
    [HP("step_size", Number(), REQUIRED, "the factor (Axon stores −lr)")],
    "Scaling by a factor held in the state and tunable while training (set_hyperparams).",
    "u = α·g",
    "optax.inject_hyperparams(optax.scale)(step_size)",
    schedules=(),
    tunable=("step_size",),
)
_both(
    "scale_by_adam",
    optax.scale_by_adam,
    [B1, B2, EPS, ADAM_EPS_ROOT],
    "Adam's preconditioner.",
    "u = m̂/(√(v̂ + eps_root) + eps)",
    "optax.scale_by_adam(b1, b2, eps=1e-8, eps_root=1e-15)",
    schedules=(),
)


def scale_by_belief(b1, b2, eps, eps_root, compat):
    if compat:
        return optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    return optax.scale_by_belief(b1=b1, b2=b2, eps=eps, eps_root=eps_root)


_both(
    "scale_by_belief",
    scale_by_belief,
    [B1, B2, EPS.replace(default=0.0), EPS_ROOT.replace(default=1e-16), COMPAT],
    "AdaBelief's preconditioner (compat: Axon's Adam one).",
    "as adabelief, without the LR",
    "optax.scale_by_belief(b1, b2, eps=0.0, eps_root=1e-16)",
    schedules=(),
)
_both(
    "scale_by_radam",
    scale_by_radam,
    [B1, B2, EPS, EPS_ROOT, HP("threshold", Number(), 5.0, "rectify when ρ_t ≥ threshold"), COMPAT],
    "RAdam's preconditioner (compat: ρ∞ from b1).",
    "as radam, without the LR",
    "optax.scale_by_radam(b1, b2, eps=1e-8, eps_root=0.0, threshold=5.0)",
    schedules=(),
)
_both(
    "scale_by_rms",
    optax.scale_by_rms,
    [HP("decay", UNIT_OPEN, 0.9, "EMA decay"), EPS, INITIAL_SCALE],
    "RMS preconditioner.",
    "ν = decay·ν + (1−decay)·g²; u = g/√(ν + eps)",
    "optax.scale_by_rms(decay=0.9, eps=1e-8, initial_scale=0.0)",
    schedules=(),
)
_both(
    "scale_by_rss",
    optax.scale_by_rss,
    [EPS.replace(default=1e-7), RSS_INIT],
    "Adagrad preconditioner.",
    "G = G + g²; u = g/√(G + eps)",
    "optax.scale_by_rss(initial_accumulator_value=0.1, eps=1e-7)",
    schedules=(),
)
_both(
    "scale_by_schedule",
    optax.scale_by_schedule,
    [
        HP(
            "step_size_fn",
            Custom(schedules.schedule_or_number, "schedule (or number)"),
            REQUIRED,
            "the schedule (Polaris schedule_fn)",
            aliases=("schedule",),
        )
    ],
    "Scales by a schedule of the count (c = 0, 1, ...).",
    "u = s(c)·g",
    "optax.scale_by_schedule(s)",
    schedules=(),
)
_both(
    "scale_by_stddev",
    optax.scale_by_stddev,
    [HP("decay", UNIT_OPEN, 0.9, "EMA decay"), EPS, INITIAL_SCALE],
    "Centered RMS preconditioner.",
    "u = g/√(ν − μ² + eps)",
    "optax.scale_by_stddev(decay=0.9, eps=1e-8, initial_scale=0.0)",
    schedules=(),
)
_both(
    "scale_by_trust_ratio",
    optax.scale_by_trust_ratio,
    [
        HP("min_norm", NONNEG, 0.0, "floor of both norms"),
        HP("trust_coefficient", NONNEG, 1.0, "tc"),
        EPS.replace(default=0.0),
    ],
    "Per-leaf trust ratio.",
    "φ = tc·max(‖p‖, min)/(max(‖g‖, min) + eps); u = φ·g",
    "optax.scale_by_trust_ratio(min_norm=0.0, trust_coefficient=1.0, eps=0.0)",
    schedules=(),
)
_both(
    "scale_by_yogi",
    scale_by_yogi,
    YOGI,
    "Yogi's preconditioner (code defaults).",
    "u = m̂/(√(v̂ + eps_root) + eps)",
    "optax.scale_by_yogi(b1, b2, eps=1e-3, eps_root=0.0, initial_accumulator_value=1e-6)",
    schedules=(),
)
_both(
    "trace",
    optax.trace,
    [HP("decay", Number(0.0, 1.0), 0.9, "momentum decay"), NESTEROV],
    "Momentum trace.",
    "τ = g + decay·τ; u = τ",
    "optax.trace(decay=0.9, nesterov=False)",
    schedules=(),
)

for _library in ("axon", "polaris"):
    preset(
        _library,
        f"{_library}:compose",
        optax.chain,
        [],
        f'{{"{_library}:compose": [a, b, ...]}}: apply a, then b (Polaris compose / the |> pipe).',
        "u = b(a(g))",
        "optax.chain(a, b, ...)",
        kind="combinator",
    )
