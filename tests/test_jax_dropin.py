"""`optserve.jax.remote` as an optax transformation: the same numbers as optax in-process,
`optax.apply_updates` unchanged, `step`, and the error under jax.jit (README.md, "JAX and optax")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optserve.jax
from optserve.client import optim

STEPS = 12


def _params() -> dict:
    return {
        "dense": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (6, 3)) * 0.3, "bias": jnp.zeros(3)},
        "scale": jnp.ones(3),
    }


def _batches(n: int = STEPS) -> list[tuple[jax.Array, jax.Array]]:
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    return [(jax.random.normal(k, (8, 6)), jax.random.randint(k, (8,), 0, 3)) for k in keys]


@jax.jit
def _grads(params: dict, x: jax.Array, y: jax.Array) -> dict:
    def loss(p):
        logits = (x @ p["dense"]["kernel"] + p["dense"]["bias"]) * p["scale"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.grad(loss)(params)


def test_remote_adam_matches_optax_adam_in_process(client, model_name):
    local = remote = _params()
    tx_local = optax.adam(1e-2)
    tx_remote = optserve.jax.remote(client, model_name, optim.adam(1e-2))
    s_local, s_remote = tx_local.init(local), tx_remote.init(remote)
    for x, y in _batches():
        u, s_local = tx_local.update(_grads(local, x, y), s_local, local)
        local = optax.apply_updates(local, u)
        u, s_remote = tx_remote.update(_grads(remote, x, y), s_remote, remote)
        remote = optax.apply_updates(remote, u)
    assert s_remote.step == STEPS
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), local, remote)
    # apply_updates lands on the server's parameters to within one rounding of (new - old) + old
    pulled = client.model(model_name).pull()
    np.testing.assert_allclose(remote["dense"]["kernel"], pulled["dense.kernel"], rtol=1e-6, atol=1e-7)


def test_step_returns_the_servers_parameters_exactly(client, model_name):
    params = _params()
    tx = optserve.jax.remote(client, model_name, optim.sgd(0.1))
    tx.init(params)
    for x, y in _batches(3):
        params = optserve.jax.step(tx, params, _grads(params, x, y))
    pulled = client.model(model_name).pull()
    assert isinstance(params["scale"], jax.Array)
    np.testing.assert_array_equal(np.asarray(params["dense"]["kernel"]), pulled["dense.kernel"])
    np.testing.assert_array_equal(np.asarray(params["scale"]), pulled["scale"])


def test_update_under_jit_is_a_clear_error(client, model_name):
    params = _params()
    tx = optserve.jax.remote(client, model_name, optim.sgd(0.1))
    state = tx.init(params)

    @jax.jit
    def train_step(p, s, x, y):
        updates, s = tx.update(_grads(p, x, y), s, p)
        return optax.apply_updates(p, updates), s

    x, y = _batches(1)[0]
    with pytest.raises(TypeError, match=r"tracer.*cannot run inside jax\.jit"):
        train_step(params, state, x, y)
    assert client.model(model_name).step == 0  # nothing was pushed
    with pytest.raises(ValueError, match="structure"):
        tx.update({"dense": _params()["dense"]}, state, params)


def test_a_flax_linen_train_state_trains_as_with_optax_in_process(client, model_name):
    """Linen's usual loop: TrainState.create(tx=...) and state.apply_gradients (outside jax.jit)."""
    from flax import linen as nn
    from flax.training import train_state

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))

    net = Classifier()
    params = net.init(jax.random.PRNGKey(2), jnp.zeros((1, 6)))["params"]

    @jax.jit
    def grads_of(p, x, y):
        return jax.grad(
            lambda q: optax.softmax_cross_entropy_with_integer_labels(net.apply({"params": q}, x), y).mean()
        )(p)

    states = [
        train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)
        for tx in (optax.adam(1e-2), optserve.jax.remote(client, model_name, optim.adam(1e-2)))
    ]
    for x, y in _batches():
        states = [s.apply_gradients(grads=grads_of(s.params, x, y)) for s in states]
    local, remote = states
    assert remote.step == STEPS and client.model(model_name).step == STEPS
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), local.params, remote.params
    )
