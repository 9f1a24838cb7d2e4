"""16 concurrent worker threads against one server: no deadlock, no error, and the step count equals
the pushes accepted (retries of the same seq mixed in are answered, never applied).

The issue asks for about 20 s; the async run is shortened to a fixed number of pushes per thread
(a few seconds on 2 cores, plus a sync run of 25 barrier rounds) to keep the suite fast -- the
invariants are checked on every push either way. A count, not a duration: on a loaded machine the
run takes longer instead of doing less than the assertions need.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from optserve.client import optim

THREADS = 16
ASYNC_PUSHES = 100  # per thread (1600 pushes: a few seconds on an idle 2-core machine)
SYNC_ROUNDS = 25
JOIN_SECONDS = 240  # only a deadlock comes near this (pytest's own timeout is 300 s)


def _run_threads(target, n: int, join_timeout: float) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + join_timeout
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.1))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running (deadlock?): {alive}"
    return errors


def test_sixteen_async_workers_step_equals_accepted_pushes(server, client, model_name):
    params = {"w": np.zeros((32, 8), np.float32), "b": np.zeros(8, np.float32)}
    model = client.create_model(model_name, params, optimizer=optim.adam(1e-3))
    accepted = [0] * THREADS
    retried = [0] * THREADS

    def work(i: int) -> None:
        with server.client(timeout=60) as c:
            handle = c.model(model_name)
            worker = handle.worker(f"t{i}")
            p = worker.pull()
            g = {"w": np.full((32, 8), 0.01 * (i + 1), np.float32), "b": np.ones(8, np.float32)}
            for n in range(ASYNC_PUSHES):
                p = worker.push_pull(g)
                accepted[i] += 1
                if n % 7 == 3:  # a retry of the push just made: answered from memory
                    reply = handle.push_raw(
                        handle._push_header(None, None, worker.worker_id, worker.seq), handle._grad_leaves(g, None)
                    )
                    assert reply.duplicate
                    retried[i] += 1
            assert np.isfinite(p["w"]).all()

    errors = _run_threads(work, THREADS, JOIN_SECONDS)
    assert not errors, errors[:3]
    info = model.info()
    assert accepted == [ASYNC_PUSHES] * THREADS
    assert info["step"] == sum(accepted) == info["counters"]["pushes_applied"]
    assert info["counters"]["duplicates"] == sum(retried)
    assert {w: s["last_seq"] for w, s in info["workers"].items()} == {f"t{i}": accepted[i] for i in range(THREADS)}


def test_sixteen_sync_workers_meet_at_every_barrier(server, client, model_name):
    params = {"w": np.zeros((32, 8), np.float32)}
    model = client.create_model(model_name, params, optimizer=optim.sgd(0.1), mode="sync", workers=THREADS)
    seen_steps: list[list[int]] = [[] for _ in range(THREADS)]

    def work(i: int) -> None:
        with server.client(timeout=60) as c:
            worker = c.model(model_name).worker(f"t{i}")
            worker.pull()
            for _ in range(SYNC_ROUNDS):
                worker.push_pull({"w": np.full((32, 8), i, np.float32)})
                seen_steps[i].append(worker.base_step)

    errors = _run_threads(work, THREADS, JOIN_SECONDS)
    assert not errors, errors[:3]
    info = model.info()
    assert info["step"] == SYNC_ROUNDS and info["counters"]["pushes_applied"] == SYNC_ROUNDS
    assert info["counters"]["stale_rejected"] == 0 and info["pending_contributions"] == 0
    assert all(steps == list(range(1, SYNC_ROUNDS + 1)) for steps in seen_steps)  # every round, in step
    mean = np.float32(sum(range(THREADS)) / THREADS)
    np.testing.assert_allclose(model.pull()["w"], -0.1 * SYNC_ROUNDS * mean * np.ones((32, 8)), rtol=1e-5)
