"""Shared fixtures: a real server on 127.0.0.1 per test module, and helpers for server subprocesses."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _root_logger_as_it_was() -> Iterator[None]:
    """`optserve serve` run in process (cli.main) sets the root logger up for a server's life:
    after each test it is put back, so one test's logging setup never reaches the next."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def server() -> Iterator:
    """One in-process server per test module (127.0.0.1, a free port)."""
    from optserve.server import Server

    srv = Server(port=0)
    yield srv
    srv.stop(grace=1.0)


@contextlib.contextmanager
def in_process_servers(checkpoint_dirs: Sequence[str | None]) -> Iterator[list]:
    """Servers in this process (127.0.0.1, free ports), one per checkpoint directory (None: none),
    stopped on exit: the shard servers and the whole model's server of the shard tests."""
    from optserve.server import Server

    srvs = [Server(port=0, checkpoint_dir=d) for d in checkpoint_dirs]
    try:
        yield srvs
    finally:
        for s in srvs:
            s.stop(grace=1.0)


# The shard tests' clients, over the module's own `servers` fixture (three shard servers and one
# for the whole model: tests/test_shards.py, test_shards_sync.py, test_shards_noise.py).
@pytest.fixture(scope="module")
def targets(servers) -> list[str]:
    return [s.address for s in servers[:3]]


@pytest.fixture(scope="module")
def sharded_client(targets) -> Iterator:
    from optserve.client import Client

    with Client(targets, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def whole_client(servers) -> Iterator:
    with servers[3].client(timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server) -> Iterator:
    with server.client(timeout=60.0) as c:
        yield c


_counter = iter(range(1_000_000))


@pytest.fixture
def model_name(request) -> str:
    """A model name unique within the session."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:80]
    return f"{base}-{next(_counter)}"


def start_server_process(*args: str, env: dict | None = None, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Starts `optserve serve --port 0 ...` and waits (bounded) for its 'listening on' line."""
    proc, address, _ = _start(list(args), env, timeout)
    return proc, address


def start_server_with_metrics(
    *args: str, env: dict | None = None, timeout: float = 120.0, keep_stderr: bool = True
) -> tuple[subprocess.Popen, str, int]:
    """`start_server_process` with `--metrics-port 0`: (process, address, metrics port), the port read
    from the line the server prints before it listens. keep_stderr=False: its log goes nowhere (a
    test that makes it log many lines and never reads them must not fill the pipe)."""
    return _start(["--metrics-port", "0", *args], env, timeout, keep_stderr)


def _start(
    args: list[str], env: dict | None, timeout: float, keep_stderr: bool = True
) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "optserve.server.cli", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if keep_stderr else subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    deadline, metrics_port = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
            continue
        if m := re.match(r"optserve metrics on \S+:(\d+)", line):
            metrics_port = int(m.group(1))
        if m := re.match(r"optserve listening on (\S+):(\d+)", line):
            return proc, f"{m.group(1)}:{m.group(2)}", metrics_port
    proc.kill()
    raise TimeoutError("server did not print its listening line in time")


def assert_same_tree(a, b) -> None:
    """Two pulled pytrees of nested dicts hold the same arrays (dtype and values, bit for bit), in any
    key order (an uploaded model has no client-side structure: its order is the schema's)."""
    assert isinstance(a, dict) == isinstance(b, dict)
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            assert_same_tree(a[k], b[k])
    else:
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class ManualClock:
    """A stand-in for a module's `time` whose monotonic clock moves only when the test says so.

    Patched over the `time` of a module that runs a timer (sync rounds' `sync_timeout`, the gradient
    buffers' idle release), it lets a test decide when "enough time has passed" instead of betting
    that a loaded machine does its part before a real timer fires. `sleep` advances the clock at
    once; anything else is the real `time` module's.
    """

    def __init__(self, start: float = 1000.0):
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def manual_clock(monkeypatch):
    """`manual_clock(module)` replaces the module's `time` by a ManualClock (undone after the test)."""

    def install(module) -> ManualClock:
        clock = ManualClock()
        monkeypatch.setattr(module, "time", clock)
        return clock

    return install


def stop_server_process(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str]:
    """SIGTERM (the server finishes its calls and writes final checkpoints), then (exit status,
    stderr); a server that has not exited within `timeout` is killed, so no test leaves one behind."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    return proc.returncode, err or ""


def wait_until(predicate: Callable[[], object], what: str = "the condition", timeout: float = 60.0) -> None:
    """Polls a state the code exposes until `predicate()` holds. The bound is a safety net for a
    hang, not a bet on timing: tests wait for events, never for the clock."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
