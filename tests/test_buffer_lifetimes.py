"""Big buffers die with their last reference, not whenever the cyclic garbage collector runs.

A reference cycle through a push's receiver or a pulled pytree keeps whole gradients or parameter
copies alive until gc happens to run: memory then grows by a model's size per call and every call
touches fresh pages (measured: pulls of 40 MB went from ~40 ms to ~150 ms, RSS +40 MB per pull).
These tests run with the cyclic collector off, so only reference counting can free the buffers.
"""
from __future__ import annotations

import gc
import time
import weakref

import numpy as np
import pytest

from optserve.client import codec, optim

N = 1 << 16


@pytest.fixture
def no_cyclic_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def tracked_buffers(monkeypatch):
    """Weak references to every buffer the codec allocates (server and client share the module)."""
    refs: list[weakref.ref] = []
    allocate = codec.aligned_empty

    def tracking(nbytes: int) -> np.ndarray:
        buf = allocate(nbytes)
        refs.append(weakref.ref(buf.base if buf.base is not None else buf))
        return buf

    monkeypatch.setattr(codec, "aligned_empty", tracking)
    return refs


def _alive(refs: list[weakref.ref], timeout: float = 10.0) -> int:
    """Buffers still alive once in-flight device work has let go of them (bounded wait)."""
    deadline = time.monotonic() + timeout
    while any(r() is not None for r in refs) and time.monotonic() < deadline:
        time.sleep(0.02)
    return sum(r() is not None for r in refs)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_push_buffers_are_freed_without_gc(client, model_name, mode, tracked_buffers, no_cyclic_gc):
    settings = {"mode": "sync", "workers": 1} if mode == "sync" else {}
    model = client.create_model(model_name, {"w": np.zeros(N, np.float32), "i": np.zeros(2, np.int32)},
                                optim.adam(1e-3), **settings)  # fmt: skip
    tracked_buffers.clear()  # the create's own buffers now belong to the model
    pushes = 6
    for _ in range(pushes):
        model.push({"w": np.ones(N, np.float32), "i": np.zeros(2, np.int32)})
    model.pull()  # waits for the updates; its own buffers are returned (then dropped) here
    assert len(tracked_buffers) >= 2 * pushes
    # jax may still alias the most recent push's zero-copy buffers (2 leaves) right after its last
    # execution; nothing older may survive.
    assert _alive(tracked_buffers) <= 2


def test_pulled_pytree_is_freed_without_gc(client, model_name, no_cyclic_gc):
    model = client.create_model(model_name, {"a": {"w": np.zeros(N, np.float32)}, "b": [np.zeros(3, np.float32)]},
                                optim.sgd(0.1))  # fmt: skip
    for pull in (model.pull, lambda: client.model(model_name).pull()):  # caller's structure, nested dicts
        out = pull()
        ref = weakref.ref(out["a"]["w"].base if out["a"]["w"].base is not None else out["a"]["w"])
        del out
        assert ref() is None


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_large_gradient_buffers_are_reused_then_given_back(server, client, model_name, monkeypatch, mode):
    """Pushes of a large leaf assemble in the buffers of earlier pushes once jax has let go of them
    (no fresh pages per push), the updates stay exact, and the buffers go when pushes stop."""
    from optserve.server import gradient_buffers

    monkeypatch.setattr(gradient_buffers, "IDLE_SECONDS", 0.3)
    n = gradient_buffers.MIN_BYTES // 4 + 1000  # one large leaf and one small one
    settings = {"mode": "sync", "workers": 1} if mode == "sync" else {}
    model = client.create_model(model_name, {"w": np.zeros(n, np.float32), "s": np.zeros(8, np.float32)},
                                optim.sgd(1.0), **settings)  # fmt: skip
    fresh: list[int] = []
    allocate = codec.aligned_empty

    def counting(nbytes: int) -> np.ndarray:
        if nbytes >= gradient_buffers.MIN_BYTES:
            fresh.append(nbytes)
        return allocate(nbytes)

    monkeypatch.setattr(codec, "aligned_empty", counting)
    pushes = 8
    rng = np.random.default_rng(5)
    grads = [{"w": rng.standard_normal(n).astype(np.float32), "s": np.ones(8, np.float32)} for _ in range(pushes)]
    for g in grads:
        model.push(g)
    # a fresh large buffer only while both kept ones are still read by earlier updates
    assert len(fresh) <= pushes // 2, fresh
    expected = -np.sum([g["w"] for g in grads], axis=0, dtype=np.float32)
    np.testing.assert_allclose(model.pull()["w"], expected, rtol=1e-5, atol=1e-5)
    buffers = server.store.get(model_name).gradient_buffers
    assert buffers.held_bytes() > 0
    deadline = time.monotonic() + 10.0  # given back once pushes stop (bounded wait)
    while buffers.held_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert buffers.held_bytes() == 0
