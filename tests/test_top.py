"""`optserve top --once`: the real command (a subprocess) against a server under training shows the
page's headlines; a missing token or an unreachable page is one line and exit status 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from optserve.client import optim
from optserve.server import Server
from optserve.server.api.auth import Token

G = {"w": np.ones(4, np.float32)}


@pytest.fixture(scope="module")
def srv():
    s = Server(port=0, status_port=0, tokens=[Token(b"top-secret", None)])
    with s.client(token="top-secret", timeout=60) as c:
        m = c.create_model("watched", {"w": np.zeros(4, np.float32)}, optim.sgd(0.1))
        for name in ("trainer-0", "trainer-1"):
            w = m.worker(name)
            for _ in range(2):
                w.push(G)
    yield s
    s.stop(grace=1.0)


def top(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}  # wide enough that no column is cut
    return subprocess.run(
        [sys.executable, "-m", "optserve.server.cli", "top", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_once_prints_the_models_and_workers(srv, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("top-secret\n")
    done = top("--url", f"http://127.0.0.1:{srv.status_port}", "--token-file", str(tokens), "--once")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "optserve" in out and "1 models" in out
    line = next(line for line in out.splitlines() if "watched" in line and "async" in line)
    assert " 4 " in line, line  # its step
    assert "workers of watched" in out and "trainer-0" in out and "trainer-1" in out


def test_without_a_token_it_says_so(srv):
    done = top("--url", f"http://127.0.0.1:{srv.status_port}", "--once")
    assert done.returncode == 1 and "HTTP 401" in done.stderr and "--token-file" in done.stderr, done.stderr


def test_an_unreachable_page_is_one_line():
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        done = top("--url", f"http://127.0.0.1:{s.getsockname()[1]}", "--once")
    assert done.returncode == 1 and "cannot reach it" in done.stderr and "--status-port" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_without_once_it_refreshes_in_place_until_interrupted(srv, monkeypatch):
    """The Live loop: frames replace each other on a terminal; Ctrl-C (here: the third fetch) ends it
    with status 0. time.sleep is skipped: the loop's pace is not what is tested."""
    import argparse
    import io

    from rich.console import Console

    from optserve.server import top as top_module

    fetched = []
    real_fetch = top_module.fetch

    def fetch(url, token, timeout=10.0):
        if len(fetched) == 2:
            raise KeyboardInterrupt
        fetched.append(real_fetch(url, token, timeout))
        return fetched[-1]

    monkeypatch.setattr(top_module, "fetch", fetch)
    monkeypatch.setattr(top_module.time, "sleep", lambda s: None)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    args = argparse.Namespace(url=f"http://127.0.0.1:{srv.status_port}", token_file=None, interval=2.0, model=None)
    args.once = False
    monkeypatch.setattr(top_module, "_token", lambda path: "top-secret")
    assert top_module.run(args, console) == 0
    assert len(fetched) == 2 and "watched" in out.getvalue()
    assert "\x1b[1A" in out.getvalue()  # cursor up: the second frame was drawn over the first
