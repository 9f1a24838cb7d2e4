"""The spec compiler against in-process optax, and its error messages."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optserve.server.spec import SpecError, compile_spec, list_rules

SHAPES = {"enc/kernel": (3, 4), "enc/bias": (4,), "scale": (), "conv/kernel": (2, 1, 2, 3)}
PATHS = list(SHAPES)


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def grad_stream(steps, seed=1):
    """Random gradients spanning magnitudes 1e-4 .. 1."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        yield {
            k: jnp.asarray(rng.normal(size=s) * 10.0 ** rng.uniform(-4, 0, size=s), jnp.float32)
            for k, s in SHAPES.items()
        }


def run(update_init, steps=30, seed=1, on_step=None):
    """Runs init/update (jitted) for `steps`; returns the final params."""
    init, update = update_init
    params = make_params()
    state = init(params)
    step = jax.jit(update)
    for i, g in enumerate(grad_stream(steps, seed)):
        if on_step is not None:
            state = on_step(i, state)
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def run_compiled(spec, **kw):
    c = compile_spec(spec, PATHS)
    return run((c.init, c.update), **kw)


def run_optax(tx, **kw):
    return run((tx.init, tx.update), **kw)


def assert_close(a, b, rtol=1e-6, atol=1e-7):
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=rtol, atol=atol, err_msg=k)


EXP = {"exponential_decay": {"init_value": 0.1, "transition_steps": 5, "decay_rate": 0.5}}

CASES = [
    ({"sgd": {"learning_rate": 0.1}}, optax.sgd(0.1)),
    ({"sgd": {"learning_rate": 0.1, "momentum": 0.9}}, optax.sgd(0.1, momentum=0.9)),
    ({"sgd": {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True}}, optax.sgd(0.1, momentum=0.9, nesterov=True)),
    ({"adam": {"learning_rate": 1e-2}}, optax.adam(1e-2)),
    (
        {"adam": {"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "eps_root": 1e-9}},
        optax.adam(1e-2, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-9),
    ),
    ({"adamw": {"learning_rate": 1e-2, "weight_decay": 0.1}}, optax.adamw(1e-2, weight_decay=0.1)),
    (
        {"chain": [{"clip_by_global_norm": {"max_norm": 0.5}}, {"adam": {"learning_rate": 1e-2}}]},
        optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2)),
    ),
    ({"adam": {"learning_rate": EXP}}, optax.adam(optax.exponential_decay(0.1, 5, 0.5))),
    (
        {"sgd": {"learning_rate": {"constant_schedule": {"value": 0.05}}, "momentum": 0.5}},
        optax.sgd(optax.constant_schedule(0.05), momentum=0.5),
    ),
    (
        {
            "adam": {
                "learning_rate": {
                    "exponential_decay": {
                        **EXP["exponential_decay"],
                        "staircase": True,
                        "end_value": 0.02,
                        "count_offset": 1,
                    }
                }
            }
        },
        optax.adam(lambda c: optax.exponential_decay(0.1, 5, 0.5, staircase=True, end_value=0.02)(c + 1)),
    ),
]


@pytest.mark.parametrize("spec,tx", CASES, ids=[json.dumps(c[0])[:60] for c in CASES])
def test_matches_optax(spec, tx):
    assert_close(run_compiled(spec), run_optax(tx))


def test_schedule_on_a_non_lr_hyperparameter_matches_inject_hyperparams():
    b1 = {"linear_schedule": {"init_value": 0.5, "end_value": 0.9, "transition_steps": 10}}
    spec = {"adam": {"learning_rate": 1e-2, "b1": b1}}
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b1=optax.linear_schedule(0.5, 0.9, 10))
    assert_close(run_compiled(spec), run_optax(tx))


def test_canonical_spec_is_normalized_and_json():
    c = compile_spec({"chain": [{"clip_by_global_norm": {"max_norm": 1}}, {"adamw": {"learning_rate": EXP}}]}, PATHS)
    assert json.loads(json.dumps(c.spec)) == c.spec
    assert c.spec == {"chain": [{"clip_by_global_norm": {"max_norm": 1.0}}, {"adamw": {"learning_rate": EXP}}]}
    # The canonical spec compiles to the same thing.
    assert compile_spec(c.spec, PATHS).spec == c.spec


def test_bare_string_rule():
    assert compile_spec("identity", PATHS).spec == {"identity": {}}
    assert compile_spec({"Identity": None}, PATHS).spec == {"identity": {}}


ERRORS = [
    (
        {"chain": [{"clip_by_global_norm": {"max_norm": 1.0}}, {"adamw": {"learning_rate": 1e-3, "b1": "x"}}]},
        'chain[1].adamw.b1: expected a number, got "x"',
    ),
    ({"adam": {"learning_rate": 1e-3, "b1": 1.0}}, "adam.b1: must be in [0, 1), got 1.0"),
    ({"adam": {"learning_rate": -1e-3}}, "adam.learning_rate: must be >= 0, got -0.001"),
    ({"adam": {}}, "adam.learning_rate: required hyperparameter is missing"),
    ({"adam": {"learning_rate": True}}, "adam.learning_rate: expected a number, got true"),
    ({"adam": {"learning_rate": float("nan")}}, "adam.learning_rate: expected a finite number, got NaN"),
    ({"sgd": {"learning_rate": 0.1, "nesterov": 1}}, "sgd.nesterov: expected true or false, got 1"),
    ({"adam": {"learning_rate": 1e-3, "mu_dtype": "int8"}}, "adam.mu_dtype: expected one of"),
    ("adma", 'adma: unknown rule "adma"; did you mean'),
    ({"chain": [{"sgdd": {"learning_rate": 1}}]}, 'chain[0].sgdd: unknown rule "sgdd"; did you mean "sgd"'),
    ({"adam": {"learning_rate": 1e-3, "beta1": 0.9}}, 'adam.beta1: unknown hyperparameter "beta1"'),
    (
        {"adam": {"learning_rate": {"exponential_decay": {"init_value": 1e-3, "transition_steps": 10}}}},
        "adam.learning_rate.exponential_decay.decay_rate: required argument is missing",
    ),
    (
        {"adam": {"learning_rate": {"expo_decay": {}}}},
        'adam.learning_rate.expo_decay: unknown schedule "expo_decay"; did you mean "exponential_decay"',
    ),
    (
        {
            "adam": {
                "learning_rate": {"exponential_decay": {"init_value": 1e-3, "transition_steps": 0, "decay_rate": 0.5}}
            }
        },
        "adam.learning_rate.exponential_decay.transition_steps: must be >= 1, got 0",
    ),
    ({"adam": {"learning_rate": {"adam": {}}}}, 'adam.learning_rate.adam: "adam" is a optimizer, not a schedule'),
    ({"chain": {"adam": {}}}, "chain: expected a list of rules"),
    ({"adam": {"learning_rate": 1}, "sgd": {}}, "spec: expected exactly one rule name as key, got 2"),
    (42, "spec: expected a rule name or an object"),
    ({"adam": [1]}, "adam: expected an object of hyperparameters, got [1]"),
    (
        {"adagrad": {"learning_rate": 0.1, "initial_accumulator_value": {"constant_schedule": {"value": 1}}}},
        "adagrad.initial_accumulator_value: expected a number (this hyperparameter cannot be a schedule)",
    ),
    ({"trace": {"decay": 0.9, "nesterov": "yes"}}, 'trace.nesterov: expected true or false, got "yes"'),
]


@pytest.mark.parametrize("spec,message", ERRORS, ids=[m[:50] for _, m in ERRORS])
def test_errors_name_the_field(spec, message):
    with pytest.raises(SpecError) as info:
        compile_spec(spec, PATHS)
    assert str(info.value).startswith(message), str(info.value)
    assert str(info.value) == f"{info.value.field}: {info.value.message}"


def test_list_rules_is_json_and_complete():
    rules = list_rules()
    json.dumps(rules)
    names = {r["name"] for r in rules}
    assert {"sgd", "adam", "adamw", "chain", "clip_by_global_norm", "exponential_decay", "constant_schedule"} <= names
    adam = next(r for r in rules if r["name"] == "adam")
    assert adam["kind"] == "optimizer" and adam["library"] == "optax"
    hp = {h["name"]: h for h in adam["hyperparams"]}
    assert hp["learning_rate"]["required"] and hp["b1"]["default"] == 0.9
    for r in rules:
        assert set(r) >= {"name", "kind", "library", "doc", "hyperparams"}
        for h in r["hyperparams"]:
            assert set(h) >= {"name", "default", "required", "doc"}


def _set_at(step, setter):
    def on_step(i, state):
        return setter(state) if i == step else state

    return on_step


@pytest.mark.parametrize(
    "name,factory,kwargs,new",
    [
        ("learning_rate", optax.adam, {"learning_rate": 1e-2}, 3e-3),
        ("momentum", optax.sgd, {"learning_rate": 0.05, "momentum": 0.9}, 0.5),
        ("b2", optax.adamw, {"learning_rate": 1e-2, "weight_decay": 0.1}, 0.9),
    ],
)
def test_set_hyperparams_matches_inject_hyperparams(name, factory, kwargs, new):
    spec = {factory.__name__: {**kwargs, "tunable": [name]}}
    c = compile_spec(spec, PATHS)
    ours = run((c.init, c.update), on_step=_set_at(10, lambda s: c.set_hyperparams(s, {name: new})))
    tx = optax.inject_hyperparams(factory)(**kwargs)

    def set_optax(state):
        hp = dict(state.hyperparams)
        hp[name] = jnp.asarray(new, hp[name].dtype)
        return state._replace(hyperparams=hp)

    theirs = run((tx.init, tx.update), on_step=_set_at(10, set_optax))
    assert_close(ours, theirs)
    # ... and it did change the trajectory.
    unchanged = run((c.init, c.update))
    assert not np.allclose(np.asarray(unchanged["enc/kernel"]), np.asarray(ours["enc/kernel"]))


def test_hyperparams_are_state_and_named():
    spec = {
        "chain": [
            {"adam": {"learning_rate": 1e-3, "tunable": ["learning_rate", "b1"]}},
            {"scale": {"step_size": 2.0, "tunable": ["step_size"]}},
            {"add_decayed_weights": {"weight_decay": 0.1, "tunable": ["weight_decay"]}},
            {"sgd": {"learning_rate": 0.5, "tunable": ["learning_rate"]}},
        ]
    }
    c = compile_spec(spec, PATHS)
    state = c.init(make_params())
    assert c.hyperparams(state) == pytest.approx(
        {
            "chain[0].adam.learning_rate": 1e-3,
            "b1": 0.9,
            "step_size": 2.0,
            "weight_decay": 0.1,
            "chain[3].sgd.learning_rate": 0.5,
        }
    )
    state2 = c.set_hyperparams(state, {"chain[3].sgd.learning_rate": 0.25, "b1": 0.5})
    assert c.hyperparams(state2)["chain[3].sgd.learning_rate"] == 0.25
    assert c.hyperparams(state)["chain[3].sgd.learning_rate"] == 0.5  # not mutated
    # A tunable at a field path also answers to that path when its name is unique.
    assert c.hyperparams(c.set_hyperparams(state, {"chain[1].scale.step_size": 3.0}))["step_size"] == 3.0
    with pytest.raises(SpecError, match=r"^learning_rate: not a tunable hyperparameter"):
        c.set_hyperparams(state, {"learning_rate": 0.1})
    with pytest.raises(SpecError, match=r"^b1: must be in \[0, 1\), got 1.5"):
        c.set_hyperparams(state, {"b1": 1.5})
    with pytest.raises(SpecError, match=r'^b1: expected a number, got "x"'):
        c.set_hyperparams(state, {"b1": "x"})


def test_scheduled_hyperparams_are_reported_not_settable():
    b1 = {"linear_schedule": {"init_value": 0.5, "end_value": 0.9, "transition_steps": 10}}
    c = compile_spec({"adam": {"learning_rate": 1e-2, "b1": b1}}, PATHS)
    params = make_params()
    state = c.init(params)
    assert c.hyperparams(state) == pytest.approx({"b1": 0.5})
    for _ in range(5):
        _, state = c.update(params, state, params)
    assert c.hyperparams(state) == pytest.approx({"b1": 0.5 + 0.4 * 4 / 10})
    with pytest.raises(SpecError, match=r"^b1: follows a schedule"):
        c.set_hyperparams(state, {"b1": 0.1})


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"adam": {"learning_rate": 1e-3, "tunable": ["bb1"]}}, 'adam.tunable[0]: unknown hyperparameter "bb1"'),
        ({"adam": {"learning_rate": 1e-3, "tunable": ["nesterov"]}}, 'adam.tunable[0]: "nesterov" cannot be tunable'),
        (
            {"sgd": {"learning_rate": 1e-3, "tunable": ["momentum"]}},
            'sgd.tunable[0]: "momentum" must be given a number to be tunable',
        ),
        (
            {"adam": {"learning_rate": EXP, "tunable": ["learning_rate"]}},
            'adam.tunable[0]: "learning_rate" is a schedule',
        ),
        ({"adam": {"learning_rate": 1e-3, "tunable": 3}}, "adam.tunable: expected a list of hyperparameter names"),
    ],
)
def test_tunable_errors(spec, message):
    with pytest.raises(SpecError) as info:
        compile_spec(spec, PATHS)
    assert str(info.value).startswith(message), str(info.value)


def test_hyperparameter_alias_is_canonicalized():
    c = compile_spec({"scale_by_schedule": {"schedule": {"constant_schedule": {"value": 0.5}}}}, PATHS)
    assert c.spec == {"scale_by_schedule": {"step_size_fn": {"constant_schedule": {"value": 0.5}}}}
    with pytest.raises(SpecError, match=r'scale_by_schedule\.schedule: "schedule" and "step_size_fn" name the same'):
        compile_spec({"scale_by_schedule": {"step_size_fn": 1.0, "schedule": 1.0}}, PATHS)
