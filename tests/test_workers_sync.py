"""Sync mode against a live server: quorum rounds average exactly, stale and repeated pushes are
refused or answered once, a timeout applies what has arrived, a cancelled call is never counted twice.

(Worker processes -- the straggler and the SIGKILL mid-push -- are in test_workers_processes.py.)
"""

from __future__ import annotations

import time

import grpc
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optserve.client import optim
from optserve.client.errors import FailedPreconditionError, InvalidArgumentError, OptserveError
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import chunk_messages

K = 6  # steps


def _params() -> dict:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}


def _grad(params: dict, worker: int, step: int) -> dict:
    """A deterministic gradient that depends on the parameters, the worker and the step."""
    return {
        "w": (params["w"] * np.float32(0.3 + 0.2 * worker) + np.float32(0.01 * (step + 1) * (worker - 1.5))).astype(
            np.float32
        ),
        "b": (params["b"] - np.float32(worker + step)).astype(np.float32),
    }


def _wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _reference(weights: list[float], steps: int) -> dict:
    """Single-process training (optax) on the weighted mean of the workers' gradients."""
    opt = optax.adam(0.01)
    params = {k: jnp.asarray(v) for k, v in _params().items()}
    state = opt.init(params)
    for t in range(steps):
        host = {k: np.asarray(v) for k, v in params.items()}
        grads = [_grad(host, i, t) for i in range(len(weights))]
        total = np.float32(sum(weights))
        mean = {k: sum(np.float32(w) * g[k] for w, g in zip(weights, grads, strict=True)) / total for k in host}
        updates, state = opt.update({k: jnp.asarray(v) for k, v in mean.items()}, state, params)
        params = optax.apply_updates(params, updates)
    return {k: np.asarray(v) for k, v in params.items()}


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 5.0, 8.0]], ids=["mean", "weighted"])
def test_four_workers_equal_single_process_training_on_the_mean(client, model_name, weights):
    model = client.create_model(model_name, _params(), optimizer=optim.adam(0.01), mode="sync", workers=4)
    workers = [model.worker(f"w{i}") for i in range(4)]
    for t in range(K):
        for i, w in enumerate(workers):
            params = w.pull()
            assert w.base_step == t
            step = w.push(_grad(params, i, t), weight=None if len(set(weights)) == 1 else weights[i])
            assert step == t + 1  # the step this gradient joins
        assert model.info()["pending_contributions"] == 0
    info = model.info()
    assert info["step"] == K and info["counters"]["pushes_applied"] == K
    got = model.pull()
    want = _reference(weights, K)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-7, err_msg=k)


def test_quorum_completes_the_step_and_late_push_is_stale_with_current_step(client, model_name):
    model = client.create_model(model_name, _params(), optimizer=optim.sgd(0.1), mode="sync", workers=4, quorum=2)
    p = model.pull()
    assert model.push(_grad(p, 0, 0), base_step=0) == 1
    assert model.info()["pending_contributions"] == 1 and model.info()["step"] == 0
    assert model.push(_grad(p, 1, 0), base_step=0) == 1
    assert model.info()["step"] == 1
    before = model.info()["counters"]["stale_rejected"]
    with pytest.raises(FailedPreconditionError) as e:
        model.push(_grad(p, 2, 0), base_step=0)
    assert model_name in e.value.message and "current step is 1" in e.value.message
    info = model.info()
    assert info["step"] == 1 and info["pending_contributions"] == 0
    assert info["counters"]["stale_rejected"] == before + 1


def test_push_without_base_step_joins_the_current_step(client, model_name):
    model = client.create_model(model_name, _params(), optimizer=optim.sgd(0.1), mode="sync", workers=2)
    p = model.pull()
    assert model.push(_grad(p, 0, 0)) == 1 and model.push(_grad(p, 1, 0)) == 1
    assert model.info()["step"] == 1


def test_repeated_seq_is_answered_once_pending_and_after_apply(client, model_name):
    # "a" pushes raw, without heartbeats: a fixed membership, so that no lease of it expires meanwhile
    model = client.create_model(model_name, _params(), optimizer=optim.sgd(0.5), mode="sync", workers=2, heartbeat=0)
    p = model.pull()
    a, b = model.worker("a"), model.worker("b")
    a.base_step = b.base_step = 0
    ga, gb = _grad(p, 0, 0), _grad(p, 1, 0)
    header = model._push_header(0, None, "a", 1)
    first = model.push_raw(header, model._grad_leaves(ga, None))
    again = model.push_raw(header, model._grad_leaves(ga, None))  # retry while the step is pending
    assert (first.step, first.applied, first.duplicate) == (1, False, False)
    assert (again.step, again.applied, again.duplicate) == (1, False, True)
    info = model.info()
    assert info["pending_contributions"] == 1 and info["workers"]["a"] == {"last_seq": 1, "last_base_step": 0}
    assert b.push(gb) == 1
    late = model.push_raw(header, model._grad_leaves(ga, None))  # retry after the step was applied
    assert late.duplicate and late.step == 1
    info = model.info()
    assert info["step"] == 1 and info["counters"]["duplicates"] == 2
    got = model.pull()
    np.testing.assert_allclose(got["w"], p["w"] - 0.5 * (ga["w"] + gb["w"]) / 2, rtol=1e-6)


def test_second_push_of_a_worker_to_the_same_step_is_refused(client, model_name):
    model = client.create_model(model_name, _params(), optimizer=optim.sgd(0.1), mode="sync", workers=2)
    w = model.worker("w")
    p = w.pull()
    w.push(_grad(p, 0, 0))
    with pytest.raises(FailedPreconditionError, match="already contributed"):
        w.push(_grad(p, 0, 0))
    assert model.info()["pending_contributions"] == 1


def test_non_finite_and_bad_weight_are_rejected_and_not_counted(client, model_name):
    model = client.create_model(model_name, _params(), optimizer=optim.sgd(0.1), mode="sync", workers=2)
    p = model.pull()
    bad = _grad(p, 0, 0)
    bad["b"][1] = np.nan
    with pytest.raises(InvalidArgumentError) as e:
        model.push(bad, base_step=0)
    assert model_name in e.value.message and "'b'" in e.value.message
    for weight in (-1.0, float("inf")):
        with pytest.raises(InvalidArgumentError, match="weight"):
            model.push(_grad(p, 0, 0), base_step=0, weight=weight)
    info = model.info()
    assert info["pending_contributions"] == 0 and info["step"] == 0


def test_sync_timeout_applies_what_has_arrived_logged_and_counted(client, model_name, caplog, manual_clock):
    from optserve.server.core import sync as aggregation

    clock = manual_clock(aggregation)  # the timeout fires when the test moves the clock, not between pushes
    model = client.create_model(
        model_name, _params(), optimizer=optim.sgd(0.5), mode="sync", workers=3, sync_timeout=0.3
    )
    p = model.pull()
    g0, g1 = _grad(p, 0, 0), _grad(p, 1, 0)
    with caplog.at_level("WARNING", logger="optserve.aggregation"):
        model.push(g0, base_step=0, weight=1)
        model.push(g1, base_step=0, weight=3)
        clock.advance(0.25)
        assert model.info()["step"] == 0  # not yet
        clock.advance(0.1)
        got = model.pull(min_step=1, timeout=60)
    info = model.info()
    assert info["step"] == 1 and info["counters"]["sync_timeouts"] == 1 and info["pending_contributions"] == 0
    np.testing.assert_allclose(got["w"], p["w"] - 0.5 * (g0["w"] + 3 * g1["w"]) / 4, rtol=1e-6)
    assert any("applied by timeout" in r.getMessage() and "2 of 3" in r.getMessage() for r in caplog.records)
    # the round after a timeout starts empty: the missing worker's late push is stale
    with pytest.raises(FailedPreconditionError, match="current step is 1"):
        model.push(_grad(p, 2, 0), base_step=0)


def test_cancelled_push_pull_after_contribution_then_retry_counts_once(client, model_name):
    """The reply is lost because the client cancels its call after the server took the gradient;
    resending the same (worker_id, seq) is answered as a duplicate, and the step averages it once. "a"
    pushes raw, without heartbeats: a fixed membership, so that no lease of it expires meanwhile."""
    model = client.create_model(model_name, _params(), optimizer=optim.sgd(0.5), mode="sync", workers=2, heartbeat=0)
    p = model.pull()
    ga, gb = _grad(p, 0, 0), _grad(p, 1, 0)
    header = model._push_header(0, None, "a", 1)
    header.pull.CopyFrom(pb.PullRequest(model=model_name))
    call = client._push_pull(
        chunk_messages(pb.PushRequest(header=header), model._grad_leaves(ga, None), 1 << 20), timeout=60
    )
    _wait_until(lambda: model.info()["pending_contributions"] == 1, "the contribution of 'a'")
    call.cancel()
    with pytest.raises(grpc.RpcError) as cancelled:  # the reply is lost
        next(iter(call))
    assert cancelled.value.code() == grpc.StatusCode.CANCELLED, cancelled.value
    header.ClearField("pull")
    retry = model.push_raw(header, model._grad_leaves(ga, None))
    assert retry.duplicate and retry.step == 1 and model.info()["pending_contributions"] == 1
    model.push(gb, base_step=0)
    info = model.info()
    assert info["step"] == 1 and info["counters"]["pushes_applied"] == 1
    np.testing.assert_allclose(model.pull()["w"], p["w"] - 0.5 * (ga["w"] + gb["w"]) / 2, rtol=1e-6)


def test_push_pull_returns_once_the_step_is_applied(client, model_name):
    """PushPull in sync mode: the reply carries the parameters of the step the gradient joined."""
    import threading

    model = client.create_model(model_name, _params(), optimizer=optim.sgd(0.5), mode="sync", workers=2)
    p = model.pull()
    ga, gb = _grad(p, 0, 0), _grad(p, 1, 0)
    a = model.worker("a")
    a.pull()
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(params=a.push_pull(ga)))
    t.start()
    _wait_until(lambda: model.info()["pending_contributions"] == 1, "the contribution of 'a'")
    assert t.is_alive()  # waiting at the barrier
    model.push(gb, base_step=0)
    t.join(30)
    assert not t.is_alive() and a.base_step == 1
    np.testing.assert_allclose(out["params"]["w"], p["w"] - 0.5 * (ga["w"] + gb["w"]) / 2, rtol=1e-6)


def test_sync_settings_are_validated(client, model_name):
    with pytest.raises(InvalidArgumentError, match="quorum"):
        client.create_model(model_name, _params(), optimizer=optim.sgd(0.1), mode="sync", workers=2, quorum=3)
    with pytest.raises(InvalidArgumentError, match="workers"):
        client.create_model(model_name, _params(), optimizer=optim.sgd(0.1), mode="sync")
    with pytest.raises(OptserveError):
        client.model(model_name)  # nothing was created
