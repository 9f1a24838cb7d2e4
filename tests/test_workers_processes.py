"""Sync mode with real worker processes: a straggler's late push is stale and it catches up; a worker
SIGKILLed in the middle of a push leaves nothing counted and the others go on.

This file is also the worker program: `python tests/test_workers_processes.py ROLE TARGET MODEL ...`
(it imports only the light client). Starting one takes seconds on a loaded machine, so no test
lets a server timer run against that: the fast workers say READY once imported and connected and
start together on GO, and the sync timeout runs on a clock the test moves (`manual_clock`).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from optserve.client import Client
from optserve.client.errors import FailedPreconditionError
from optserve.client.worker import Worker

SHAPE = (64, 32)
LR = 0.5


def _grad(params: dict, worker: int) -> dict:
    return {"w": (params["w"] * np.float32(0.1) + np.float32(worker + 1)).astype(np.float32)}


# -- the worker program ---------------------------------------------------------------------------


def _fast(target: str, model: str, index: int, steps: int) -> dict:
    """Trains `steps` rounds: push_pull, catching up by a pull when a push turns out stale.

    Says READY once imported and connected (step 0 pulled), then waits for GO on stdin.
    """
    accepted = stale = 0
    with Client(target, timeout=60) as client:
        worker = client.model(model).worker(f"fast-{index}")
        params = worker.pull()
        print("READY", flush=True)
        if sys.stdin.readline().strip() != "GO":
            raise SystemExit("no GO from the test")
        for _ in range(steps):
            try:
                params = worker.push_pull(_grad(params, index))
                accepted += 1
            except FailedPreconditionError:
                stale += 1
                params = worker.pull()
    return {"accepted": accepted, "stale": stale}


def _straggler(target: str, model: str, wait_for_step: int) -> dict:
    """Pulls step 0, sleeps until the others reached `wait_for_step`, pushes (stale), catches up, pushes."""
    with Client(target, timeout=60) as client:
        handle = client.model(model)
        worker = handle.worker("straggler")
        params = worker.pull()
        assert worker.base_step == 0
        print("PULLED", flush=True)  # the test starts the others only now, so step 0 is ours for sure
        handle.pull(min_step=wait_for_step, timeout=60)  # "sleeping": the others train meanwhile
        try:
            worker.push(_grad(params, 9))
            late = {"rejected": False}
        except FailedPreconditionError as e:
            late = {"rejected": True, "message": e.message}
        attempts, caught_up_from, joined = _catch_up(worker)
        handle.pull(min_step=joined, timeout=60)
        return {
            "late": late,
            "caught_up_from": caught_up_from,
            "joined": joined,
            "seq": worker.seq,
            "attempts": attempts,
        }


def _catch_up(worker: Worker, tries: int = 50) -> tuple[int, int | None, int]:
    """(attempts, base step, joined step) of the first push after a fresh pull that the server takes:
    the others may complete the step between our pull and push."""
    for attempt in range(1, tries + 1):
        params = worker.pull()
        base_step = worker.base_step
        try:
            joined = worker.push(_grad(params, 9))
        except FailedPreconditionError:
            continue
        return attempt, base_step, joined
    raise AssertionError(f"the straggler did not join a step in {tries} tries")


def _dies_mid_push(target: str, model: str) -> None:
    """Streams half of a push, says so, and waits to be SIGKILLed."""
    from optserve.v1 import optserve_pb2 as pb
    from optserve.wire.chunks import chunk_messages

    def messages():
        header = pb.PushHeader(model=model, base_step=0, worker_id="victim", seq=1)
        leaves = [("w", np.full(SHAPE, 1000.0, np.float32))]
        chunks = chunk_messages(pb.PushRequest(header=header), leaves, 1024)
        for _ in range(4):
            yield next(chunks)
        print("MIDPUSH", flush=True)
        time.sleep(600)

    with Client(target, timeout=600) as client:
        client.call(client._push, messages())


def main(argv: list[str]) -> None:
    role, target, model, *rest = argv
    if role == "fast":
        print(json.dumps(_fast(target, model, int(rest[0]), int(rest[1]))), flush=True)
    elif role == "straggler":
        print(json.dumps(_straggler(target, model, int(rest[0]))), flush=True)
    elif role == "dies":
        _dies_mid_push(target, model)


if __name__ == "__main__":
    main(sys.argv[1:])


# -- the tests ------------------------------------------------------------------------------------

HERE = os.path.abspath(__file__)


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, HERE, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _expect_line(proc: subprocess.Popen, expected: str, timeout: float = 120) -> None:
    """Waits (bounded) for the worker's next stdout line, which must be `expected`."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != expected:
        if proc.poll() is None:
            proc.kill()
        raise AssertionError(
            f"expected {expected!r} from the worker, got {line!r}; stderr: {proc.stderr.read()[-3000:]}"
        )


def _result(proc: subprocess.Popen, timeout: float = 120) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_quorum_three_of_four_with_a_straggler(server, client, model_name):
    from optserve.client import optim

    model = client.create_model(
        model_name,
        {"w": np.zeros(SHAPE, np.float32)},
        optimizer=optim.sgd(0.01),
        mode="sync",
        workers=4,
        quorum=3,
        sync_timeout=3.0,
    )
    straggler = _spawn("straggler", server.address, model_name, "3")
    fast: list[subprocess.Popen] = []
    try:
        _expect_line(straggler, "PULLED")
        fast = [_spawn("fast", server.address, model_name, str(i), "8") for i in range(3)]
        for p in fast:  # all three imported and connected: they start together, not seconds apart
            _expect_line(p, "READY")
        for p in fast:
            p.stdin.write("GO\n")
            p.stdin.flush()
        s = _result(straggler)
        results = [_result(p) for p in fast]
    finally:
        for p in (straggler, *fast):
            if p.poll() is None:
                p.kill()
                p.wait(10)
    # the late push was refused as stale, naming the current step, after training went on without it
    assert s["late"]["rejected"], s
    assert model_name in s["late"]["message"] and "the current step is" in s["late"]["message"]
    assert s["caught_up_from"] >= 3
    # it caught up and its next gradient joined a later step, which was applied
    assert s["joined"] == s["caught_up_from"] + 1 and s["seq"] == 1 + s["attempts"]
    info = model.info()
    assert info["step"] >= s["joined"] and info["counters"]["stale_rejected"] >= 1
    assert info["workers"]["straggler"] == {"last_seq": s["seq"], "last_base_step": s["caught_up_from"]}
    assert sum(r["accepted"] for r in results) >= 3 * 3  # the three others trained through the straggler's sleep
    assert info["pending_contributions"] == 0


def test_worker_killed_mid_push_counts_nothing_and_the_others_continue(server, client, model_name, manual_clock):
    from optserve.client import optim
    from optserve.server.core import sync as aggregation

    # The sync timeout fires when the test moves this clock, never while the victim is starting.
    clock = manual_clock(aggregation)
    start = np.zeros(SHAPE, np.float32)
    model = client.create_model(
        model_name, {"w": start}, optimizer=optim.sgd(LR), mode="sync", workers=3, sync_timeout=1.0
    )
    # Watch the server's receiver of each push: the victim's must have taken bytes before the kill,
    # and must have been aborted (the server saw the stream die) before we count.
    receivers: list = []
    served = server.store.get(model_name)
    open_push = served.open_push

    def watched_open_push(**kwargs):
        receiver = open_push(**kwargs)
        receiver.aborted = threading.Event()
        abort = receiver.abort

        def watched_abort() -> None:
            abort()
            receiver.aborted.set()

        receiver.abort = watched_abort
        receivers.append((kwargs["worker_id"], receiver))
        return receiver

    served.open_push = watched_open_push
    try:
        g0, g1 = _grad({"w": start}, 0), _grad({"w": start}, 1)
        model.push(g0, base_step=0)
        victim = _spawn("dies", server.address, model_name)
        try:
            _expect_line(victim, "MIDPUSH")
            _wait_until(
                lambda: any(w == "victim" and r.assembler.received_bytes > 0 for w, r in receivers),
                "the victim's chunks to reach the server",
            )
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(30)
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait(30)
        (dead,) = [r for w, r in receivers if w == "victim"]
        assert dead.aborted.wait(60), "the server never noticed the victim's stream end"
    finally:
        del served.open_push
    assert model.info()["pending_contributions"] == 1  # only the complete push
    model.push(g1, base_step=0)
    assert model.info()["pending_contributions"] == 2 and model.info()["step"] == 0  # quorum 3 never comes...
    clock.advance(1.0)  # ...so the timeout applies the two
    got = model.pull(min_step=1, timeout=60)["w"]
    info = model.info()
    assert info["step"] == 1 and info["counters"]["sync_timeouts"] == 1
    assert "victim" not in info["workers"]
    np.testing.assert_allclose(got, start - LR * (g0["w"] + g1["w"]) / 2, rtol=1e-6)


def _wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    # Not conftest's wait_until: this file is also the workers' script, run without the tests package.
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
