"""Self-tests of the float64 NumPy references (tests/reference) against optax, plus the gotchas
of docs/optimizer-catalogue.md §4 as explicit cases.

optax runs in float64 in a subprocess (``tests/reference/_optax_x64.py``), so jax_enable_x64
never leaks into other test modules; quick checks that do not need float64 run optax in-process
in float32.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.reference import ParamsEMA, SpecError, known_rules, reference_for
from tests.reference.cases import CASES, EMA_CASES, NOISE_CASES
from tests.reference.data import make_grads, make_params, max_rel_error
from tests.reference.optax_rules import ScaleByRAdam

ROOT = Path(__file__).resolve().parents[1]  # the subprocess runs `python -m tests.reference...` here

N_STEPS = 100
PARAMS_SEED, GRADS_SEED = 0, 1
# The first test's setup computes every optax trajectory in one subprocess (jit-compiling each rule):
# ~1 min on a quiet 2-core machine, 300 s seen with both cores busy, past pytest's default limit.
pytestmark = pytest.mark.timeout(1200)

# ----------------------------------------------------------------------------------------------
# Preset -> its documented optax equivalent (docs/optimizer-catalogue.md §1 "optax equivalent" column, §2),
# written as a canonical spec.  (id, preset spec, canonical spec, tolerance)

EQUIVALENTS = [
    ("flux_descent", "flux:Descent", {"sgd": {"learning_rate": 0.1}}, 1e-12),
    (
        "flux_momentum",
        {"flux:Momentum": {"learning_rate": 0.02, "momentum": 0.8}},
        {"sgd": {"learning_rate": 0.02, "momentum": 0.8}},
        1e-12,
    ),
    (
        "flux_momentum_schedule_lr_before_trace",
        {
            "flux:Momentum": {
                "learning_rate": {"exponential_decay": {"init_value": 0.02, "transition_steps": 5, "decay_rate": 0.7}}
            }
        },
        {
            "chain": [
                {
                    "scale_by_learning_rate": {
                        "learning_rate": {
                            "exponential_decay": {"init_value": 0.02, "transition_steps": 5, "decay_rate": 0.7}
                        }
                    }
                },
                {"trace": {"decay": 0.9}},
            ]
        },
        1e-6,
    ),
    (
        "flux_nesterov",
        {"flux:Nesterov": {"learning_rate": 0.01}},
        {"chain": [{"scale_by_learning_rate": {"learning_rate": 0.01}}, {"trace": {"decay": 0.9, "nesterov": True}}]},
        1e-12,
    ),
    (
        "flux_nesterov_sgd",
        {"flux:Nesterov": {"learning_rate": 0.01}},
        {"sgd": {"learning_rate": 0.01, "momentum": 0.9, "nesterov": True}},
        1e-12,
    ),
    (
        "flux_rmsprop",
        {"flux:RMSProp": {"learning_rate": 0.01, "decay": 0.95}},
        {"rmsprop": {"learning_rate": 0.01, "decay": 0.95, "eps": 1e-8, "eps_in_sqrt": False}},
        1e-12,
    ),
    (
        "flux_adam",
        {"flux:ADAM": {"learning_rate": 0.01, "b1": 0.8}},
        {"adam": {"learning_rate": 0.01, "b1": 0.8}},
        1e-12,
    ),
    (
        "flux_radam",
        {"flux:RADAM": {"learning_rate": 0.01}},
        {"radam": {"learning_rate": 0.01, "threshold": 4.0}},
        1e-10,
    ),
    (
        "flux_adamax_approx",
        {"flux:AdaMax": {"learning_rate": 0.01}},
        {"adamax": {"learning_rate": 0.01}},
        1e-7,
    ),  # §1 F7: 6e-10 apart, not exact
    (
        "flux_adagrad_approx",
        "flux:ADAGrad",
        {"adagrad": {"learning_rate": 0.1, "initial_accumulator_value": 1e-8, "eps": 0.0}},
        1e-5,
    ),
    (
        "flux_adadelta",
        {"flux:ADADelta": {"rho": 0.8}},
        {"adadelta": {"learning_rate": 1.0, "rho": 0.8, "eps": 1e-8}},
        1e-12,
    ),
    (
        "flux_nadam",
        {"flux:NADAM": {"learning_rate": 0.01, "b2": 0.9}},
        {"nadam": {"learning_rate": 0.01 / math.sqrt(0.9), "b2": 0.9, "eps": 1e-8 / math.sqrt(0.9)}},
        1e-12,
    ),
    (
        "flux_adamw",
        {"flux:ADAMW": {"learning_rate": 0.01, "weight_decay": 0.01}},
        {
            "chain": [
                {"scale_by_adam": {"eps": 1e-8}},
                {"scale_by_learning_rate": {"learning_rate": 0.01}},
                {"add_decayed_weights": {"weight_decay": -0.01}},
            ]
        },
        1e-12,
    ),
    (
        "flux_expdecay",
        {"flux:ExpDecay": {"learning_rate": 0.1, "decay_rate": 0.5, "transition_steps": 10, "end_value": 0.01}},
        {
            "chain": [
                {
                    "scale_by_schedule": {
                        "schedule": {
                            "exponential_decay": {
                                "init_value": 0.1,
                                "transition_steps": 10,
                                "decay_rate": 0.5,
                                "staircase": True,
                                "end_value": 0.01,
                                "count_offset": 1,
                            }
                        }
                    }
                },
                {"scale": {"step_size": -1.0}},
            ]
        },
        1e-6,
    ),
    (
        "flux_invdecay",
        {"flux:InvDecay": {"gamma": 0.05}},
        {
            "chain": [
                {
                    "scale_by_schedule": {
                        "schedule": {"inverse_time_decay": {"init_value": 1.0, "decay_rate": 0.05, "count_offset": 1}}
                    }
                },
                {"scale": {"step_size": -1.0}},
            ]
        },
        1e-6,
    ),
    (
        "flux_weightdecay",
        {"flux:WeightDecay": {"weight_decay": 0.01}},
        {"chain": [{"add_decayed_weights": {"weight_decay": 0.01}}, {"scale": {"step_size": -1.0}}]},
        1e-12,
    ),
    (
        "flux_clipvalue",
        {"flux:ClipValue": {"max_delta": 0.05}},
        {"chain": [{"clip": {"max_delta": 0.05}}, {"scale": {"step_size": -1.0}}]},
        1e-12,
    ),
    (
        "flux_clipnorm",
        {"flux:ClipNorm": {"max_norm": 0.1}},
        {"chain": [{"clip_by_leaf_norm": {"max_norm": 0.1}}, {"scale": {"step_size": -1.0}}]},
        1e-12,
    ),
    (
        "flux_optimiser_expdecay_momentum",
        {
            "flux:Optimiser": [
                {"flux:ExpDecay": {"learning_rate": 1.0, "decay_rate": 0.5, "transition_steps": 10, "end_value": 0.1}},
                {"flux:Momentum": {"learning_rate": 0.02}},
            ]
        },
        {
            "chain": [
                {
                    "scale_by_schedule": {
                        "schedule": {
                            "exponential_decay": {
                                "init_value": 1.0,
                                "transition_steps": 10,
                                "decay_rate": 0.5,
                                "staircase": True,
                                "end_value": 0.1,
                                "count_offset": 1,
                            }
                        }
                    }
                },
                {"scale": {"step_size": 0.02}},
                {"trace": {"decay": 0.9}},
                {"scale": {"step_size": -1.0}},
            ]
        },
        1e-6,
    ),
    ("axon_adam", {"axon:adam": {"learning_rate": 0.01}}, {"adam": {"learning_rate": 0.01, "eps_root": 1e-15}}, 1e-12),
    (
        "axon_adabelief",
        {"axon:adabelief": {"learning_rate": 0.01}},
        {"adabelief": {"learning_rate": 0.01, "eps": 0.0, "eps_root": 1e-16}},
        1e-12,
    ),
    (
        "axon_adabelief_compat",
        {"axon:adabelief": {"learning_rate": 0.01, "compat": True}},
        {"adam": {"learning_rate": 0.01, "eps": 0.0, "eps_root": 1e-16}},
        1e-12,
    ),
    (
        "axon_adagrad",
        {"axon:adagrad": {"learning_rate": 0.05}},
        {"adagrad": {"learning_rate": 0.05, "initial_accumulator_value": 0.1, "eps": 1e-7}},
        1e-12,
    ),
    (
        "axon_adamw",
        {"axon:adamw": {"learning_rate": 0.01, "weight_decay": 0.1}},
        {"adamw": {"learning_rate": 0.01, "eps_root": 1e-15, "weight_decay": 0.1}},
        1e-12,
    ),
    ("axon_lamb", "axon:lamb", {"lamb": {"learning_rate": 1e-2, "eps": 1e-8, "eps_root": 1e-15}}, 1e-12),
    (
        "axon_lamb_min_norm",
        {"axon:lamb": {"weight_decay": 0.01, "min_norm": 0.5}},
        {
            "chain": [
                {"scale_by_adam": {"eps": 1e-8, "eps_root": 1e-15}},
                {"add_decayed_weights": {"weight_decay": 0.01}},
                {"scale_by_trust_ratio": {"min_norm": 0.5}},
                {"scale_by_learning_rate": {"learning_rate": 1e-2}},
            ]
        },
        1e-12,
    ),
    ("axon_radam", {"axon:radam": {"learning_rate": 0.01}}, {"radam": {"learning_rate": 0.01}}, 1e-12),
    # Axon's buggy ρ∞ keeps RAdam in the un-rectified branch: bias-corrected momentum only
    (
        "axon_radam_compat",
        {"axon:radam": {"learning_rate": 0.01, "compat": True}},
        {"chain": [{"ema": {"decay": 0.9, "debias": True}}, {"scale_by_learning_rate": {"learning_rate": 0.01}}]},
        1e-12,
    ),
    ("axon_rmsprop", "axon:rmsprop", {"rmsprop": {"learning_rate": 1e-2}}, 1e-12),
    (
        "axon_sgd",
        {"axon:sgd": {"learning_rate": 0.02, "momentum": 0.9, "nesterov": True}},
        {"sgd": {"learning_rate": 0.02, "momentum": 0.9, "nesterov": True}},
        1e-12,
    ),
    ("axon_yogi", "axon:yogi", {"yogi": {"learning_rate": 1e-2}}, 1e-12),
    (
        "polaris_yogi",
        {"polaris:yogi": {"learning_rate": 0.05, "initial_accumulator_value": 0.0, "eps_root": 1e-8}},
        {
            "chain": [
                {"scale_by_yogi": {"initial_accumulator_value": 0.0, "eps_root": 1e-8}},
                {"scale_by_learning_rate": {"learning_rate": 0.05}},
            ]
        },
        1e-12,
    ),
    ("objax_sgd", {"objax:SGD": {"learning_rate": 0.05}}, {"sgd": {"learning_rate": 0.05}}, 1e-12),
    (
        "objax_momentum_nesterov",
        {"objax:Momentum": {"learning_rate": 0.01, "momentum": 0.8, "nesterov": True}},
        {"sgd": {"learning_rate": 0.01, "momentum": 0.8, "nesterov": True}},
        1e-12,
    ),
    (
        "objax_adam_eps0",
        {"objax:Adam": {"learning_rate": 0.01, "eps": 0.0}},
        {"adam": {"learning_rate": 0.01, "eps": 0.0}},
        1e-12,
    ),
    (
        "objax_lars_no_wd_eps",
        {"objax:LARS": {"learning_rate": 1.0, "weight_decay": 0.0, "eps": 0.0, "trust_coefficient": 0.02}},
        {"lars": {"learning_rate": 1.0, "trust_coefficient": 0.02}},
        1e-12,
    ),
]

# Gotchas (§4): the preset must be *far* from the naive optax call.  (id, preset, naive, min)
DIFFERENCES = [
    (
        "flux_momentum_schedule_vs_sgd",  # §4.3: 44% in docs/optimizer-catalogue.md
        {
            "flux:Momentum": {
                "learning_rate": {"exponential_decay": {"init_value": 0.02, "transition_steps": 5, "decay_rate": 0.7}}
            }
        },
        {
            "sgd": {
                "learning_rate": {"exponential_decay": {"init_value": 0.02, "transition_steps": 5, "decay_rate": 0.7}},
                "momentum": 0.9,
            }
        },
        1e-3,
    ),
    (
        "flux_rmsprop_eps_in_sqrt",  # §4.2
        {"flux:RMSProp": {"learning_rate": 0.01}},
        {"rmsprop": {"learning_rate": 0.01}},
        1e-6,
    ),
    (
        "flux_radam_threshold_5",  # §4.14
        {"flux:RADAM": {"learning_rate": 0.01}},
        {"radam": {"learning_rate": 0.01}},
        1e-4,
    ),
    (
        "flux_adagrad_defaults",  # §4.12: 96% early
        "flux:ADAGrad",
        {"adagrad": {"learning_rate": 0.1}},
        1e-2,
    ),
    (
        "flux_amsgrad_bias_corrected",  # §4.12: 85%
        {"flux:AMSGrad": {"learning_rate": 0.01}},
        {"amsgrad": {"learning_rate": 0.01}},
        1e-2,
    ),
    (
        "flux_amsgrad_zero_init",  # §1 F10: ε-initialised state
        {"flux:AMSGrad": {"learning_rate": 0.01}},
        {"amsgrad": {"learning_rate": 0.01, "bias_correction_mu": False, "bias_correction_nu": False}},
        1e-5,
    ),
    (
        "flux_nadam_b2",  # §4.15
        {"flux:NADAM": {"learning_rate": 0.01, "b2": 0.9}},
        {"nadam": {"learning_rate": 0.01, "b2": 0.9}},
        1e-5,
    ),
    (
        "flux_adamw_coupled",  # §4.10: 99%
        {"flux:ADAMW": {"learning_rate": 0.01, "weight_decay": 0.01}},
        {"adamw": {"learning_rate": 0.01, "weight_decay": 0.01}},
        1e-3,
    ),
    (
        "flux_expdecay_no_offset",  # §4.11
        {"flux:ExpDecay": {"learning_rate": 0.1, "decay_rate": 0.5, "transition_steps": 10, "end_value": 0.01}},
        {
            "chain": [
                {
                    "scale_by_schedule": {
                        "schedule": {
                            "exponential_decay": {
                                "init_value": 0.1,
                                "transition_steps": 10,
                                "decay_rate": 0.5,
                                "staircase": True,
                                "end_value": 0.01,
                            }
                        }
                    }
                },
                {"scale": {"step_size": -1.0}},
            ]
        },
        1e-3,
    ),
    (
        "axon_adabelief_compat_vs_correct",  # §4.6
        {"axon:adabelief": {"learning_rate": 0.01, "compat": True}},
        {"adabelief": {"learning_rate": 0.01, "eps": 0.0, "eps_root": 1e-16}},
        1e-2,
    ),
    (
        "axon_radam_compat_vs_correct",  # §4.6
        {"axon:radam": {"learning_rate": 0.01, "compat": True}},
        {"radam": {"learning_rate": 0.01}},
        1e-3,
    ),
    (
        "axon_lamb_vs_optax_defaults",  # §1 A5: 3e-5
        "axon:lamb",
        {"lamb": {"learning_rate": 1e-2}},
        1e-6,
    ),
    (
        "axon_yogi_doc_defaults",  # §4.7: 68%
        "axon:yogi",
        {
            "chain": [
                {"scale_by_yogi": {"eps": 1e-8, "initial_accumulator_value": 0.0}},
                {"scale_by_learning_rate": {"learning_rate": 1e-2}},
            ]
        },
        1e-2,
    ),
    (
        "objax_adam_eps_placement",  # §4.1: 3.7%
        {"objax:Adam": {"learning_rate": 0.01}},
        {"adam": {"learning_rate": 0.01}},
        1e-3,
    ),
    (
        "objax_lars_trust_ratio",  # §4.5: 17.5%
        {"objax:LARS": {"learning_rate": 1.0}},
        {"lars": {"learning_rate": 1.0, "weight_decay": 1e-4, "eps": 1e-5}},
        1e-4,
    ),
]

CANONICAL = [c for c in CASES if c.canonical]
OPTAX_ONLY_JOBS = [("adadelta_lr_none", {"adadelta": {"learning_rate": None}})]


def _jobs():
    jobs = [(c.id, c.spec) for c in CANONICAL]
    jobs += [(f"eq:{i}", spec) for i, _, spec, _ in EQUIVALENTS]
    jobs += [(f"diff:{i}", spec) for i, _, spec, _ in DIFFERENCES]
    jobs += OPTAX_ONLY_JOBS
    return [
        {"id": i, "spec": s, "n_steps": N_STEPS, "params_seed": PARAMS_SEED, "grads_seed": GRADS_SEED} for i, s in jobs
    ]


@pytest.fixture(scope="module")
def optax64(tmp_path_factory):
    """optax trajectories in float64, computed once in a subprocess: id -> leaf -> (n, *shape)."""
    d = tmp_path_factory.mktemp("optax64")
    (d / "jobs.json").write_text(json.dumps(_jobs()))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.reference._optax_x64", str(d / "jobs.json"), str(d / "out.npz")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out: dict[str, dict] = {}
    with np.load(d / "out.npz") as z:
        for key in z.files:
            job, leaf = key.split("|", 1)
            out.setdefault(job, {})[leaf] = z[key]
    return out


@pytest.fixture(scope="module")
def data64():
    return make_params(PARAMS_SEED, dtype=np.float64), make_grads(N_STEPS, GRADS_SEED, dtype=np.float64)


def _trajectory(optax64, job):
    res = optax64[job]
    assert "!error" not in res, f"optax failed on {job}: {res.get('!error')}"
    return [{k: v[i] for k, v in res.items()} for i in range(N_STEPS)]


def _worst_over_steps(actual, reference, initial) -> float:
    """The worst relative leaf error over every step of the trajectory."""
    return max(max_rel_error(a, r, initial)[0] for a, r in zip(actual, reference, strict=True))


def _has_schedule(spec) -> bool:
    text = json.dumps(spec)
    return any(
        s in text
        for s in (
            'decay":',
            "linear",
            "polynomial",
            "cosine",
            "piecewise",
            "join",
            "constant",
            "exponential",
            "inverse_time",
        )
    )


# ----------------------------------------------------------------------------------------------
# canonical references vs optax float64


@pytest.mark.parametrize("case", CANONICAL, ids=[c.id for c in CANONICAL])
def test_canonical_reference_matches_optax_float64(case, optax64, data64):
    params, grads = data64
    ref = reference_for(case.spec).run(params, grads)
    # optax evaluates int32-count schedules partly in float32 even with x64 (e.g. linear):
    # schedules get 1e-6, everything else must agree to float64 round-off.
    tol = 1e-6 if _has_schedule(case.spec) else 1e-10
    err = _worst_over_steps(_trajectory(optax64, case.id), ref, params)
    assert err <= tol, f"{case.id}: rel error {err:.3g} > {tol}"


@pytest.mark.parametrize("item", EQUIVALENTS, ids=[e[0] for e in EQUIVALENTS])
def test_preset_matches_documented_optax_equivalent(item, optax64, data64):
    ident, preset, _, tol = item
    params, grads = data64
    ref = reference_for(preset).run(params, grads)
    err = _worst_over_steps(_trajectory(optax64, f"eq:{ident}"), ref, params)
    assert err <= tol, f"{ident}: rel error {err:.3g} > {tol}"


@pytest.mark.parametrize("item", DIFFERENCES, ids=[d[0] for d in DIFFERENCES])
def test_preset_differs_from_naive_optax(item, optax64, data64):
    ident, preset, _, min_err = item
    params, grads = data64
    ref = reference_for(preset).run(params, grads)
    err = _worst_over_steps(_trajectory(optax64, f"diff:{ident}"), ref, params)
    assert err >= min_err, f"{ident}: only {err:.3g} apart; the gotcha would go unnoticed"


# ----------------------------------------------------------------------------------------------
# gotchas that are about single steps or counts


def test_adadelta_defaults_to_lr_one_and_descends(optax64, data64):
    """§4.9: optax.adadelta(learning_rate=None) ascends; ours defaults to 1.0 and descends."""
    params, grads = data64
    ours = reference_for({"adadelta": {}}).run(params, grads[:1])[0]
    explicit = reference_for({"adadelta": {"learning_rate": 1.0}}).run(params, grads[:1])[0]
    theirs = _trajectory(optax64, "adadelta_lr_none")[0]
    for k in params:
        step_ours, step_theirs = ours[k] - params[k], theirs[k] - params[k]
        assert np.all(np.sign(step_ours) == -np.sign(grads[0][k]))
        assert np.all(np.sign(step_theirs) == np.sign(grads[0][k]))
        np.testing.assert_array_equal(ours[k], explicit[k])


def test_radam_first_rectified_step():
    """§1 A7, §4.14: optax's first adaptive step is 6, Flux's (ρ > 4) is 5, Axon's buggy
    ρ∞ = 2/(1−b1) − 1 first reaches the threshold at step 6890."""

    def first(t_from, cond):
        t = t_from
        while not cond(t):
            t += 1
        return t

    optax_like = ScaleByRAdam()
    axon_bug = ScaleByRAdam(rho_inf_from_b1=True)
    assert first(1, lambda t: optax_like.rho(t) >= 5.0) == 6
    assert first(1, lambda t: optax_like.rho(t) > 4.0) == 5
    assert first(1, lambda t: axon_bug.rho(t) >= 5.0) == 6890


def test_flux_adadelta_moves_and_keeps_eps_in_numerator(data64):
    """§4.8: the 2020 ADADelta never moves (Δacc₀ = 0, no ε in the numerator); the served
    v0.11.1 form must move, with first step g·√ε/√((1−ρ)g² + ε)."""
    params, grads = data64
    p1 = reference_for("flux:ADADelta").run(params, grads[:1])[0]
    for k in params:
        g = grads[0][k]
        expected = params[k] - g * math.sqrt(1e-8) / np.sqrt(0.1 * g * g + 1e-8)
        np.testing.assert_allclose(p1[k], expected, rtol=1e-14, atol=0)
        assert np.all(p1[k] != params[k])


def test_flux_optimiser_multiplies_learning_rates(data64):
    """§4.11, F13: Optimiser(ExpDecay(), Descent()) starts at an effective 1e-3·0.1."""
    params, grads = data64
    p1 = reference_for({"flux:Optimiser": ["flux:ExpDecay", "flux:Descent"]}).run(params, grads[:1])
    for k in params:
        np.testing.assert_allclose(p1[0][k], params[k] - 1e-3 * 0.1 * grads[0][k], rtol=1e-14)


def test_flux_expdecay_below_clip_first_decay_raises_lr():
    """F14: if η₀ < clip, Flux's first decay raises η to clip; before it, η₀ is used."""
    params = {"w": np.array([0.0])}
    grads = [{"w": np.array([1.0])}] * 4
    traj = reference_for(
        {"flux:ExpDecay": {"learning_rate": 1e-5, "decay_rate": 0.5, "transition_steps": 2, "end_value": 1e-3}}
    ).run(params, grads)
    steps = np.diff([0.0] + [float(p["w"][0]) for p in traj])
    np.testing.assert_allclose(steps, [-1e-5, -1e-3, -1e-3, -1e-3], rtol=1e-12)


def test_objax_lars_zero_norm_fallback():
    """§4.5: objax uses max(1, tr) when ‖p‖ or ‖g‖ is 0 (optax: exactly 1)."""
    params = {"z": np.zeros(3), "w": np.array([3.0, 4.0])}
    grads = [{"z": np.array([1.0, -2.0, 0.5]), "w": np.zeros(2)}]
    p1 = reference_for({"objax:LARS": {"learning_rate": 0.1, "trust_coefficient": 10.0, "weight_decay": 0.0}}).run(
        params, grads
    )[0]
    np.testing.assert_allclose(p1["z"], -0.1 * grads[0]["z"], rtol=1e-15)  # k = max(1, 0) = 1
    np.testing.assert_allclose(p1["w"], params["w"], rtol=1e-15)  # g = 0, wd = 0: no move


def test_objax_adam_equals_time_varying_eps_root(data64):
    """§1 J1: objax Adam ≡ u = −lr·m̂/√(v̂ + eps/(1−β2^t)) (no outer eps)."""
    params, grads = data64
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    ref = reference_for({"objax:Adam": {"learning_rate": lr}}).run(params, grads[:30])
    p = dict(params)
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    for t, g in enumerate(grads[:30], start=1):
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            p[k] = p[k] - lr * m_hat / np.sqrt(v_hat + eps / (1 - b2**t))
        err, leaf = max_rel_error(p, ref[t - 1], params)
        assert err < 1e-12, (t, leaf, err)


# ----------------------------------------------------------------------------------------------
# schedules vs optax (float32 in-process: schedule values only)


def _schedule_specs():
    from tests.reference.cases import SCHEDULE_CASES

    return [(c.id, c.spec[next(iter(c.spec))]["learning_rate"]) for c in SCHEDULE_CASES]


@pytest.mark.parametrize("item", _schedule_specs(), ids=[i for i, _ in _schedule_specs()])
def test_schedule_values_match_optax(item):
    import jax.numpy as jnp

    from tests.reference.optax_equiv import optax_schedule
    from tests.reference.schedules import as_schedule

    _, spec = item
    ours, theirs = as_schedule(spec), optax_schedule(spec)
    a = np.array([ours(c) for c in range(130)])
    b = np.array([float(theirs(jnp.asarray(c, jnp.int32))) for c in range(130)])
    # optax evaluates in float32: compare relative to the schedule's peak
    assert np.max(np.abs(a - b)) <= 1e-6 * np.max(np.abs(a)), np.max(np.abs(a - b))
    assert np.ptp(a) > 0 or "constant" in json.dumps(spec)


# ----------------------------------------------------------------------------------------------
# noise: by statistics


@pytest.mark.parametrize("case", NOISE_CASES, ids=[c.id for c in NOISE_CASES])
def test_reference_noise_spread_matches_prediction(case):
    """The reference's own noise has the predicted spread around the noise-free trajectory."""
    shapes = {"w": (40, 50)}
    params = make_params(0, shapes, dtype=np.float64)
    grads = make_grads(case.n_steps, 1, shapes, dtype=np.float64)
    noisy = reference_for(case.spec).run(params, grads)[-1]["w"]
    mean = reference_for(case.mean_spec).run(params, grads)[-1]["w"]
    std = math.sqrt(sum(case.step_std(t) ** 2 for t in range(1, case.n_steps + 1)))
    z = (noisy - mean) / std
    assert abs(z.mean()) < 0.15 and 0.9 < z.std() < 1.1, (z.mean(), z.std())


def test_optax_noisy_sgd_spread_is_sqrt_eta():
    """§4.4: optax's eta/t^γ is a variance and the noise is scaled by lr; Axon's is a std added
    after lr.  Empirical check of optax's semantics, which the noise cases' predictions use."""
    import jax.numpy as jnp
    import optax

    tx = optax.noisy_sgd(0.1, eta=0.02, gamma=0.55, key=3)
    p = {"w": jnp.zeros((200, 50))}
    state = tx.init(p)
    zeros = {"w": jnp.zeros((200, 50))}
    for t in range(1, 4):
        u, state = tx.update(zeros, state, p)
        sd = float(jnp.std(u["w"]))
        assert abs(sd / (0.1 * math.sqrt(0.02 / t**0.55)) - 1) < 0.05, (t, sd)
    axon = NOISE_CASES[2]
    assert axon.id == "axon_noisy_sgd" and axon.step_std(1) == pytest.approx(0.01)


# ----------------------------------------------------------------------------------------------
# parameter EMA (objax ExponentialMovingAverage, J5)


@pytest.mark.parametrize("debias,eps,tol", [(False, 1e-6, 1e-12), (True, 0.0, 1e-12)])
def test_params_ema_matches_optax_ema(debias, eps, tol):
    """§2.11: objax's EMA ≡ optax.ema on the params (debias with eps = 0)."""
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(0)
    ws = [{"w": rng.normal(size=(4, 3))} for _ in range(50)]
    ours = ParamsEMA(decay=0.9, debias=debias, eps=eps)
    st = ours.init(ws[0])
    tx = optax.ema(0.9, debias=debias)
    ost = tx.init({"w": jnp.zeros((4, 3), jnp.float32)})
    for w in ws:
        st = ours.update(w, st)
        out, ost = tx.update({"w": jnp.asarray(w["w"], jnp.float32)}, ost)
        np.testing.assert_allclose(ours.read(st)["w"], np.asarray(out["w"]), rtol=1e-5, atol=1e-6)


def test_params_ema_debias_eps_and_no_debias_bias():
    """§4.12, J5: no debias → m₁ = (1−μ)·w₁; debias divides by 1 − (1−eps)·μ^t."""
    w = {"w": np.array([2.0])}
    ema = ParamsEMA(decay=0.9, debias=False)
    st = ema.update(w, ema.init(w))
    np.testing.assert_allclose(ema.read(st)["w"], [0.2], rtol=1e-15)
    ema_d = ParamsEMA(decay=0.9, debias=True, eps=1e-6)
    st = ema_d.update(w, ema_d.init(w))
    np.testing.assert_allclose(ema_d.read(st)["w"], [0.2 / (1 - (1 - 1e-6) * 0.9)], rtol=1e-15)
    assert abs(ema_d.read(st)["w"][0] - 2.0) > 1e-6  # the eps makes it differ from optax.ema


# ----------------------------------------------------------------------------------------------
# spec interpretation and coverage


def test_reference_rejects_bad_specs():
    with pytest.raises(SpecError, match="unknown rule"):
        reference_for({"adamm": {"learning_rate": 0.1}})
    with pytest.raises(SpecError, match="unknown hyperparameter"):
        reference_for({"adam": {"learning_rate": 0.1, "beta1": 0.9}})
    with pytest.raises(SpecError, match="learning_rate: required"):
        reference_for({"adam": {}})
    with pytest.raises(SpecError, match="unknown hyperparameter"):
        reference_for({"flux:ADAM": {"eps": 1e-3}})  # Flux's ϵ is a constant
    with pytest.raises(SpecError, match="unknown hyperparameter"):
        reference_for({"axon:adam": {"compat": True}})  # compat only where there is a bug
    with pytest.raises(SpecError, match="unknown schedule"):
        reference_for({"sgd": {"learning_rate": {"cosine": {"init_value": 1.0}}}})


def test_presets_are_case_insensitive_and_accept_bare_names(data64):
    params, grads = data64
    a = reference_for("flux:ADAM").run(params, grads[:5])[-1]
    b = reference_for({"FLUX:adam": {}}).run(params, grads[:5])[-1]
    c = reference_for({"flux:ADAM": {"learning_rate": 0.001}}).run(params, grads[:5])[-1]
    for k in params:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], c[k])


def _names_in(spec, out):
    if isinstance(spec, str):
        out.add(spec.lower())
    elif isinstance(spec, dict):
        for k, v in spec.items():
            out.add(k.lower())
            _names_in(v, out)
    elif isinstance(spec, (list, tuple)):
        for s in spec:
            _names_in(s, out)
    return out


def test_case_list_covers_every_rule_preset_and_schedule():
    used: set[str] = set()
    for c in list(CASES) + list(NOISE_CASES) + list(EMA_CASES):
        _names_in(c.spec, used)
    # Flux Optimiser members may be spelled without the namespace; axon: and polaris: run the
    # same code (one of the two spellings is enough).
    used |= {f"flux:{n}" for n in used}
    used = {n.replace("polaris:", "axon:") for n in used}
    rules = {r.replace("polaris:", "axon:") for r in known_rules()}
    # scale_by_adadelta: optax's transform behind adadelta, not in issue 3's list; it is covered
    # through the adadelta cases.
    missing = sorted(rules - used - {"scale_by_adadelta"})
    assert not missing, missing
    schedules = {
        "constant",
        "exponential_decay",
        "inverse_time_decay",
        "polynomial",
        "linear",
        "cosine_decay",
        "warmup_cosine_decay",
        "piecewise_constant",
        "join",
    }
    assert schedules <= used, schedules - used
    assert any("count_offset" in json.dumps(c.spec) for c in CASES)
