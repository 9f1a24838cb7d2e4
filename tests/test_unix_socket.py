"""`optserve serve --unix-socket PATH` and `Server(unix_socket=PATH)`: a real server on a socket in a
tmp dir serves pushes and pulls, tokens and the admin commands as over TCP; the socket is owner-only
(even under umask 0), removed at SIGTERM and stop, a stale one (after SIGKILL) is replaced at the
next start, and one another server listens on is refused (server/optserve/server/unix_socket.py)."""

from __future__ import annotations

import argparse
import os
import re
import selectors
import socket
import stat
import subprocess
import sys
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from optserve.client import Client, OptserveError, PermissionDeniedError, UnauthenticatedError, optim
from optserve.server import Server
from optserve.server.api import auth as security
from optserve.server.core.errors import ConfigError
from tests.conftest import stop_server_process
from tests.test_security import pki  # noqa: F401 - the CA and certificates made for the TLS tests

SERVE = [sys.executable, "-m", "optserve.server.cli", "serve", "--checkpoint-dir", "", "--shutdown-grace", "2"]
CLI = [sys.executable, "-m", "optserve.server.cli"]
TOKENS = "admin-secret\nteam-a-secret  model-a\n"
W = {"w": np.arange(6, dtype=np.float32), "b": np.zeros(3, np.float32)}
G = {"w": np.ones(6, np.float32), "b": np.full(3, 2.0, np.float32)}


def _serve(*args: str, log, umask: int | None = None, timeout: float = 120.0) -> tuple[subprocess.Popen, dict]:
    """Starts `optserve serve ARGS` and reads its 'listening on' lines until the socket's, bounded
    (the lines come once the server accepts calls). Returns the process and {"tcp": HOST:PORT,
    "unix": unix:///PATH} (what it printed)."""
    proc = subprocess.Popen(
        [*SERVE, *args],
        stdout=subprocess.PIPE,
        stderr=log,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )
    found: dict[str, str] = {}
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while "unix" not in found:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                proc.kill()
                proc.wait(30)
                raise TimeoutError("the server printed no 'listening on unix:' line")
            data = os.read(proc.stdout.fileno(), 4096)  # unbuffered: select sees what is left
            if not data:
                proc.wait(30)
                raise RuntimeError(f"server exited {proc.returncode}")
            seen += data
            for line in seen.decode().split("\n")[:-1]:  # whole lines only
                if m := re.match(r"optserve listening on (unix:///\S+)$", line.strip()):
                    found["unix"] = m.group(1)
                elif m := re.match(r"optserve listening on (\S+:\d+)$", line.strip()):
                    found["tcp"] = m.group(1)
    return proc, found


def _assert_private_socket(path: str) -> None:
    info = os.lstat(path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
    assert info.st_uid == os.getuid()
    # the private directory grpc bound in is gone
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".optserve-")]


def _health(target: str) -> str:
    r = subprocess.run([*CLI, "health", "--target", target], capture_output=True, text=True, timeout=60)
    return r.stdout.strip() or r.stderr.strip()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One `optserve serve` on TCP and a Unix socket, with tokens."""
    d = tmp_path_factory.mktemp("uds")
    (d / "tokens").write_text(TOKENS)
    path = str(d / "optserve.sock")
    with open(d / "server.log", "w") as log:  # the child keeps its own copy of the descriptor
        proc, found = _serve("--port", "0", "--unix-socket", path, "--token-file", str(d / "tokens"), log=log)
    assert found["unix"] == f"unix://{path}" and "tcp" in found
    yield {"path": path, "dir": d, **found}
    rc, _ = stop_server_process(proc)
    assert rc == 0, (d / "server.log").read_text()[-3000:]
    assert not os.path.exists(path)  # removed at SIGTERM


def test_push_pull_and_push_pull_over_the_socket(live):
    with Client(live["unix"], token="admin-secret", timeout=60) as c:
        m = c.create_model("roundtrip", W, optim.sgd(0.5))
        assert m.push(G) == 1
        np.testing.assert_array_equal(m.pull()["w"], W["w"] - 0.5)
        out = m.push_pull(G)
        np.testing.assert_array_equal(out["w"], W["w"] - 1.0)
        np.testing.assert_array_equal(out["b"], -2.0 * np.ones(3, np.float32))
        worker = m.worker("w0")
        worker.push(G, wire_dtype="bfloat16")
        assert m.info()["step"] == 3
    with Client(live["tcp"], token="admin-secret", timeout=60) as c:  # one server behind both listeners
        np.testing.assert_array_equal(c.model("roundtrip").pull()["w"], W["w"] - 1.5)


def test_tokens_apply_as_on_tcp(live):
    with Client(live["unix"], token="admin-secret", timeout=60) as admin:
        admin.create_model("model-a", W, optim.sgd(0.1))
        admin.create_model("model-b", W, optim.sgd(0.1))
    for token in (None, "wrong-secret"):
        with Client(live["unix"], token=token, timeout=60) as c, pytest.raises(UnauthenticatedError):
            c.list_models()
    with Client(live["unix"], token="team-a-secret", timeout=60) as c:
        with pytest.raises(PermissionDeniedError, match="model-b"):
            c.model("model-b").push(G)
        assert c.model("model-a").push(G) == 1
        assert [m["name"] for m in c.list_models()] == ["model-a"]


def test_the_socket_is_owner_only(live):
    _assert_private_socket(live["path"])


def test_admin_commands_over_the_socket(live):
    assert _health(live["unix"]) == "SERVING"  # the health service needs no token
    with Client(live["unix"], token="admin-secret", timeout=60) as c:
        c.create_model("listed", W, optim.sgd(0.1))
    r = subprocess.run(
        [*CLI, "ls", "--target", live["unix"], "--token-file", str(live["dir"] / "tokens")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "listed" in r.stdout


def test_a_socket_another_server_listens_on_is_refused(live):
    before = os.lstat(live["path"]).st_ino
    r = subprocess.run(
        [*SERVE, "--port", "0", "--unix-socket", live["path"]], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("optserve serve: error: --unix-socket "), r.stderr
    assert "another server is listening" in lines[0]
    assert os.lstat(live["path"]).st_ino == before
    assert _health(live["unix"]) == "SERVING"


def test_sigkill_leaves_a_stale_socket_the_next_start_replaces(tmp_path):
    path = str(tmp_path / "s.sock")
    with open(tmp_path / "first.log", "w") as log:
        proc, found = _serve("--no-tcp", "--unix-socket", path, log=log)
    assert set(found) == {"unix"}  # --no-tcp: no TCP line
    proc.kill()
    proc.wait(60)
    stale = os.lstat(path)
    assert stat.S_ISSOCK(stale.st_mode)  # nobody removed it
    with open(tmp_path / "second.log", "w") as log:
        proc, _ = _serve("--no-tcp", "--unix-socket", path, log=log, umask=0)
    try:
        assert os.lstat(path).st_ino != stale.st_ino
        _assert_private_socket(path)  # 0600 even under umask 0
        assert _health(f"unix://{path}") == "SERVING"
    finally:
        rc, _ = stop_server_process(proc)
    assert rc == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert not os.path.exists(path)


def test_a_path_that_is_not_a_socket_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    r = subprocess.run([*SERVE, "--no-tcp", "--unix-socket", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "--unix-socket" in r.stderr and "not a socket" in r.stderr
    assert path.read_text() == "mine"


def test_embedded_server_on_a_socket(tmp_path):
    path = str(tmp_path / "e.sock")
    with Server(port=None, unix_socket=path) as srv:
        assert srv.port is None and srv.addresses == [f"unix://{path}"] == [srv.address]
        _assert_private_socket(path)
        with srv.client(timeout=60) as c:
            m = c.create_model("embedded", W, optim.adam(0.1))
            out = m.push_pull(G)
            assert out["w"].shape == (6,) and m.info()["step"] == 1
        with pytest.raises(ConfigError, match="another server is listening"):
            Server(port=None, unix_socket=path)
        assert os.path.exists(path)
    assert not os.path.exists(path)
    with pytest.raises(ConfigError, match="nothing to listen on"):
        Server(port=None)


def test_embedded_server_on_tcp_and_a_socket_with_tls(tmp_path, pki):  # noqa: F811 - the fixture imported above
    args = argparse.Namespace(
        token_file=None, tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=None
    )
    path = str(tmp_path / "t.sock")
    with Server(port=0, unix_socket=path, **security.server_options(args)) as srv:
        tcp, unix = srv.addresses
        assert srv.address == tcp == f"127.0.0.1:{srv.port}" and unix == f"unix://{path}"
        # the certificate names localhost, grpc's authority for a unix: target
        with Client(unix, tls=pki["ca"], timeout=60) as c:
            c.create_model("tls", W, optim.sgd(0.5))
        with Client(tcp, tls=pki["ca"], timeout=60) as c:
            assert c.model("tls").info()["step"] == 0
        with Client(unix, timeout=60) as c, pytest.raises(OptserveError) as e:  # plaintext gets nowhere
            c.list_models()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_unix_target_needs_an_absolute_path():
    with pytest.raises(ValueError, match="three slashes"):
        Client("unix://tmp/optserve.sock")


def test_grpc_alone_would_replace_a_live_socket(tmp_path):
    """Why unix_socket.py checks first and binds in a private directory: grpc's own bind unlinks a
    socket another process listens on (and makes the new one with the process's umask)."""
    path = str(tmp_path / "g.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(path)
        other.listen()
        before = os.lstat(path).st_ino
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        try:
            assert server.add_insecure_port(f"unix:{path}")
            assert os.lstat(path).st_ino != before
        finally:
            server.stop(None)
