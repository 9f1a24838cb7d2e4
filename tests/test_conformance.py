"""Conformance (issue 3 acceptance): every canonical rule and every preset, 100 steps of random
gradients (magnitudes 1e-4..1, leaves of rank 0 to 4) through a live in-process server, match
the independent float64 NumPy reference (tests/reference) within relative 1e-5 in float32 (the
RAdam family: 5e-5, see RADAM_RTOL); canonical rules also match in-process optax (float32) to 1e-5.

Relative error per leaf = max |server − reference| / max |reference| (docs/optimizer-catalogue.md §5), the
denominator floored by the leaf's initial magnitude.  Checked after step 1, step 10 and the
last step.  Random rules (noise) are checked by statistics, parameter EMA against objax's
formula.  The case list is tests/reference/cases.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

# No skip on ImportError: a server that cannot be imported must fail these tests, never hide them.
from optserve.server import Server
from tests.reference import ParamsEMA, reference_for
from tests.reference.cases import CASES, EMA_CASES, NOISE_CASES, NOISE_SHAPES
from tests.reference.data import make_grads, make_params, max_rel_error

RTOL = 1e-5
# RAdam's rectification term rho_t = rho_inf - 2t*b2^t/(1 - b2^t) subtracts two numbers near 1999
# (b2 = 0.999) in float32, so optax itself lands up to ~4e-5 (relative) from the float64 formula:
# measured 2.7e-5 at step 100 for `radam`, 1.3e-5 at step 10 for `flux:RADAM`, and the same for
# in-process optax in float32. The server runs optax's RAdam unchanged (and must equal in-process
# optax to RTOL, checked below), so against float64 the RAdam family gets this documented bound.
RADAM_RTOL = 5e-5


def reference_tolerance(case) -> float:
    return RADAM_RTOL if "radam" in case.id.lower() else RTOL


PARAMS_SEED, GRADS_SEED = 0, 1


@pytest.fixture(scope="module")
def client():
    srv = Server(port=0)
    try:
        yield srv.client()
    finally:
        srv.stop()


def _model_name(case_id: str) -> str:
    return f"conformance-{case_id}".replace("_", "-")


def _push_and_pull(model, grads, checkpoints):
    """Push every gradient; pull after the steps listed in ``checkpoints`` (1-based)."""
    pulled = {}
    for step, g in enumerate(grads, start=1):
        model.push(g)
        if step in checkpoints:
            pulled[step] = {k: np.asarray(v) for k, v in model.pull().items()}
    return pulled


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_server_matches_reference(case, client):
    params = make_params(PARAMS_SEED)
    grads = make_grads(case.n_steps, GRADS_SEED)
    checkpoints = sorted({1, 10, case.n_steps})

    model = client.create_model(_model_name(case.id), params, optimizer=case.spec)
    served = _push_and_pull(model, grads, checkpoints)
    reference = reference_for(case.spec).run(params, grads)

    for step in checkpoints:
        got = served[step]
        assert set(got) == set(params), f"{case.id}: pulled leaves {sorted(got)}"
        for k in params:
            assert got[k].shape == params[k].shape and got[k].dtype == np.float32, (k, got[k])
            assert np.all(np.isfinite(got[k])), f"{case.id}: non-finite {k} at step {step}"
        err, leaf = max_rel_error(got, reference[step - 1], params)
        assert err <= reference_tolerance(case), (
            f"{case.id}: step {step}, leaf {leaf!r}: relative error {err:.3g} vs the NumPy reference (spec {case.spec})"
        )

    if case.canonical:
        from tests.reference.optax_equiv import run_optax

        expected = run_optax(case.spec, params, grads)
        for step in checkpoints:
            err, leaf = max_rel_error(served[step], expected[step - 1], params)
            assert err <= RTOL, f"{case.id}: step {step}, leaf {leaf!r}: relative error {err:.3g} vs in-process optax"


@pytest.mark.parametrize("case", NOISE_CASES, ids=[c.id for c in NOISE_CASES])
def test_noisy_rules_by_statistics(case, client):
    """Noise cannot be compared element by element (jax.random vs NumPy): the final params
    must sit around the noise-free reference with the predicted spread, and the explicit key
    must make the run reproducible."""
    params = make_params(PARAMS_SEED, NOISE_SHAPES)
    grads = make_grads(case.n_steps, GRADS_SEED, NOISE_SHAPES)

    finals = []
    for run in (1, 2):
        model = client.create_model(_model_name(f"{case.id}-{run}"), params, optimizer=case.spec)
        finals.append(_push_and_pull(model, grads, {case.n_steps})[case.n_steps])
    for k in params:
        np.testing.assert_array_equal(finals[0][k], finals[1][k], err_msg=f"{case.id}: same key, different noise")

    mean = reference_for(case.mean_spec).run(params, grads)[-1]
    std = math.sqrt(sum(case.step_std(t) ** 2 for t in range(1, case.n_steps + 1)))
    for k in params:
        z = (finals[0][k].astype(np.float64) - mean[k]) / std
        # 2000 samples: the sample mean has sd 0.022 and the sample sd about 0.016
        assert abs(z.mean()) < 0.15, f"{case.id}: noise mean {z.mean():.3f} (in units of std)"
        assert 0.9 < z.std() < 1.1, f"{case.id}: noise std ratio {z.std():.3f} vs prediction"


@pytest.mark.parametrize("case", EMA_CASES, ids=[c.id for c in EMA_CASES])
def test_params_ema_matches_objax(case, client):
    params = make_params(PARAMS_SEED)
    grads = make_grads(case.n_steps, GRADS_SEED)
    model = client.create_model(_model_name(case.id), params, optimizer=case.spec, **case.settings)
    for g in grads:
        model.push(g)
    got = {k: np.asarray(v) for k, v in model.pull(ema=True).items()}

    ema = ParamsEMA(decay=case.settings["ema"], debias=case.settings.get("ema_debias", False))
    state = ema.init(params)
    for p in reference_for(case.spec).run(params, grads):
        state = ema.update(p, state)
    err, leaf = max_rel_error(got, ema.read(state), params)
    assert err <= RTOL, f"{case.id}: leaf {leaf!r}: relative error {err:.3g} vs objax's EMA"
