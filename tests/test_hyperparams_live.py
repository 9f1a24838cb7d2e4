"""set_hyperparams through a live server changes the trajectory exactly as in-process
optax.inject_hyperparams would, without recompiling or resetting optimizer state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optserve.client import InvalidArgumentError


def test_set_hyperparams_matches_inject_hyperparams(client, model_name):
    rng = np.random.default_rng(5)
    p0 = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p0.items()} for _ in range(12)]
    spec = {"adam": {"learning_rate": 0.01, "b1": 0.8, "tunable": ["learning_rate", "b1"]}}
    model = client.create_model(model_name, p0, optimizer=spec)
    assert model.info()["hyperparams"] == pytest.approx({"learning_rate": 0.01, "b1": 0.8})

    tx = optax.inject_hyperparams(optax.adam)(learning_rate=0.01, b1=0.8)
    params = jax.tree.map(jnp.asarray, p0)
    state = tx.init(params)
    for i, g in enumerate(grads):
        if i == 6:  # change both, mid-training
            assert model.set_hyperparams(learning_rate=0.002, b1=0.95) == pytest.approx(
                {"learning_rate": 0.002, "b1": 0.95}
            )
            state.hyperparams["learning_rate"] = jnp.asarray(0.002, jnp.float32)
            state.hyperparams["b1"] = jnp.asarray(0.95, jnp.float32)
        model.push(g)
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
    got = model.pull()
    for k in p0:
        np.testing.assert_allclose(got[k], np.asarray(params[k]), rtol=1e-6, atol=1e-7)
    assert model.info()["hyperparams"]["learning_rate"] == pytest.approx(0.002)


def test_unknown_or_untunable_hyperparameter_is_refused(client, model_name):
    model = client.create_model(
        model_name,
        {"w": np.zeros(2, np.float32)},
        optimizer={"adam": {"learning_rate": 0.01, "tunable": ["learning_rate"]}},
    )
    with pytest.raises(InvalidArgumentError) as e:
        model.set_hyperparams(eps=1e-3)  # exists, but not declared tunable
    assert "eps" in e.value.message and model_name in e.value.message
    with pytest.raises(InvalidArgumentError, match="learning_rat"):
        model.set_hyperparams(learning_rat=1e-3)
    assert model.info()["hyperparams"] == pytest.approx({"learning_rate": 0.01})
