"""Presets and canonical rules vs the optax expressions of docs/optimizer-catalogue.md, and the
custom transforms vs NumPy float64 transcriptions of the libraries' code."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optserve.server.spec import SpecError, compile_spec, registry
from tests.test_spec_compiler import PATHS, assert_close, grad_stream, make_params, run_compiled, run_optax

# ---------------------------------------------------------------- canonical rules vs optax

K = 3  # PRNG seed for noise rules
CANONICAL = [
    ({"noisy_sgd": {"learning_rate": 0.1, "key": K}}, optax.noisy_sgd(0.1, key=K)),
    (
        {"adam": {"learning_rate": 0.01, "nesterov": True, "eps_root": 1e-8}},
        optax.adam(0.01, eps_root=1e-8, nesterov=True),
    ),
    ({"nadam": {"learning_rate": 0.01}}, optax.nadam(0.01)),
    ({"radam": {"learning_rate": 0.01}}, optax.radam(0.01)),
    ({"adamax": {"learning_rate": 0.01}}, optax.adamax(0.01)),
    ({"amsgrad": {"learning_rate": 0.01, "bias_correction_mu": False}}, optax.amsgrad(0.01, bias_correction_mu=False)),
    ({"adagrad": {"learning_rate": 0.1}}, optax.adagrad(0.1)),
    ({"adadelta": {}}, optax.adadelta(1.0)),
    (
        {
            "rmsprop": {
                "learning_rate": 0.01,
                "centered": True,
                "momentum": 0.9,
                "nesterov": True,
                "eps_in_sqrt": False,
                "initial_scale": 0.1,
            }
        },
        optax.rmsprop(0.01, centered=True, momentum=0.9, nesterov=True, eps_in_sqrt=False, initial_scale=0.1),
    ),
    ({"adabelief": {"learning_rate": 0.01}}, optax.adabelief(0.01)),
    ({"lamb": {"learning_rate": 0.01, "weight_decay": 0.1}}, optax.lamb(0.01, weight_decay=0.1)),
    ({"lars": {"learning_rate": 0.1, "weight_decay": 0.01}}, optax.lars(0.1, weight_decay=0.01)),
    ({"yogi": {"learning_rate": 0.01}}, optax.yogi(0.01)),
    (
        {
            "chain": [
                {"centralize": {}},
                {"clip": {"max_delta": 0.1}},
                {"scale_by_rss": {}},
                {"trace": {"decay": 0.5, "nesterov": True}},
                {"scale_by_learning_rate": {"learning_rate": 0.1}},
            ]
        },
        optax.chain(
            optax.centralize(),
            optax.clip(0.1),
            optax.scale_by_rss(),
            optax.trace(0.5, nesterov=True),
            optax.scale_by_learning_rate(0.1),
        ),
    ),
    (
        {
            "chain": [
                {"scale_by_belief": {}},
                {"scale_by_stddev": {}},
                {"scale_by_trust_ratio": {"min_norm": 0.1}},
                {"scale": {"step_size": -0.01}},
            ]
        },
        optax.chain(
            optax.scale_by_belief(),
            optax.scale_by_stddev(),
            optax.scale_by_trust_ratio(min_norm=0.1),
            optax.scale(-0.01),
        ),
    ),
    (
        {
            "chain": [
                {"scale_by_yogi": {}},
                {"scale_by_amsgrad": {}},
                {"scale_by_adamax": {}},
                {"scale_by_radam": {}},
                {"scale_by_rms": {"bias_correction": True}},
                {"add_decayed_weights": {"weight_decay": 0.1}},
                {"add_noise": {"eta": 0.01, "gamma": 0.55, "key": K}},
                {
                    "scale_by_schedule": {
                        "step_size_fn": {"cosine_decay_schedule": {"init_value": -0.1, "decay_steps": 20}}
                    }
                },
            ]
        },
        optax.chain(
            optax.scale_by_yogi(),
            optax.scale_by_amsgrad(),
            optax.scale_by_adamax(),
            optax.scale_by_radam(),
            optax.scale_by_rms(bias_correction=True),
            optax.add_decayed_weights(0.1),
            optax.add_noise(0.01, 0.55, K),
            optax.scale_by_schedule(optax.cosine_decay_schedule(-0.1, 20)),
        ),
    ),
]


@pytest.mark.parametrize("spec,tx", CANONICAL, ids=[next(iter(s)) + str(i) for i, (s, _) in enumerate(CANONICAL)])
def test_canonical_rule_matches_optax(spec, tx):
    assert_close(run_compiled(spec), run_optax(tx))


SCHEDULES = [
    (
        {"polynomial_schedule": {"init_value": 0.1, "end_value": 0.01, "power": 2, "transition_steps": 20}},
        optax.polynomial_schedule(0.1, 0.01, 2, 20),
    ),
    (
        {"linear": {"init_value": 0.1, "end_value": 0.0, "transition_steps": 20, "transition_begin": 3}},
        optax.linear_schedule(0.1, 0.0, 20, 3),
    ),
    (
        {"warmup_cosine_decay": {"init_value": 0.0, "peak_value": 0.1, "warmup_steps": 5, "decay_steps": 25}},
        optax.warmup_cosine_decay_schedule(0.0, 0.1, 5, 25),
    ),
    (
        {"piecewise_constant": {"init_value": 0.1, "boundaries_and_scales": {"5": 0.5, "10": 0.1}}},
        optax.piecewise_constant_schedule(0.1, {5: 0.5, 10: 0.1}),
    ),
    (
        {
            "join": {
                "schedules": [
                    0.1,
                    {"exponential_decay": {"init_value": 0.1, "transition_steps": 3, "decay_rate": 0.5}},
                ],
                "boundaries": [7],
            }
        },
        optax.join_schedules([optax.constant_schedule(0.1), optax.exponential_decay(0.1, 3, 0.5)], [7]),
    ),
    (
        {"inverse_time_decay": {"init_value": 0.1, "decay_rate": 0.5, "count_offset": 1}},
        lambda c: 0.1 / (1 + 0.5 * (c + 1)),
    ),
]


@pytest.mark.parametrize("schedule,fn", SCHEDULES, ids=[next(iter(s)) for s, _ in SCHEDULES])
def test_schedules(schedule, fn):
    assert_close(run_compiled({"sgd": {"learning_rate": schedule}}), run_optax(optax.sgd(fn)))


def test_canonical_defaults_are_optax_defaults():
    for rule in registry.all_rules():
        if rule.library != "optax" or rule.kind not in ("optimizer", "transform"):
            continue
        fn = getattr(optax, rule.name, None)
        if fn is None:
            continue
        params = inspect.signature(fn).parameters
        for hp in rule.hyperparams:
            if hp.name in params and params[hp.name].default is not inspect.Parameter.empty and not hp.required:
                if rule.name == "adadelta" and hp.name == "learning_rate":
                    continue  # 1.0 instead of None on purpose (docs/optimizer-catalogue.md §4.9)
                assert params[hp.name].default == hp.default, (rule.name, hp.name)


def test_adadelta_descends():
    c = compile_spec({"adadelta": {}}, ["w"])
    p = {"w": jnp.ones(3)}
    u, _ = c.update(p, c.init(p), p)
    assert (np.asarray(u["w"]) < 0).all()


# ---------------------------------------------------------------- presets vs optax expressions


def sched_plus_one(s):
    return lambda c: s(c + 1)


PRESETS = [
    ("flux:Descent", optax.sgd(0.1)),
    ({"flux:Momentum": {"learning_rate": 0.02, "momentum": 0.8}}, optax.sgd(0.02, momentum=0.8)),
    ("flux:Nesterov", optax.sgd(0.001, momentum=0.9, nesterov=True)),
    ("flux:RMSProp", optax.rmsprop(0.001, decay=0.9, eps=1e-8, eps_in_sqrt=False)),
    ("flux:ADAM", optax.adam(0.001, eps=1e-8)),
    ("flux:RADAM", optax.radam(0.001, threshold=4.0)),
    ({"flux:NADAM": {"b2": 0.99}}, optax.nadam(0.001 / np.sqrt(0.99), b2=0.99, eps=1e-8 / np.sqrt(0.99))),
    ("flux:ADADelta", optax.adadelta(1.0, rho=0.9, eps=1e-8)),
    (
        {"flux:ADAMW": {"weight_decay": 0.1}},
        optax.chain(
            optax.scale_by_adam(eps=1e-8), optax.scale_by_learning_rate(0.001), optax.add_decayed_weights(-0.1)
        ),
    ),
    ({"flux:ClipValue": {"max_delta": 0.01}}, optax.chain(optax.clip(0.01), optax.scale(-1.0))),
    (
        {
            "flux:Optimiser": [
                {"flux:ExpDecay": {"learning_rate": 0.5, "transition_steps": 4, "end_value": 1e-3}},
                {"flux:Momentum": {}},
            ]
        },
        optax.chain(
            optax.scale_by_schedule(
                sched_plus_one(optax.exponential_decay(0.5, 4, 0.1, staircase=True, end_value=1e-3))
            ),
            optax.scale_by_learning_rate(0.01),
            optax.trace(0.9),
        ),
    ),
    (
        {
            "flux:Optimiser": [
                {"flux:InvDecay": {"gamma": 0.1}},
                {"flux:WeightDecay": {"weight_decay": 0.01}},
                "flux:Nesterov",
            ]
        },
        optax.chain(
            optax.scale_by_schedule(lambda c: 1 / (1 + 0.1 * (c + 1))),
            optax.add_decayed_weights(0.01),
            optax.scale_by_learning_rate(0.001),
            optax.trace(0.9, nesterov=True),
        ),
    ),
    ("axon:adam", optax.adam(1e-3, eps_root=1e-15)),
    ({"polaris:ADAMW": {"weight_decay": 0.1}}, optax.adamw(1e-3, eps_root=1e-15, weight_decay=0.1)),
    ("axon:adagrad", optax.adagrad(1e-3, initial_accumulator_value=0.1, eps=1e-7)),
    ("axon:adabelief", optax.adabelief(1e-3, eps=0.0, eps_root=1e-16)),
    ({"axon:adabelief": {"compat": True}}, optax.adam(1e-3, eps=0.0, eps_root=1e-16)),
    ("axon:lamb", optax.lamb(1e-2, eps=1e-8, eps_root=1e-15)),
    (
        {"axon:lamb": {"min_norm": 0.5, "weight_decay": 0.1}},
        optax.chain(
            optax.scale_by_adam(eps=1e-8, eps_root=1e-15),
            optax.add_decayed_weights(0.1),
            optax.scale_by_trust_ratio(min_norm=0.5),
            optax.scale_by_learning_rate(1e-2),
        ),
    ),
    (
        {"axon:noisy_sgd": {"key": K}},
        optax.chain(optax.scale_by_learning_rate(1e-2), optax.add_noise(0.01**2, 2 * 0.55, K)),
    ),
    ("axon:radam", optax.radam(1e-3)),
    ({"axon:rmsprop": {"momentum": 0.9, "centered": True}}, optax.rmsprop(1e-2, momentum=0.9, centered=True)),
    ({"axon:sgd": {"momentum": 0.9}}, optax.sgd(1e-2, momentum=0.9)),
    ("axon:yogi", optax.yogi(1e-2, eps=1e-3)),
    (
        {
            "polaris:compose": [
                {"polaris:clip": {}},
                "polaris:scale_by_rss",
                "polaris:scale_by_stddev",
                "polaris:trace",
                {"polaris:add_noise": {"key": K}},
                {"polaris:scale": {"step_size": -0.1}},
            ]
        },
        optax.chain(
            optax.clip(2.0),
            optax.scale_by_rss(0.1, 1e-7),
            optax.scale_by_stddev(),
            optax.trace(0.9),
            optax.add_noise(1e-4, 1.1, K),
            optax.scale(-0.1),
        ),
    ),
    ({"objax:SGD": {"learning_rate": 0.1}}, optax.sgd(0.1)),
    ({"objax:momentum": {"learning_rate": 0.1, "nesterov": True}}, optax.sgd(0.1, momentum=0.9, nesterov=True)),
    (
        {"objax:LARS": {"learning_rate": 0.1, "weight_decay": 0.0, "eps": 0.0}},
        optax.lars(0.1, trust_coefficient=1e-3, momentum=0.9),
    ),
]


@pytest.mark.parametrize("spec,tx", PRESETS, ids=[str(s)[:50] for s, _ in PRESETS])
def test_preset_matches_optax_expression(spec, tx):
    assert_close(run_compiled(spec), run_optax(tx), rtol=2e-6, atol=2e-7)


# ---------------------------------------------------------------- custom transforms vs NumPy transcriptions


def numpy_run(step_fn, steps=30):
    """Runs a float64 NumPy rule `step_fn(t, g, p, state) -> (u, state)` per leaf."""
    params = {k: np.asarray(v, np.float64) for k, v in make_params().items()}
    states = dict.fromkeys(params)
    for t, grads in enumerate(grad_stream(steps), start=1):
        for k in params:
            u, states[k] = step_fn(t, np.asarray(grads[k], np.float64), params[k], states[k])
            params[k] = params[k] + u
    return params


def flux_adagrad(t, g, p, s, eta=0.1, eps=1e-8):
    a = (np.full_like(g, eps) if s is None else s) + g * g
    return -eta * g / (np.sqrt(a) + eps), a


def flux_adamax(t, g, p, s, eta=0.001, b1=0.9, b2=0.999, eps=1e-8):
    m, w = s if s is not None else (np.zeros_like(g), np.zeros_like(g))
    m = b1 * m + (1 - b1) * g
    w = np.maximum(b2 * w, np.abs(g))
    return -(eta / (1 - b1**t)) * m / (w + eps), (m, w)


def flux_amsgrad(t, g, p, s, eta=0.001, b1=0.9, b2=0.999, eps=1e-8):
    m, v, vh = s if s is not None else (np.full_like(g, eps),) * 3
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    vh = np.maximum(vh, v)
    return -eta * m / (np.sqrt(vh) + eps), (m, v, vh)


def flux_clipnorm_descent(t, g, p, s, thresh=0.05, eta=0.1):
    n = np.linalg.norm(g)
    d = g * (thresh / n) if n > thresh else g
    return -eta * d, None


def objax_adam(t, g, p, s, lr=0.01, b1=0.9, b2=0.999, eps=1e-8):
    m, v = s if s is not None else (np.zeros_like(g), np.zeros_like(g))
    lr_t = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
    m = m + (1 - b1) * (g - m)
    v = v + (1 - b2) * (g * g - v)
    return -lr_t * m / np.sqrt(v + eps), (m, v)


def objax_lars(t, g, p, s, lr=0.1, mu=0.9, wd=1e-4, tc=1e-3, eps=1e-5):
    m = np.zeros_like(g) if s is None else s
    pn, gn = np.linalg.norm(p), np.linalg.norm(g)
    k = max(float(pn == 0 or gn == 0), tc * pn / (gn + wd * pn + eps))
    m = mu * m + lr * k * (g + wd * p)
    return -m, m


def axon_radam(t, g, p, s, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, threshold=5.0):
    m, v = s if s is not None else (np.zeros_like(g), np.zeros_like(g))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    rho_inf = 2 / (1 - b1) - 1  # [sic]
    rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
    mh, vh = m / (1 - b1**t), v / (1 - b2**t)
    if rho >= threshold:
        r = np.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        return -lr * r * mh / (np.sqrt(vh) + eps), (m, v)
    return -lr * mh, (m, v)


TRANSCRIBED = [
    ("flux:ADAGrad", flux_adagrad),
    ("flux:AdaMax", flux_adamax),
    ("flux:AMSGrad", flux_amsgrad),
    ({"flux:Optimiser": [{"flux:ClipNorm": {"max_norm": 0.05}}, "flux:Descent"]}, flux_clipnorm_descent),
    ({"objax:Adam": {"learning_rate": 0.01}}, objax_adam),
    ({"objax:LARS": {"learning_rate": 0.1}}, objax_lars),
    ({"axon:radam": {"compat": True}}, axon_radam),
    (
        {"polaris:compose": [{"polaris:scale_by_radam": {"compat": True}}, {"polaris:scale": {"step_size": -1e-3}}]},
        axon_radam,
    ),
]


@pytest.mark.parametrize("spec,reference", TRANSCRIBED, ids=[str(s)[:40] for s, _ in TRANSCRIBED])
def test_custom_transform_matches_library_transcription(spec, reference):
    assert_close(run_compiled(spec), numpy_run(reference), rtol=1e-5, atol=1e-6)


def test_axon_radam_bug_differs_from_intended():
    assert not np.allclose(
        np.asarray(run_compiled({"axon:radam": {"compat": True}})["enc/kernel"]),
        np.asarray(run_compiled("axon:radam")["enc/kernel"]),
        rtol=1e-4,
    )


def test_flux_optimiser_learning_rates_multiply():
    """Optimiser(ExpDecay(), Descent()) starts at an effective 1e-3·0.1."""
    c = compile_spec({"flux:Optimiser": ["flux:ExpDecay", "flux:Descent"]}, ["w"])
    p = {"w": jnp.ones(2)}
    u, _ = c.update(p, c.init(p), p)
    np.testing.assert_allclose(np.asarray(u["w"]), -1e-4, rtol=1e-6)


# ---------------------------------------------------------------- preset errors


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            {"flux:ADAM": {"eps": 1e-8}},
            'flux:ADAM.eps: flux:ADAM has no hyperparameter "eps"; Flux\'s ε is the constant',
        ),
        (
            {"flux:Momentum": {"nesterov": True}},
            'flux:Momentum.nesterov: flux:Momentum has no hyperparameter "nesterov"',
        ),
        (
            {"objax:Adam": {"learning_rate": 1e-3, "eps_root": 0}},
            "objax:Adam.eps_root: objax:Adam has no hyperparameter",
        ),
        ({"objax:Adam": {}}, "objax:Adam.learning_rate: required hyperparameter is missing"),
        ({"axon:noisy_sgd": {}}, "axon:noisy_sgd.key: required hyperparameter is missing"),
        ({"axon:adam": {"compat": True}}, 'axon:adam.compat: axon:adam has no hyperparameter "compat"'),
        ({"flux:Optimiser": [{"adam": {"learning_rate": 1}}]}, 'flux:Optimiser[0].adam: "adam" is not a Flux rule'),
        (
            {"flux:Optimiser": [{"flux:adamm": {}}]},
            'flux:Optimiser[0].flux:adamm: unknown rule "flux:adamm"; did you mean',
        ),
        ("flux:Adamm", 'flux:Adamm: unknown rule "flux:Adamm"; did you mean "flux:ADAM"'),
        ({"axon:adamw": {"mask": "**"}}, "axon:adamw.mask: axon:adamw takes no mask"),
    ],
)
def test_preset_errors(spec, message):
    with pytest.raises(SpecError) as info:
        compile_spec(spec, PATHS)
    assert str(info.value).startswith(message), str(info.value)


def test_preset_names_are_case_insensitive_and_canonical():
    for name in ["flux:ADAM", "FLUX:adam", "Flux:Adam"]:
        assert compile_spec(name, PATHS).spec == {"flux:adam": {}}
    assert compile_spec({"OBJAX:sgd": {"learning_rate": 1}}, PATHS).spec == {"objax:sgd": {"learning_rate": 1.0}}


def test_tunable_preset_learning_rate():
    spec = {"flux:ADAM": {"learning_rate": 0.01, "tunable": ["learning_rate"]}}
    c = compile_spec(spec, PATHS)
    params = make_params()
    state = c.init(params)
    state = c.set_hyperparams(state, {"learning_rate": 0.0})
    updates, _ = c.update(params, state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
