"""The conformance case list: every canonical rule, transform, schedule and preset of issue 3.

``CASES``: (id, spec, n_steps, canonical).  ``canonical`` cases are also compared with
in-process optax (``optax_equiv.optax_for``); presets only with the NumPy reference.
``NOISE_CASES``: random rules, checked by statistics (the reference cannot reproduce
jax.random's stream): the mean is the same spec without noise, the spread is predicted.
``EMA_CASES``: parameter EMA settings (objax ExponentialMovingAverage, J5).

Hyperparameters are chosen so that 100 steps move the parameters by a sizeable fraction of
their initial magnitude (so a 1e-5 relative error criterion sees formula differences), and set
away from the defaults wherever the library's behaviour depends on them.
Spec naming decisions (documented where docs/optimizer-catalogue.md is silent) are in flux.py (ExpDecay
names) and schedules.py (inverse_time_decay, piecewise_constant keys).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple


class Case(NamedTuple):
    id: str
    spec: Any
    n_steps: int = 100
    canonical: bool = False


class NoiseCase(NamedTuple):
    id: str
    spec: Any
    mean_spec: Any  # the same rule without noise: the expected trajectory
    step_std: Callable[[int], float]  # std of the noise each update t = 1, 2, ... adds to p
    n_steps: int = 100


class EmaCase(NamedTuple):
    id: str
    spec: Any
    settings: dict  # create_model keyword arguments: ema=<decay μ>, ema_debias=<bool>
    n_steps: int = 100


def _lr(x):
    return {"scale_by_learning_rate": {"learning_rate": x}}


def _canon(case_id, spec, n_steps=100):
    return Case(case_id, spec, n_steps, True)


# --------------------------------------------------------------------------------------------
# canonical optimizers (§3.1)

CANONICAL_OPTIMIZERS = [
    _canon("sgd", {"sgd": {"learning_rate": 0.05}}),
    _canon("sgd_momentum", {"sgd": {"learning_rate": 0.01, "momentum": 0.9}}),
    _canon("sgd_nesterov", {"sgd": {"learning_rate": 0.01, "momentum": 0.8, "nesterov": True}}),
    _canon("adam", {"adam": {"learning_rate": 0.01}}),
    _canon("adam_nesterov_betas", {"adam": {"learning_rate": 0.01, "b1": 0.8, "b2": 0.99, "nesterov": True}}),
    _canon("adam_eps_root", {"adam": {"learning_rate": 0.01, "eps": 1e-6, "eps_root": 1e-6}}),
    _canon("nadam", {"nadam": {"learning_rate": 0.01, "b2": 0.99}}),
    _canon("adamw", {"adamw": {"learning_rate": 0.01, "weight_decay": 0.5}}),
    _canon("adamw_default_decay", {"adamw": {"learning_rate": 0.02}}),
    _canon("radam", {"radam": {"learning_rate": 0.01}}),
    _canon("radam_threshold", {"radam": {"learning_rate": 0.01, "b2": 0.99, "threshold": 8.0}}),
    _canon("adamax", {"adamax": {"learning_rate": 0.01, "b2": 0.99}}),
    _canon("amsgrad", {"amsgrad": {"learning_rate": 0.01}}),
    _canon(
        "amsgrad_no_bias_correction",
        {"amsgrad": {"learning_rate": 0.01, "bias_correction_mu": False, "bias_correction_nu": False}},
    ),
    _canon("adagrad", {"adagrad": {"learning_rate": 0.1}}),
    _canon("adagrad_init_eps", {"adagrad": {"learning_rate": 0.1, "initial_accumulator_value": 0.01, "eps": 1e-10}}),
    _canon("adadelta_default_lr", {"adadelta": {}}),  # LR 1.0, never optax's ascending None
    _canon("adadelta", {"adadelta": {"learning_rate": 2.0, "rho": 0.95, "eps": 1e-5, "weight_decay": 0.01}}),
    _canon("rmsprop", {"rmsprop": {"learning_rate": 0.01}}),
    _canon("rmsprop_centered", {"rmsprop": {"learning_rate": 0.01, "centered": True, "decay": 0.8}}),
    _canon("rmsprop_momentum_nesterov", {"rmsprop": {"learning_rate": 0.005, "momentum": 0.9, "nesterov": True}}),
    _canon("rmsprop_initial_scale", {"rmsprop": {"learning_rate": 0.01, "initial_scale": 1.0}}),
    _canon(
        "rmsprop_eps_outside_bias_corr",
        {"rmsprop": {"learning_rate": 0.01, "eps": 1e-4, "eps_in_sqrt": False, "bias_correction": True}},
    ),
    _canon(
        "rmsprop_centered_momentum",
        {"rmsprop": {"learning_rate": 0.005, "centered": True, "momentum": 0.5, "eps_in_sqrt": False}},
    ),
    _canon("adabelief", {"adabelief": {"learning_rate": 0.01}}),
    _canon("adabelief_eps", {"adabelief": {"learning_rate": 0.01, "eps": 1e-6, "eps_root": 1e-8, "b1": 0.8}}),
    _canon("lamb", {"lamb": {"learning_rate": 0.01, "weight_decay": 0.01}}),
    _canon("lars", {"lars": {"learning_rate": 1.0, "weight_decay": 1e-3, "trust_coefficient": 0.02, "eps": 1e-6}}),
    _canon(
        "lars_nesterov", {"lars": {"learning_rate": 1.0, "trust_coefficient": 0.01, "momentum": 0.8, "nesterov": True}}
    ),
    _canon("yogi", {"yogi": {"learning_rate": 0.05}}),
    _canon("yogi_eps", {"yogi": {"learning_rate": 0.05, "eps": 1e-5, "b1": 0.8}}),
]

# --------------------------------------------------------------------------------------------
# canonical transforms (§3.2), each inside a chain that ends with a learning rate

CANONICAL_TRANSFORMS = [
    _canon("identity", {"chain": [{"identity": {}}, {"scale": {"step_size": -0.05}}]}),
    _canon("scale", {"scale": {"step_size": -0.05}}),
    _canon("scale_by_learning_rate", {"chain": [{"scale_by_adam": {}}, _lr(0.01)]}),
    _canon(
        "scale_by_schedule",
        {
            "chain": [
                {
                    "scale_by_schedule": {
                        "schedule": {
                            "piecewise_constant": {"init_value": 0.1, "boundaries_and_scales": {"20": 0.5, "60": 0.1}}
                        }
                    }
                },
                {"scale": {"step_size": -1.0}},
            ]
        },
    ),
    _canon(
        "scale_by_adam",
        {"chain": [{"scale_by_adam": {"b1": 0.7, "b2": 0.95, "eps": 1e-5, "eps_root": 1e-9}}, _lr(0.01)]},
    ),
    _canon("scale_by_belief", {"chain": [{"scale_by_belief": {"b2": 0.99, "eps": 1e-10}}, _lr(0.01)]}),
    _canon(
        "scale_by_radam", {"chain": [{"scale_by_radam": {"b2": 0.98, "threshold": 6.0, "nesterov": True}}, _lr(0.01)]}
    ),
    _canon(
        "scale_by_rms", {"chain": [{"scale_by_rms": {"decay": 0.95, "eps": 1e-6, "initial_scale": 0.1}}, _lr(0.01)]}
    ),
    _canon("scale_by_rss", {"chain": [{"scale_by_rss": {"initial_accumulator_value": 0.5, "eps": 1e-5}}, _lr(0.1)]}),
    _canon("scale_by_stddev", {"chain": [{"scale_by_stddev": {"decay": 0.8, "initial_scale": 0.5}}, _lr(0.01)]}),
    _canon(
        "scale_by_trust_ratio",
        {
            "chain": [
                {"scale_by_adam": {}},
                {"scale_by_trust_ratio": {"min_norm": 0.1, "trust_coefficient": 0.5, "eps": 1e-3}},
                _lr(0.01),
            ]
        },
    ),
    _canon(
        "scale_by_yogi",
        {
            "chain": [
                {"scale_by_yogi": {"b1": 0.8, "eps": 1e-4, "eps_root": 1e-8, "initial_accumulator_value": 0.01}},
                _lr(0.02),
            ]
        },
    ),
    _canon("scale_by_amsgrad", {"chain": [{"scale_by_amsgrad": {"b2": 0.99, "eps_root": 1e-10}}, _lr(0.01)]}),
    _canon("scale_by_adamax", {"chain": [{"scale_by_adamax": {"b1": 0.8, "eps": 1e-4}}, _lr(0.01)]}),
    _canon("trace", {"chain": [{"trace": {"decay": 0.9}}, {"scale": {"step_size": -0.01}}]}),
    _canon("trace_nesterov", {"chain": [{"trace": {"decay": 0.7, "nesterov": True}}, {"scale": {"step_size": -0.02}}]}),
    _canon(
        "add_decayed_weights",
        {"chain": [{"add_decayed_weights": {"weight_decay": 0.1}}, {"scale": {"step_size": -0.05}}]},
    ),
    _canon(
        "add_decayed_weights_schedule",
        {
            "chain": [
                {"scale_by_adam": {}},
                {
                    "add_decayed_weights": {
                        "weight_decay": {"linear": {"init_value": 0.0, "end_value": 1.0, "transition_steps": 50}}
                    }
                },
                _lr(0.01),
            ]
        },
    ),
    _canon("centralize", {"chain": [{"centralize": {}}, {"scale": {"step_size": -0.05}}]}),
    _canon("clip", {"chain": [{"clip": {"max_delta": 0.1}}, {"scale": {"step_size": -0.2}}]}),
    _canon(
        "clip_by_global_norm", {"chain": [{"clip_by_global_norm": {"max_norm": 0.5}}, {"sgd": {"learning_rate": 0.1}}]}
    ),
    _canon("clip_by_leaf_norm", {"chain": [{"clip_by_leaf_norm": {"max_norm": 0.3}}, {"scale": {"step_size": -0.1}}]}),
]

# --------------------------------------------------------------------------------------------
# schedules (§3.3), as an sgd learning rate so the value shows directly


def _sgd_sched(sched):
    return {"sgd": {"learning_rate": sched, "momentum": 0.5}}


SCHEDULE_CASES = [
    _canon("schedule_constant", _sgd_sched({"constant": {"value": 0.03}})),
    _canon(
        "schedule_exponential_decay",
        _sgd_sched({"exponential_decay": {"init_value": 0.05, "transition_steps": 10, "decay_rate": 0.8}}),
    ),
    _canon(
        "schedule_exponential_decay_staircase_end",
        _sgd_sched(
            {
                "exponential_decay": {
                    "init_value": 0.05,
                    "transition_steps": 7,
                    "decay_rate": 0.5,
                    "transition_begin": 5,
                    "staircase": True,
                    "end_value": 0.01,
                }
            }
        ),
    ),
    _canon(
        "schedule_exponential_decay_count_offset",
        _sgd_sched(
            {
                "exponential_decay": {
                    "init_value": 0.05,
                    "transition_steps": 10,
                    "decay_rate": 0.5,
                    "staircase": True,
                    "count_offset": 1,
                }
            }
        ),
    ),
    _canon("schedule_inverse_time_decay", _sgd_sched({"inverse_time_decay": {"init_value": 0.05, "decay_rate": 0.1}})),
    _canon(
        "schedule_inverse_time_decay_staircase",
        _sgd_sched(
            {
                "inverse_time_decay": {
                    "init_value": 0.05,
                    "decay_rate": 0.5,
                    "transition_steps": 10,
                    "staircase": True,
                    "count_offset": 3,
                }
            }
        ),
    ),
    _canon(
        "schedule_polynomial",
        _sgd_sched(
            {
                "polynomial": {
                    "init_value": 0.05,
                    "end_value": 0.005,
                    "power": 2,
                    "transition_steps": 60,
                    "transition_begin": 10,
                }
            }
        ),
    ),
    _canon(
        "schedule_linear",
        _sgd_sched({"linear": {"init_value": 0.0, "end_value": 0.05, "transition_steps": 40, "count_offset": 2}}),
    ),
    _canon(
        "schedule_cosine_decay",
        _sgd_sched({"cosine_decay": {"init_value": 0.05, "decay_steps": 80, "alpha": 0.1, "exponent": 2.0}}),
    ),
    _canon(
        "schedule_warmup_cosine_decay",
        {
            "adam": {
                "learning_rate": {
                    "warmup_cosine_decay": {
                        "init_value": 0.0,
                        "peak_value": 0.02,
                        "warmup_steps": 10,
                        "decay_steps": 90,
                        "end_value": 0.001,
                    }
                }
            }
        },
    ),
    _canon(
        "schedule_piecewise_constant",
        _sgd_sched(
            {"piecewise_constant": {"init_value": 0.05, "boundaries_and_scales": {"25": 0.5, "50": 0.4, "75": 2.0}}}
        ),
    ),
    _canon(
        "schedule_join",
        _sgd_sched(
            {
                "join": {
                    "schedules": [
                        {"linear": {"init_value": 0.0, "end_value": 0.05, "transition_steps": 20}},
                        {"cosine_decay": {"init_value": 0.05, "decay_steps": 80}},
                    ],
                    "boundaries": [20],
                }
            }
        ),
    ),
]

# --------------------------------------------------------------------------------------------
# flux: presets (F1-F18)

FLUX_CASES = [
    Case("flux_descent_default", "flux:Descent"),
    Case("flux_momentum", {"flux:Momentum": {"learning_rate": 0.02, "momentum": 0.8}}),
    Case(
        "flux_momentum_schedule",
        {
            "flux:Momentum": {
                "learning_rate": {"exponential_decay": {"init_value": 0.02, "transition_steps": 5, "decay_rate": 0.7}}
            }
        },
    ),
    Case("flux_nesterov", {"flux:Nesterov": {"learning_rate": 0.01}}),
    Case("flux_rmsprop", {"flux:RMSProp": {"learning_rate": 0.01, "decay": 0.95}}),
    Case("flux_adam", {"flux:ADAM": {"learning_rate": 0.01, "b1": 0.8}}),
    Case("flux_adam_default", "flux:ADAM"),
    Case("flux_radam", {"flux:RADAM": {"learning_rate": 0.01}}),
    Case("flux_adamax", {"flux:AdaMax": {"learning_rate": 0.01}}),
    Case("flux_adagrad_default", "flux:ADAGrad"),
    Case("flux_adadelta", {"flux:ADADelta": {"rho": 0.8}}),
    Case("flux_adadelta_default", "flux:ADADelta"),
    Case("flux_amsgrad", {"flux:AMSGrad": {"learning_rate": 0.01, "b2": 0.99}}),
    Case("flux_nadam", {"flux:NADAM": {"learning_rate": 0.01, "b2": 0.9}}),
    Case("flux_adamw", {"flux:ADAMW": {"learning_rate": 0.01, "weight_decay": 0.01}}),
    Case(
        "flux_expdecay",
        {"flux:ExpDecay": {"learning_rate": 0.1, "decay_rate": 0.5, "transition_steps": 10, "end_value": 0.01}},
    ),
    Case("flux_invdecay", {"flux:InvDecay": {"gamma": 0.05}}),
    Case("flux_weightdecay", {"flux:WeightDecay": {"weight_decay": 0.01}}),
    Case("flux_clipvalue", {"flux:ClipValue": {"max_delta": 0.05}}),
    Case("flux_clipnorm", {"flux:ClipNorm": {"max_norm": 0.1}}),
    Case(
        "flux_optimiser_expdecay_momentum",
        {
            "flux:Optimiser": [
                {"flux:ExpDecay": {"learning_rate": 1.0, "decay_rate": 0.5, "transition_steps": 10, "end_value": 0.1}},
                {"flux:Momentum": {"learning_rate": 0.02}},
            ]
        },
    ),
    Case(
        "flux_optimiser_invdecay_adam_weightdecay",
        {
            "flux:Optimiser": [
                {"flux:InvDecay": {"gamma": 0.02}},
                {"flux:ADAM": {"learning_rate": 0.01}},
                {"flux:WeightDecay": {"weight_decay": 0.001}},
            ]
        },
    ),
    Case(
        "flux_optimiser_clip_descent",
        {
            "flux:Optimiser": [
                {"flux:ClipNorm": {"max_norm": 0.5}},
                {"flux:ClipValue": {"max_delta": 0.2}},
                {"flux:Descent": {"learning_rate": 0.2}},
            ]
        },
    ),
    Case("flux_optimiser_case_insensitive", {"FLUX:optimiser": ["flux:descent", "FLUX:Nesterov"]}),
]

# --------------------------------------------------------------------------------------------
# axon: / polaris: presets (A1-A10, P1-P22), code defaults, correct maths and compat forms

AXON_CASES = [
    Case("axon_adabelief_default", "axon:adabelief"),
    Case("axon_adabelief", {"axon:adabelief": {"learning_rate": 0.01}}),
    Case("axon_adabelief_compat", {"axon:adabelief": {"learning_rate": 0.01, "compat": True}}),
    Case("axon_adagrad", {"axon:adagrad": {"learning_rate": 0.05}}),
    Case("axon_adam", {"axon:adam": {"learning_rate": 0.01}}),
    Case("axon_adamw", {"axon:adamw": {"learning_rate": 0.01, "weight_decay": 0.1}}),
    Case("axon_lamb_default", "axon:lamb"),
    Case("axon_lamb_min_norm", {"axon:lamb": {"weight_decay": 0.01, "min_norm": 0.5}}),
    Case("axon_radam", {"axon:radam": {"learning_rate": 0.01}}),
    Case("axon_radam_compat", {"axon:radam": {"learning_rate": 0.01, "compat": True}}),
    Case("axon_rmsprop_default", "axon:rmsprop"),
    Case(
        "axon_rmsprop_centered_momentum",
        {"axon:rmsprop": {"learning_rate": 0.005, "centered": True, "momentum": 0.9, "nesterov": True}},
    ),
    Case("axon_sgd_default", "axon:sgd"),
    Case("axon_sgd_momentum", {"axon:sgd": {"learning_rate": 0.02, "momentum": 0.9, "nesterov": True}}),
    Case("axon_yogi_default", "axon:yogi"),
    Case("polaris_adam", {"polaris:adam": {"learning_rate": 0.01}}),
    Case("polaris_adabelief_compat", {"polaris:adabelief": {"learning_rate": 0.01, "compat": True}}),
    Case("polaris_radam", {"polaris:radam": {"learning_rate": 0.01, "b2": 0.99}}),
    Case("polaris_yogi", {"polaris:yogi": {"learning_rate": 0.05, "initial_accumulator_value": 0.0, "eps_root": 1e-8}}),
    Case("polaris_lamb", {"polaris:lamb": {"learning_rate": 0.01}}),
    Case("polaris_adagrad", {"polaris:adagrad": {"learning_rate": 0.05}}),
    Case("polaris_rmsprop", {"polaris:rmsprop": {"learning_rate": 0.01}}),
    Case("polaris_sgd", {"polaris:sgd": {"learning_rate": 0.05}}),
    Case("polaris_adamw", {"polaris:adamw": {"learning_rate": 0.01, "weight_decay": 0.05}}),
    # Polaris.Updates transforms, composed
    Case(
        "polaris_updates_adam_state",
        {
            "chain": [
                {"polaris:clip_by_global_norm": {}},
                "polaris:scale_by_adam",
                {"polaris:add_decayed_weights": {"weight_decay": 0.01}},
                {"polaris:scale_by_state": {"step_size": -0.01}},
            ]
        },
    ),
    Case(
        "polaris_updates_belief_compat",
        {"chain": [{"polaris:scale_by_belief": {"compat": True}}, {"polaris:scale": {"step_size": -0.01}}]},
    ),
    Case("polaris_updates_belief", {"chain": ["polaris:scale_by_belief", {"polaris:scale": {"step_size": -0.01}}]}),
    Case(
        "polaris_updates_radam_compat",
        {"chain": [{"polaris:scale_by_radam": {"compat": True}}, {"polaris:scale": {"step_size": -0.01}}]},
    ),
    Case(
        "polaris_updates_rms_centralize",
        {"chain": ["polaris:centralize", "polaris:scale_by_rms", {"polaris:scale": {"step_size": -0.01}}]},
    ),
    Case(
        "polaris_updates_rss_clip",
        {
            "chain": [
                {"polaris:clip": {"max_delta": 0.3}},
                "polaris:scale_by_rss",
                {"polaris:scale": {"step_size": -0.1}},
            ]
        },
    ),
    Case(
        "polaris_updates_stddev_trace",
        {
            "chain": [
                "polaris:scale_by_stddev",
                {"polaris:scale": {"step_size": -0.005}},
                {"polaris:trace": {"nesterov": True}},
            ]
        },
    ),
    Case(
        "polaris_updates_yogi_trust_ratio",
        {
            "chain": [
                "polaris:scale_by_yogi",
                {"polaris:scale_by_trust_ratio": {"trust_coefficient": 0.5}},
                {
                    "polaris:scale_by_schedule": {
                        "schedule": {
                            "exponential_decay": {"init_value": -0.02, "transition_steps": 20, "decay_rate": 0.5}
                        }
                    }
                },
            ]
        },
    ),
    Case(
        "axon_updates_identity_trace", {"chain": ["axon:identity", "axon:trace", {"axon:scale": {"step_size": -0.01}}]}
    ),
]

# --------------------------------------------------------------------------------------------
# objax: presets (J1-J4)

OBJAX_CASES = [
    Case("objax_sgd", {"objax:SGD": {"learning_rate": 0.05}}),
    Case("objax_momentum", {"objax:Momentum": {"learning_rate": 0.01}}),
    Case("objax_momentum_nesterov", {"objax:Momentum": {"learning_rate": 0.01, "momentum": 0.8, "nesterov": True}}),
    Case("objax_adam", {"objax:Adam": {"learning_rate": 0.01}}),
    Case("objax_adam_eps", {"objax:Adam": {"learning_rate": 0.01, "eps": 1e-6, "b2": 0.99}}),
    Case("objax_lars_default", {"objax:LARS": {"learning_rate": 1.0}}),
    Case(
        "objax_lars",
        {
            "objax:LARS": {
                "learning_rate": 1.0,
                "trust_coefficient": 0.02,
                "weight_decay": 1e-2,
                "momentum": 0.8,
                "eps": 1e-3,
            }
        },
    ),
    Case(
        "objax_lars_polynomial_lr",
        {
            "objax:LARS": {
                "learning_rate": {
                    "polynomial": {"init_value": 2.0, "end_value": 0.0, "power": 2, "transition_steps": 100}
                },
                "trust_coefficient": 0.01,
            }
        },
    ),
]

CASES: list[Case] = CANONICAL_OPTIMIZERS + CANONICAL_TRANSFORMS + SCHEDULE_CASES + FLUX_CASES + AXON_CASES + OBJAX_CASES

# --------------------------------------------------------------------------------------------
# random rules: predicted spread of the final parameters around the noise-free trajectory

NOISE_SHAPES = {"w": (40, 50)}


def _optax_noise_std(lr, eta, gamma):
    """optax add_noise before the LR: p gets −lr·√(eta/t^γ)·n (A6)."""
    return lambda t: lr * math.sqrt(eta / t**gamma)


def _axon_noise_std(eta, gamma, scale=1.0):
    """Axon/Polaris: std eta/t^γ, added after the LR (A6, P2)."""
    return lambda t: scale * eta / t**gamma


NOISE_CASES = [
    NoiseCase(
        "noisy_sgd",
        {"noisy_sgd": {"learning_rate": 0.1, "eta": 0.02, "gamma": 0.55, "key": 7}},
        {"sgd": {"learning_rate": 0.1}},
        _optax_noise_std(0.1, 0.02, 0.55),
    ),
    NoiseCase(
        "add_noise",
        {"chain": [{"add_noise": {"eta": 0.01, "gamma": 0.3, "key": 11}}, {"scale": {"step_size": -0.05}}]},
        {"scale": {"step_size": -0.05}},
        _optax_noise_std(0.05, 0.01, 0.3),
    ),
    NoiseCase(
        "axon_noisy_sgd",
        {"axon:noisy_sgd": {"learning_rate": 0.1, "key": 5}},
        {"axon:sgd": {"learning_rate": 0.1}},
        _axon_noise_std(0.01, 0.55),
    ),
    NoiseCase(
        "polaris_add_noise",
        {"chain": [{"polaris:add_noise": {"eta": 0.05, "gamma": 0.4, "key": 3}}, {"scale": {"step_size": -0.1}}]},
        {"scale": {"step_size": -0.1}},
        _axon_noise_std(0.05, 0.4, scale=0.1),
    ),
]

# --------------------------------------------------------------------------------------------
# parameter EMA (objax ExponentialMovingAverage, J5).  The server's settings are
# ``ema=<decay μ>`` and ``ema_debias=<bool>``; eps is objax's fixed 1e-6.

EMA_CASES = [
    EmaCase("ema_no_debias", {"adam": {"learning_rate": 0.01}}, {"ema": 0.9}),
    EmaCase("ema_debias", {"sgd": {"learning_rate": 0.05, "momentum": 0.5}}, {"ema": 0.95, "ema_debias": True}),
]
