"""``objax:`` presets: objax.optimizer (9dd7dc3; unchanged since v1.8.0).

objax passes the learning rate (and Adam's betas, Momentum's momentum) on each
call; here they are hyperparameters, tunable while training with
``"tunable": [...]``. Canonical names: lr → learning_rate, beta1/beta2 → b1/b2,
tc → trust_coefficient. objax's ExponentialMovingAverage is the model's
``ema`` setting (``optserve.server.spec.ema``), not a chain element.
"""

from __future__ import annotations

import optax

from optserve.server.spec import transforms
from optserve.server.spec.hyperparams import B1, B2, EPS, HP, LEARNING_RATE, NESTEROV, NONNEG, Number
from optserve.server.spec.presets import preset

MOMENTUM = HP("momentum", Number(0.0, 1.0), 0.9, "momentum μ")
LR = LEARNING_RATE.replace(doc="lr (objax's per-call argument; required)")


def sgd(learning_rate):
    return optax.sgd(learning_rate)


def momentum(learning_rate, momentum, nesterov):
    return optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)


def adam(learning_rate, b1, b2, eps):
    return optax.chain(transforms.scale_by_adam_objax(b1, b2, eps), optax.scale_by_learning_rate(learning_rate))


def lars(learning_rate, momentum, weight_decay, trust_coefficient, eps):
    # The LR goes inside the momentum buffer: m = μ·m + lr·k·(g + wd·p); p −= m.
    return optax.chain(
        transforms.scale_by_trust_ratio_objax(weight_decay, trust_coefficient, eps),
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum),
    )


NATIVE = ("learning_rate",)
preset("objax", "objax:SGD", sgd, [LR], "Plain SGD.", "p −= lr·g", "optax.sgd(lr)", schedules=NATIVE)
preset(
    "objax",
    "objax:Momentum",
    momentum,
    [LR, MOMENTUM, NESTEROV],
    "Momentum; LR after the trace.",
    "m = g + μ·m; p −= lr·m (nesterov: p −= lr·(g + μ·m))",
    "optax.sgd(lr, momentum, nesterov)",
    schedules=NATIVE,
)
preset(
    "objax",
    "objax:Adam",
    adam,
    [LR, B1.replace(doc="beta1"), B2.replace(doc="beta2"), EPS],
    "Adam with eps inside the square root of the uncorrected v.",
    "lr_t = lr·√(1−β2^t)/(1−β1^t); m += (1−β1)(g − m); v += (1−β2)(g² − v); p −= lr_t·m/√(v + eps)",
    "custom scale_by_adam_objax + optax.scale_by_learning_rate(lr) (optax.adam differs by ~4%)",
    schedules=NATIVE,
    absent=(("eps_root", "objax's eps acts as a time-varying eps_root"),),
)
preset(
    "objax",
    "objax:LARS",
    lars,
    [
        LR,
        MOMENTUM,
        HP("weight_decay", NONNEG, 1e-4, "weight_decay"),
        HP("trust_coefficient", NONNEG, 1e-3, "tc"),
        EPS.replace(default=1e-5),
    ],
    "LARS with objax's trust ratio tc·‖p‖/(‖g‖ + wd·‖p‖ + eps).",
    "k = max(1[‖p‖=0 or ‖g‖=0], tc·‖p‖/(‖g‖ + wd·‖p‖ + eps)); m = μ·m + lr·k·(g + wd·p); p −= m",
    "custom scale_by_trust_ratio_objax + scale_by_learning_rate(lr) + trace(μ) "
    "(optax.lars differs by ~17% at these defaults)",
    schedules=NATIVE,
)
