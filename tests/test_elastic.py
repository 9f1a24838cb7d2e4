"""Elastic sync training with real worker processes (docs/design.md, "Membership and leases"):
three workers, one SIGKILLed while the others wait for it in a round; the round closes with the two
once its lease expires (not after sync_timeout); a fourth worker joins and is counted from the next
round; the final step and parameters are those of a twin fed the contributions the server took.

This file is also the worker program: `python tests/test_elastic.py TARGET MODEL INDEX` (it imports
only the light client). A worker says READY once it pulled (and so joined), then obeys stdin:
`GO T` trains until step T and says `AT T`; `GO T DIE K` says DYING at step K and waits to be
killed; `STOP` ends it. Every phase ends on what the server recorded (its closed rounds, the
membership in ModelInfo), never on the clock.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

import numpy as np

from optserve.client import Client
from optserve.client.errors import FailedPreconditionError

SIZE = 8
LR = 0.1
HEARTBEAT = 3.0  # a lease lasts 6 s: a live worker's heartbeat has 3 s of slack on a loaded machine


def _grad(index: int, seq: int) -> np.ndarray:
    """The gradient worker `index` pushes with `seq`: known to the twin from the round records."""
    return np.random.default_rng([index, seq]).standard_normal(SIZE).astype(np.float32)


# -- the worker program ---------------------------------------------------------------------------


def _work(target: str, model: str, index: int) -> None:
    with Client(target, timeout=60) as client, client.model(model).worker(f"w{index}") as worker:
        worker.pull()
        print("READY", flush=True)
        for line in sys.stdin:
            command = line.split()
            if command[0] == "STOP":
                return
            goal, die = int(command[1]), int(command[3]) if len(command) > 3 else None
            refused = 0
            while worker.base_step is not None and worker.base_step < goal:
                if die is not None and worker.base_step >= die:
                    print("DYING", flush=True)
                    sys.stdin.readline()  # the heartbeat goes on until the test kills this process
                    raise SystemExit("not killed")
                try:
                    worker.push_pull({"w": _grad(index, worker.seq + 1)})
                except FailedPreconditionError:  # joined during a round, or stale: the next round
                    refused += 1
                    worker.pull(min_step=worker.base_step + 1, timeout=60)
            print(f"AT {worker.base_step} {refused}", flush=True)


if __name__ == "__main__":
    _work(sys.argv[1], sys.argv[2], int(sys.argv[3]))


# -- the test -------------------------------------------------------------------------------------

HERE = os.path.abspath(__file__)


def _spawn(server, model: str, index: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, HERE, server.address, model, str(index)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _line(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    """The worker's next line, waited for with a bound (a safety net, not a bet on timing)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"worker {proc.args[-1]} said nothing in {timeout}s"
    line = proc.stdout.readline().strip()
    assert line, f"worker {proc.args[-1]} ended: {proc.stderr.read() if proc.stderr else ''}"
    return line


def _say(proc: subprocess.Popen, text: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(text + "\n")
    proc.stdin.flush()


def _twin(rounds: list[dict]) -> np.ndarray:
    """SGD fed the server's rounds: each round's contributions summed in its order, averaged."""
    w = np.zeros(SIZE, np.float32)
    for r in rounds:
        total = None
        for worker_id, seq in r["contributors"]:
            g = _grad(int(worker_id[1:]), seq)
            total = g.copy() if total is None else total + g
        assert total is not None
        w = w + np.float32(-LR) * (total / np.float32(len(r["contributors"])))
    return w


def test_a_killed_worker_leaves_the_round_and_a_joiner_counts_from_the_next(client, server, model_name):
    from tests.conftest import wait_until  # here: this file is also the worker program, run as a script

    model = client.create_model(
        model_name,
        {"w": np.zeros(SIZE, np.float32)},
        {"sgd": {"learning_rate": LR}},
        mode="sync",
        workers=3,
        sync_timeout=600.0,  # a round that waited for it would hang the test: the lease must end it
        heartbeat=HEARTBEAT,
    )
    procs = [_spawn(server, model_name, i) for i in range(3)]
    try:
        for p in procs:
            assert _line(p) == "READY"
        assert model.info()["membership_epoch"] == 3  # three joins
        _say(procs[0], "GO 12")
        _say(procs[1], "GO 12")
        _say(procs[2], "GO 12 DIE 6")
        assert _line(procs[2]) == "DYING"
        # the others push against step 6 and wait for the victim in the round for step 7
        wait_until(lambda: model.info()["pending_contributions"] == 2, "w0 and w1 in the round for step 7", 120)
        os.kill(procs[2].pid, signal.SIGKILL)
        procs[2].wait(60)
        assert _line(procs[0]) == "AT 12 0" and _line(procs[1]) == "AT 12 0"
        info = model.info()
        assert info["membership_epoch"] == 4 and sorted(info["members"]) == ["w0", "w1"]

        procs.append(_spawn(server, model_name, 3))  # a fourth worker joins while the model is at 12
        assert _line(procs[3]) == "READY"
        joined = model.info()["members"]["w3"]["joined_epoch"]
        assert joined == 5
        for p in (procs[0], procs[1], procs[3]):
            _say(p, "GO 18")
        assert _line(procs[0]) == "AT 18 0" and _line(procs[1]) == "AT 18 0"
        assert _line(procs[3]) == "AT 18 1"  # its push to the round it joined during was refused
        info = model.info()
        final = model.pull()["w"]
    finally:
        for p in procs:
            if p.poll() is None:
                _say(p, "STOP")
        for p in procs:
            try:
                p.wait(60)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait(30)
    assert [p.returncode for p in procs] == [0, 0, -signal.SIGKILL, 0]

    rounds = {r["step"]: r for r in info["recent_rounds"]}
    assert sorted(rounds) == list(range(1, 19)) and info["step"] == 18
    assert info["counters"]["sync_timeouts"] == 0

    def who(step: int) -> set[str]:
        return {w for w, _ in rounds[step]["contributors"]}

    for step in range(1, 7):
        assert who(step) == {"w0", "w1", "w2"} and rounds[step]["closed_by"] == "quorum"
    # the round the victim held up closed when its lease expired (epoch 4), with the two
    assert who(7) == {"w0", "w1"} and rounds[7]["expected"] == 2
    assert rounds[7]["closed_by"] == "membership" and rounds[7]["epoch"] == 4
    for step in range(8, 14):
        assert who(step) == {"w0", "w1"} and rounds[step]["closed_by"] == "quorum"
    # w3 joined (epoch 5) while the round for step 13 was open: counted from the round for step 14
    assert rounds[13]["opened_epoch"] < joined <= rounds[14]["opened_epoch"]
    for step in range(14, 19):
        assert who(step) == {"w0", "w1", "w3"} and rounds[step]["expected"] == 3
    np.testing.assert_allclose(final, _twin([rounds[s] for s in range(1, 19)]), rtol=1e-6, atol=1e-7)
