"""A server restart loses nothing committed: SIGKILL a checkpointing server subprocess over and over
while two worker processes train through it; SIGTERM ends it cleanly with a final checkpoint.

This file is also the worker program: `python tests/test_checkpoints_crash.py TARGET MODEL INDEX
STEPS RETRY_FOR [STOP_FILE]` (it imports only the light client). It prints the step after each push
and ends after STEPS pushes or once STOP_FILE exists, so the test, not the machine's speed, decides
how long the workers train.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from optserve.client import Client

SHAPE = (16, 8)
HERE = os.path.abspath(__file__)


def _worker(target: str, model: str, index: int, steps: int, retry_for: float, stop_file: str = "") -> int:
    rng = np.random.default_rng(100 + index)
    with Client(target, timeout=10.0) as client:
        worker = client.model(model).worker(f"w{index}", retry_for=retry_for, max_backoff=0.25)
        worker.pull()
        print("READY", flush=True)  # connected: from here on its calls retry across restarts
        for _ in range(steps):
            if stop_file and os.path.exists(stop_file):
                break
            grads = {
                "w": (rng.standard_normal(SHAPE) * 0.1).astype(np.float32),
                "b": (rng.standard_normal(SHAPE[1]) * 0.1).astype(np.float32),
            }
            worker.push_pull(grads)
            print(worker.base_step, flush=True)
            time.sleep(rng.uniform(0, 0.01))  # a little compute time
        print(f"done restarts_seen={worker.restarts_seen} retries={worker.retries}", flush=True)
    return 0


# -- helpers ----------------------------------------------------------------------------------------


def _serve(ckpt: str, port: int, log_path: str, *extra: str, timeout: float = 60.0) -> tuple[subprocess.Popen, int]:
    """Starts `optserve serve` and waits (bounded) for its listening line, which it prints only
    once every model has been restored."""
    with open(log_path, "a") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "optserve.server.cli",
                "serve",
                "--port",
                str(port),
                "--checkpoint-dir",
                ckpt,
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            m = re.match(r"optserve listening on \S+:(\d+)", line)
            if m:
                return proc, int(m.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}; log: {_read(log_path)[-3000:]}")
    proc.kill()
    raise TimeoutError("server did not print its listening line in time")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _spawn_worker(target: str, index: int, steps: int, retry_for: float, stop_file: str = "") -> subprocess.Popen:
    """A worker process, returned once it has said READY (connected and pulled; bounded wait), so
    that no server is killed while a worker is still starting (its first call does not retry)."""
    proc = subprocess.Popen(
        [sys.executable, HERE, target, "m", str(index), str(steps), str(retry_for), stop_file],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 300)
    line = proc.stdout.readline().strip() if ready else "(nothing)"
    if line != "READY":
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"worker {index} said {line!r}: {err[-3000:]}")
    return proc


def _committed(model_dir: str) -> list[int]:
    return sorted((int(n[5:]) for n in os.listdir(model_dir) if re.fullmatch(r"step_\d+", n)), reverse=True)


def _load(path: str) -> dict:
    import safetensors.numpy

    return safetensors.numpy.load_file(path)


def _assert_state_is_checkpoint(client: Client, step_dir: str, download_path: str) -> None:
    """The served state (downloaded: params, optimizer state, step, worker seqs) equals a checkpoint bitwise."""
    import safetensors

    client.model("m").download(download_path)
    served = _load(download_path)
    with safetensors.safe_open(download_path, framework="numpy") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    with open(os.path.join(step_dir, "manifest.json")) as f:
        manifest = json.load(f)
    on_disk = {f"params/{k}": v for k, v in _load(os.path.join(step_dir, "params.safetensors")).items()}
    on_disk.update({f"opt/{k}": v for k, v in _load(os.path.join(step_dir, "opt_state.safetensors")).items()})
    assert sorted(served) == sorted(on_disk)
    for k in on_disk:
        assert served[k].dtype == on_disk[k].dtype and served[k].tobytes() == on_disk[k].tobytes(), k
    assert meta["step"] == manifest["step"] and meta["workers"] == manifest["workers"]


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, sig)


# -- tests ------------------------------------------------------------------------------------------


@pytest.mark.timeout(900)  # ten server starts (jax imports) on a loaded 2-core machine
def test_sigkill_restarts_lose_nothing_committed(tmp_path):
    ckpt, log_path = str(tmp_path / "ck"), str(tmp_path / "server.log")
    flags = ("--checkpoint-every-steps", "1", "--keep", "3")
    server, port = _serve(ckpt, 0, log_path, *flags)
    target = f"127.0.0.1:{port}"
    workers: list[subprocess.Popen] = []
    seed = int(time.time())
    rng = random.Random(seed)
    kills = torn = 0
    try:
        with Client(target, timeout=30.0) as c:
            c.create_model(
                "m",
                {"w": np.zeros(SHAPE, np.float32), "b": np.zeros(SHAPE[1], np.float32)},
                optimizer={"adam": {"learning_rate": 0.01}},
            )
        stop_file = str(tmp_path / "stop")
        workers = [_spawn_worker(target, i, 1_000_000, 90.0, stop_file) for i in range(2)]
        restored_step = 0
        while kills < 10:  # each wait below is bounded; no bet on how fast 10 restarts go on a busy machine
            with Client(target, timeout=10.0) as c:  # let the workers make progress, then kill at a random moment
                until = time.monotonic() + 30
                while c.model("m").step <= restored_step and time.monotonic() < until:
                    time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
            for w in workers:
                if w.poll() is not None:
                    out, err = w.communicate(timeout=10)
                    raise AssertionError(f"a worker ended before kill {kills + 1} (seed {seed}): {err[-3000:]}")
            server.kill()
            server.wait(timeout=30)
            kills += 1
            _signal_all(workers, signal.SIGSTOP)  # freeze them while we compare, so the state holds still
            model_dir = os.path.join(ckpt, "m")
            torn += any(".tmp-" in n for n in os.listdir(model_dir))
            newest = _committed(model_dir)[0]

            server, _ = _serve(ckpt, port, log_path, *flags)
            assert not [n for n in os.listdir(model_dir) if ".tmp-" in n], "temporary directories remain"
            with Client(target, timeout=30.0) as c:
                assert c.model("m").step == newest
                _assert_state_is_checkpoint(c, os.path.join(model_dir, f"step_{newest}"), str(tmp_path / "dl.st"))
            restored_step = newest
            _signal_all(workers, signal.SIGCONT)

        with Client(target, timeout=30.0) as c:  # they train on after the last restart...
            until = time.monotonic() + 30
            while c.model("m").step <= restored_step + 4 and time.monotonic() < until:
                time.sleep(0.02)
        open(stop_file, "w").close()
        for w in workers:  # ...and finish by themselves, having noticed the restarts
            out, err = w.communicate(timeout=120)
            assert w.returncode == 0, err[-3000:]
            assert int(re.search(r"restarts_seen=(\d+)", out).group(1)) >= 1, out[-500:]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        print(f"seed {seed}: {kills} kills, {torn} with a checkpoint being written, last restored step {restored_step}")
    finally:
        _signal_all(workers, signal.SIGCONT)
        _signal_all(workers, signal.SIGKILL)
        if server.poll() is None:
            server.kill()
        for p in [*workers, server]:
            p.wait(timeout=30)


def test_sigterm_writes_a_final_checkpoint_of_the_last_applied_step(tmp_path):
    ckpt, log_path = str(tmp_path / "ck"), str(tmp_path / "server.log")
    server, port = _serve(ckpt, 0, log_path)  # no periodic checkpoints: the final one is the only one
    target = f"127.0.0.1:{port}"
    worker = None
    try:
        with Client(target, timeout=30.0) as c:
            m = c.create_model(
                "m",
                {"w": np.zeros(SHAPE, np.float32), "b": np.zeros(SHAPE[1], np.float32)},
                optimizer={"adam": {"learning_rate": 0.01}},
            )
            worker = _spawn_worker(target, 0, 100_000, 3.0)
            from tests.conftest import wait_until  # here: this file is also the worker program

            wait_until(lambda: m.step >= 20, "20 steps of training", 300)
        server.send_signal(signal.SIGTERM)  # during training
        assert server.wait(timeout=60) == 0
        out, _ = worker.communicate(timeout=60)  # it gives up retrying after 3 s
        acknowledged = max(int(line) for line in out.split() if line.isdigit())
        assert _committed(os.path.join(ckpt, "m")) == [acknowledged]
        with open(os.path.join(ckpt, "m", f"step_{acknowledged}", "manifest.json")) as f:
            assert json.load(f)["step"] == acknowledged
        assert f"final checkpoint step_{acknowledged}" in _read(log_path)
    finally:
        for p in (worker, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=30)


if __name__ == "__main__":
    t, name, i, n, retry = sys.argv[1:6]
    sys.exit(_worker(t, name, int(i), int(n), float(retry), sys.argv[6] if len(sys.argv) > 6 else ""))
