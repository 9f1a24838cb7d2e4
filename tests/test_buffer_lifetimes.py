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

from optserve.client import optim
from optserve.wire import assembler

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
    """Weak references to every buffer `optserve.wire.assembler` allocates (server and client share it)."""
    refs: list[weakref.ref] = []
    allocate = assembler.aligned_empty

    def tracking(nbytes: int) -> np.ndarray:
        buf = allocate(nbytes)
        refs.append(weakref.ref(buf.base if buf.base is not None else buf))
        return buf

    monkeypatch.setattr(assembler, "aligned_empty", tracking)
    return refs


def _wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    """Polls `predicate` (bounded), letting jax drop the host buffers of finished work before each try.

    jaxlib releases an update's inputs just after its outputs are ready and performs the Python
    reference drops at its next API call (host_memory.release_host_buffers); the server's reaper does
    that in the background, this does it here too so that the wait ends as soon as it can.
    """
    from optserve.server.core.host_memory import release_host_buffers

    deadline = time.monotonic() + timeout
    while True:
        release_host_buffers()
        if predicate():
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _alive(refs: list[weakref.ref]) -> int:
    return sum(r() is not None for r in refs)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_push_buffers_are_freed_without_gc(client, model_name, mode, tracked_buffers, no_cyclic_gc):
    settings = {"mode": "sync", "workers": 1} if mode == "sync" else {}
    model = client.create_model(
        model_name, {"w": np.zeros(N, np.float32), "i": np.zeros(2, np.int32)}, optim.adam(1e-3), **settings
    )
    tracked_buffers.clear()  # the create's own buffers now belong to the model
    pushes = 6
    for _ in range(pushes):
        model.push({"w": np.ones(N, np.float32), "i": np.zeros(2, np.int32)})
    model.pull()  # waits for the updates; its own buffers are returned (then dropped) here
    assert len(tracked_buffers) >= 2 * pushes
    # jax may still alias the most recent push's zero-copy buffers (2 leaves) right after its last
    # execution; nothing older may survive once the updates have run (the cyclic gc is off, so only
    # reference counting can have freed them).
    _wait_until(lambda: _alive(tracked_buffers) <= 2, "the pushes' buffers to be freed")


def test_pulled_pytree_is_freed_without_gc(client, model_name, no_cyclic_gc):
    model = client.create_model(
        model_name, {"a": {"w": np.zeros(N, np.float32)}, "b": [np.zeros(3, np.float32)]}, optim.sgd(0.1)
    )
    for pull in (model.pull, lambda: client.model(model_name).pull()):  # caller's structure, nested dicts
        out = pull()
        ref = weakref.ref(out["a"]["w"].base if out["a"]["w"].base is not None else out["a"]["w"])
        del out
        assert ref() is None


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_large_gradient_buffers_are_reused_then_given_back(server, client, model_name, monkeypatch, manual_clock, mode):
    """Pushes of a large leaf assemble in the buffers of earlier pushes once jax has let go of them
    (no fresh pages per push), never more than PER_LEAF are kept, the updates stay exact, and the
    buffers go when pushes stop.

    The idle release runs on a clock the test moves, so it never happens while the test still
    pushes, however slow the machine; each step waits for what the code exposes (free_bytes,
    held_bytes) instead of betting on how fast jax finishes an update.
    """
    from optserve.server.core import gradient_buffers

    clock = manual_clock(gradient_buffers)
    monkeypatch.setattr(gradient_buffers, "IDLE_SECONDS", 0.3)  # real seconds between the timer's looks
    n = gradient_buffers.MIN_BYTES // 4 + 1000  # one large leaf and one small one
    settings = {"mode": "sync", "workers": 1} if mode == "sync" else {}
    model = client.create_model(
        model_name, {"w": np.zeros(n, np.float32), "s": np.zeros(8, np.float32)}, optim.sgd(1.0), **settings
    )
    buffers = server.store.get(model_name).gradient_buffers
    fresh: list[int] = []
    allocate = assembler.aligned_empty

    def counting(nbytes: int) -> np.ndarray:
        if nbytes >= gradient_buffers.MIN_BYTES:
            fresh.append(nbytes)
        return allocate(nbytes)

    monkeypatch.setattr(assembler, "aligned_empty", counting)
    rng = np.random.default_rng(5)
    grads = [{"w": rng.standard_normal(n).astype(np.float32), "s": np.ones(8, np.float32)} for _ in range(12)]
    # One at a time: once the previous update has let go of its buffer, the next push assembles in it.
    for i, g in enumerate(grads[:4]):
        if i:
            _wait_until(lambda: buffers.free_bytes() > 0, f"update {i} to let go of its gradient buffer")
        model.push(g)
    assert fresh == [4 * n], fresh  # only the first push took fresh pages...
    one = buffers.held_bytes()  # ...and its buffer is the one kept (with the allocator's alignment padding)
    assert 4 * n <= one < 8 * n
    # Back to back: fresh buffers while the kept ones are still read, but never more than PER_LEAF kept.
    for g in grads[4:]:
        model.push(g)
        assert buffers.held_bytes() <= gradient_buffers.PER_LEAF * one
    expected = -np.sum([g["w"] for g in grads], axis=0, dtype=np.float32)
    np.testing.assert_allclose(model.pull()["w"], expected, rtol=1e-5, atol=1e-5)
    assert buffers.held_bytes() > 0  # kept while pushes go on (the clock has not moved)
    clock.advance(1.0)  # no push for more than IDLE_SECONDS: given back at the timer's next look
    _wait_until(lambda: buffers.held_bytes() == 0, "the idle buffers to be given back")
