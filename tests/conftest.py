"""Shared fixtures: a real server on 127.0.0.1 per test module, and helpers for server subprocesses."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server() -> Iterator:
    """One in-process server per test module (127.0.0.1, a free port)."""
    from optserve.server import Server

    srv = Server(port=0)
    yield srv
    srv.stop(grace=1.0)


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


def start_server_process(*args: str, env: dict | None = None, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Starts `optserve serve --port 0 ...` and waits (bounded) for its 'listening on' line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "optserve.server.cli", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read()}")
            continue
        m = re.match(r"optserve listening on (\S+):(\d+)", line)
        if m:
            return proc, f"{m.group(1)}:{m.group(2)}"
    proc.kill()
    raise TimeoutError("server did not print its listening line in time")
