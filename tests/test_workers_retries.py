"""The client's Worker helper: retries UNAVAILABLE and DEADLINE_EXCEEDED with exponential backoff
and jitter, reusing the same seq, so a retried gradient is never applied twice."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from optserve.client import Client, optim
from optserve.client import worker as worker_module
from optserve.client.errors import FailedPreconditionError, UnavailableError
from optserve.client.model import Model
from tests.conftest import wait_until

FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deadline_exceeded_at_the_sync_barrier_is_retried_with_the_same_seq(server, client, model_name):
    """Worker a's PushPull waits for a step that needs b; its 0.5 s deadline expires after the server
    took the gradient, it retries the same seq (answered as a duplicate) until b arrives."""
    params = {"w": np.zeros(3, np.float32)}
    model = client.create_model(model_name, params, optimizer=optim.sgd(1.0), mode="sync", workers=2)
    ga, gb = {"w": np.array([1, 2, 3], np.float32)}, {"w": np.array([3, 2, 1], np.float32)}
    with server.client(timeout=0.5) as impatient:
        a = impatient.model(model_name).worker("a", retry_for=60, backoff=0.02, max_backoff=0.1)
        a.pull()
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(params=a.push_pull(ga)))
        t.start()
        # Its 0.5 s deadline may also expire before the server has the gradient on a loaded machine:
        # wait for what matters, a retry answered as a duplicate of the gradient the server holds.
        wait_until(lambda: model.info()["counters"]["duplicates"] >= 1, "a retry answered as a duplicate")
        assert t.is_alive() and a.seq == 1
        info = model.info()
        assert info["pending_contributions"] == 1 and info["counters"]["duplicates"] >= 1
        model.push(gb, base_step=0)
        t.join(30)
    assert not t.is_alive()
    info = model.info()
    assert info["step"] == 1 and info["counters"]["pushes_applied"] == 1
    assert info["workers"]["a"]["last_seq"] == 1
    np.testing.assert_array_equal(out["params"]["w"], -(ga["w"] + gb["w"]) / 2)


def test_unavailable_is_retried_until_the_server_is_up(model_name):
    """The worker pushes to a port where no server listens yet; a server starts there later."""
    from optserve.server import Server

    port = _free_port()
    params = {"w": np.zeros(3, np.float32)}
    g = {"w": np.ones(3, np.float32)}
    with Client(f"127.0.0.1:{port}", timeout=10, options=FAST_RECONNECT) as client:
        worker = Model(client, model_name, None, None).worker("w", retry_for=60, backoff=0.05, max_backoff=0.2)
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(step=worker.push(g)))
        t.start()
        wait_until(lambda: worker.retries >= 2, "the worker to retry twice")
        with Server(port=port) as srv:
            with srv.client(timeout=10) as c:
                model = c.create_model(model_name, params, optimizer=optim.sgd(1.0))
                t.join(60)
                assert not t.is_alive() and out["step"] == 1
                info = model.info()
            srv.stop(grace=1.0)
    assert worker.seq == 1 and info["workers"]["w"]["last_seq"] == 1 and info["step"] == 1


def test_backoff_doubles_up_to_the_cap_with_full_jitter_then_gives_up(monkeypatch, manual_clock):
    # The worker's clock moves only by its own backoff sleeps: how many tries fit in retry_for does
    # not depend on how fast a loaded machine makes (failed) calls.
    clock = manual_clock(worker_module)
    caps: list[float] = []
    waits: list[float] = []
    real_uniform = worker_module.random.uniform

    def recording_uniform(low: float, high: float) -> float:
        caps.append(high)
        waits.append(real_uniform(low, high))
        return waits[-1]

    monkeypatch.setattr(worker_module.random, "uniform", recording_uniform)
    with Client(f"127.0.0.1:{_free_port()}", timeout=2) as client:  # nothing listens there
        worker = Model(client, "m", None, None).worker("w", retry_for=1.0, backoff=0.01, max_backoff=0.08)
        start = clock.monotonic()
        with pytest.raises(UnavailableError):
            worker.push({"w": np.ones(2, np.float32)})
        slept = clock.monotonic() - start
    assert len(caps) >= 5 and worker.retries == len(caps)
    expected = [min(0.01 * 2**i, 0.08) for i in range(len(caps))]
    assert caps == pytest.approx(expected)
    assert all(0 <= w <= c for w, c in zip(waits, caps, strict=True))
    assert len(set(waits)) > 1  # jittered
    assert slept == pytest.approx(sum(waits))  # it slept exactly the jittered waits...
    # each wait began only if its cap fit in retry_for (1 s); it gave up when the next one would not
    assert slept - waits[-1] + caps[-1] <= 1.0 < slept + min(caps[-1] * 2, 0.08)
    assert worker.seq == 1  # one push, one seq, however many tries


def test_non_retryable_errors_are_raised_at_once(client, model_name):
    model = client.create_model(model_name, {"w": np.zeros(2, np.float32)}, optimizer=optim.sgd(1.0), max_staleness=0)
    w = model.worker("w")
    w.pull()
    model.push({"w": np.ones(2, np.float32)})
    with pytest.raises(FailedPreconditionError, match="current step 1"):
        w.push({"w": np.ones(2, np.float32)})  # stale: recompute, don't retry
    assert w.retries == 0


def test_a_worker_ahead_of_a_restored_model_caps_its_base_step_and_goes_on(tmp_path):
    """An admin restores an older checkpoint while a worker trains: its next push names a step the
    model no longer has (INVALID_ARGUMENT from the same incarnation). The worker learns the step and
    resends its gradient against it, once."""
    from optserve.server import Server

    with Server(port=0, checkpoint_dir=str(tmp_path)) as srv, srv.client(timeout=60.0) as c:
        model = c.create_model("rolled-back", {"w": np.zeros(4, np.float32)}, optimizer=optim.sgd(1.0))
        worker = model.worker("w0")
        worker.pull()
        worker.push_pull({"w": np.ones(4, np.float32)})
        assert model.save() == 1
        worker.push_pull({"w": np.ones(4, np.float32)})
        assert worker.base_step == 2
        assert model.restore(1) == 1  # behind the worker now
        params = worker.push_pull({"w": np.full(4, 2.0, np.float32)})
        assert worker.rollbacks_seen == 1 and worker.restarts_seen == 0
        assert model.info()["step"] == 2 and worker.base_step == 2
        np.testing.assert_array_equal(params["w"], np.full(4, -3.0, np.float32))  # 0 - 1 - 2
