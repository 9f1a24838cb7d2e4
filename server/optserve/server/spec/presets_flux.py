"""``flux:`` presets: Flux.jl's Optimise rules (master 089ec08, May 2020), exactly.

Each rule is registered with its Δ builder (``unsigned``, Flux's sign: the
caller applies p ← p − Δ) and a standalone builder that negates Δ once. Inside
``{"flux:Optimiser": [...]}`` members contribute their Δ and the sign is
flipped once at the end; every member applies its own η, so learning rates
multiply as in Flux (docs/optimizer-catalogue.md F13, §4.11). Flux's ε is the constant 1e-8.
Hyperparameters use canonical names: η → learning_rate, β → b1, b2,
ρ → momentum / decay / rho, decay (ADAMW) and wd → weight_decay, thresh →
max_delta / max_norm, γ → gamma.
"""

from __future__ import annotations

from typing import Any

import optax

from optserve.server.spec import transforms
from optserve.server.spec.hyperparams import B1, B2, HP, NONNEG, REQUIRED, UNIT_OPEN, Integer, Number
from optserve.server.spec.presets import lr, preset, signed
from optserve.server.spec.schedules import _inverse_time_decay

EPS = 1e-8  # Flux: `const ϵ = 1e-8`, not a hyperparameter
NO_EPS = (("eps", "Flux's ε is the constant 1e-8"), ("eps_root", "Flux has no eps_root"))
BETAS = [B1.replace(doc="β[1]"), B2.replace(doc="β[2]")]
MOMENTUM = HP("momentum", Number(0.0, 1.0), 0.9, "ρ")


def _eta(learning_rate: Any) -> optax.GradientTransformation:
    # Multiply by η (a number, a jax scalar, or a schedule): Δ keeps Flux's sign.
    return optax.scale_by_learning_rate(learning_rate, flip_sign=False)


def _flux(
    name: str, unsigned, hps: list, doc: str, formula: str, equivalent: str, schedules: tuple = ("learning_rate",)
) -> None:
    preset(
        "flux",
        f"flux:{name}",
        signed(unsigned),
        hps,
        doc,
        formula,
        equivalent,
        unsigned=unsigned,
        schedules=schedules,
        absent=NO_EPS,
    )


def descent(learning_rate):
    return _eta(learning_rate)


def momentum(learning_rate, momentum):
    # Flux folds η into the velocity (v = ρv − ηg): LR *before* the trace (§4.3).
    return optax.chain(_eta(learning_rate), optax.trace(decay=momentum))


def nesterov(learning_rate, momentum):
    return optax.chain(_eta(learning_rate), optax.trace(decay=momentum, nesterov=True))


def rmsprop(learning_rate, decay):
    return optax.chain(optax.scale_by_rms(decay=decay, eps=EPS, eps_in_sqrt=False), _eta(learning_rate))


def adam(learning_rate, b1, b2):
    return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=EPS), _eta(learning_rate))


def radam(learning_rate, b1, b2):
    # Flux rectifies when ρ_t > 4; optax's threshold test is ρ_t ≥ threshold (§4.14).
    return optax.chain(optax.scale_by_radam(b1=b1, b2=b2, eps=EPS, threshold=4.0), _eta(learning_rate))


def adamax(learning_rate, b1, b2):
    return optax.chain(transforms.scale_by_adamax_eps_outside(b1, b2, EPS), _eta(learning_rate))


def adagrad(learning_rate):
    return optax.chain(transforms.scale_by_rss_eps_outside(EPS, EPS), _eta(learning_rate))


def adadelta(rho):
    # The documented 2020 ADADelta never moves (Δa₀ = 0); this is the v0.11.1 fix (§4.8).
    return optax.scale_by_adadelta(rho=rho, eps=EPS)


def amsgrad(learning_rate, b1, b2):
    return optax.chain(transforms.scale_by_amsgrad_flux(b1, b2, EPS, EPS), _eta(learning_rate))


def nadam(learning_rate, b1, b2):
    # Flux keeps Dozat's √β2 in the denominator: √(β2·v̂) + ε = √β2·(√v̂ + ε/√β2) (§2.6b).
    root = b2**0.5
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=EPS / root, nesterov=True), optax.scale(learning_rate / root)
    )


def adamw(learning_rate, b1, b2, weight_decay):
    # Optimiser(ADAM(η, β), WeightDecay(decay)): the decay is *not* multiplied by η (§2.3).
    return optax.chain(adam(learning_rate, b1, b2), optax.add_decayed_weights(weight_decay))


def exp_decay(learning_rate, decay_rate, transition_steps, end_value):
    # η_n = max(η₀·decay^⌊n/s⌋, clip) with n = c + 1: Flux counts steps from 1 (§2.2).
    schedule = optax.exponential_decay(
        init_value=learning_rate,
        transition_steps=transition_steps,
        decay_rate=decay_rate,
        staircase=True,
        end_value=end_value,
    )
    return optax.scale_by_schedule(lambda count: schedule(count + 1))


def inv_decay(gamma):
    schedule = _inverse_time_decay(1.0, gamma)
    return optax.scale_by_schedule(lambda count: schedule(count + 1))


def weight_decay(weight_decay):
    return optax.add_decayed_weights(weight_decay)


def clip_value(max_delta):
    return optax.clip(max_delta)


def clip_norm(max_norm):
    return transforms.clip_by_leaf_norm(max_norm)


_flux("Descent", descent, [lr(0.1, "η")], "Plain gradient descent.", "Δ = η·g", "optax.sgd(η)")
_flux(
    "Momentum",
    momentum,
    [lr(0.01, "η"), MOMENTUM],
    "Momentum with η inside the velocity.",
    "v = ρ·v − η·g; Δ = −v",
    "optax.chain(optax.scale_by_learning_rate(η), optax.trace(ρ)) (= optax.sgd(η, ρ) for constant η)",
)
_flux(
    "Nesterov",
    nesterov,
    [lr(0.001, "η"), MOMENTUM],
    "Nesterov momentum (Sutskever form).",
    "d = ρ²·v − (1+ρ)·η·g; v = ρ·v − η·g; Δ = −d",
    "optax.chain(optax.scale_by_learning_rate(η), optax.trace(ρ, nesterov=True))",
)
_flux(
    "RMSProp",
    rmsprop,
    [lr(0.001, "η"), HP("decay", UNIT_OPEN, 0.9, "ρ (the squared-gradient EMA decay)")],
    "RMSProp with ε outside the square root.",
    "a = ρ·a + (1−ρ)·g²; Δ = η·g/(√a + ε)",
    "optax.rmsprop(η, decay=ρ, eps=1e-8, eps_in_sqrt=False)",
)
_flux("ADAM", adam, [lr(0.001, "η"), *BETAS], "Adam.", "Δ = η·m̂/(√v̂ + ε)", "optax.adam(η, b1, b2, eps=1e-8)")
_flux(
    "RADAM",
    radam,
    [lr(0.001, "η"), *BETAS],
    "Rectified Adam, rectifying when ρ_t > 4.",
    "ρ_t > 4: Δ = η·r_t·m̂/(√v̂ + ε), else Δ = η·m̂",
    "optax.radam(η, b1, b2, eps=1e-8, threshold=4.0)",
)
_flux(
    "AdaMax",
    adamax,
    [lr(0.001, "η"), *BETAS],
    "AdaMax with ε after the max.",
    "w = max(β2·w, |g|); Δ = η/(1−β1^t)·m/(w + ε)",
    "custom scale_by_adamax_eps_outside (optax.adamax puts ε inside the max)",
)
_flux(
    "ADAGrad",
    adagrad,
    [lr(0.1, "η")],
    "Adagrad, accumulator starting at ε, ε outside the root.",
    "a₀ = ε; a = a + g²; Δ = η·g/(√a + ε)",
    "custom scale_by_rss_eps_outside (≈ optax.adagrad(η, 1e-8, 0.0))",
)
_flux(
    "ADADelta",
    adadelta,
    [HP("rho", UNIT_OPEN, 0.9, "ρ")],
    "ADADelta as fixed in Flux v0.11.1 (the May 2020 code never updates; no learning rate).",
    "a = ρ·a + (1−ρ)·g²; Δ = g·√(Δa + ε)/√(a + ε); Δa = ρ·Δa + (1−ρ)·Δ²",
    "optax.adadelta(1.0, rho, eps=1e-8)",
    schedules=(),
)
_flux(
    "AMSGrad",
    amsgrad,
    [lr(0.001, "η"), *BETAS],
    "AMSGrad without bias correction, state starting at ε.",
    "m₀ = v₀ = v̂₀ = ε; v̂ = max(v̂, v); Δ = η·m/(√v̂ + ε)",
    "custom scale_by_amsgrad_flux (optax.amsgrad(η, bias_correction_mu=False, bias_correction_nu=False) "
    "with ε-initialised state)",
)
_flux(
    "NADAM",
    nadam,
    [lr(0.001, "η"), *BETAS],
    "NAdam keeping Dozat's √β2 in the denominator.",
    "Δ = η·(β1·m/(1−β1^{t+1}) + (1−β1)·g/(1−β1^t))/(√(β2·v/(1−β2^t)) + ε)",
    "optax.nadam(η/√β2, b1, b2, eps=1e-8/√β2)",
    schedules=(),
)
_flux(
    "ADAMW",
    adamw,
    [lr(0.001, "η"), *BETAS, HP("weight_decay", NONNEG, 0.0, "decay (not multiplied by η)")],
    "ADAM followed by WeightDecay: decoupled decay not scaled by η.",
    "Δ = η·m̂/(√v̂ + ε) + λ·p",
    "optax.chain(optax.scale_by_adam(eps=1e-8), optax.scale_by_learning_rate(η), optax.add_decayed_weights(-λ))",
)
_flux(
    "ExpDecay",
    exp_decay,
    [
        lr(0.001, "η₀"),
        HP("decay_rate", Number(0.0, lo_open=True, traced=False), 0.1, "decay"),
        HP("transition_steps", Integer(1), 1000, "decay_step"),
        HP("end_value", Number(traced=False), 1e-4, "clip (lower bound of η)"),
    ],
    "Step decay of η, counting steps from 1 (a member of flux:Optimiser; alone it is SGD with that η).",
    "η_n = max(η₀·decay^⌊n/decay_step⌋, clip), n = 1, 2, ...; Δ = η_n·g",
    "optax.scale_by_schedule(lambda c: optax.exponential_decay(η₀, s, decay, staircase=True, end_value=clip)(c + 1))",
    schedules=(),
)
_flux(
    "InvDecay",
    inv_decay,
    [HP("gamma", NONNEG, 0.001, "γ")],
    "Inverse-time decay, counting steps from 1 (a member of flux:Optimiser).",
    "Δ = g/(1 + γ·n), n = 1, 2, ...",
    "optax.scale_by_schedule(lambda c: 1/(1 + γ·(c + 1)))",
    schedules=(),
)
_flux(
    "WeightDecay",
    weight_decay,
    [HP("weight_decay", Number(), 0.0, "wd")],
    "Adds wd·p to Δ (a member of flux:Optimiser).",
    "Δ = Δ + wd·p",
    "optax.add_decayed_weights(wd) in the unsigned chain",
    schedules=(),
)
_flux(
    "ClipValue",
    clip_value,
    [HP("max_delta", NONNEG, REQUIRED, "thresh")],
    "Elementwise clipping of Δ.",
    "Δ = clamp(Δ, −thresh, thresh)",
    "optax.clip(thresh)",
    schedules=(),
)
_flux(
    "ClipNorm",
    clip_norm,
    [HP("max_norm", Number(0.0, lo_open=True), REQUIRED, "thresh")],
    "Per-array norm clipping of Δ.",
    "per leaf: ‖Δ‖ > thresh ⇒ Δ = Δ·thresh/‖Δ‖",
    "custom clip_by_leaf_norm(thresh)",
    schedules=(),
)

preset(
    "flux",
    "flux:Optimiser",
    lambda *txs: optax.chain(*txs, optax.scale(-1.0)),
    [],
    'Flux composition {"flux:Optimiser": [flux rules...]}: Δ flows through the members in order, '
    "each applying its own η (learning rates multiply); the sign is flipped once at the end.",
    "Δ = c(b(a(g))); u = −Δ",
    "optax.chain(A, B, C, optax.scale(-1.0)) of the unsigned members",
    unsigned=lambda *txs: optax.chain(*txs),
    kind="combinator",
)
