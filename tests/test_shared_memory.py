"""Shared-memory tensors (docs/design.md, "Shared memory"): real servers on 127.0.0.1 with
`--shared-memory`, clients in this process and in subprocesses. Results equal the byte stream's;
bad spans, keys and regions are refused with nothing changed; a client or server killed with SIGKILL
leaves no fd, mapping or /dev/shm entry behind in the process that survives."""

from __future__ import annotations

import fcntl
import gc
import logging
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import jax
import numpy as np
import pytest

from optserve.client import Client, Init, Rows, optim
from optserve.client.errors import InvalidArgumentError, OptserveError, PermissionDeniedError
from optserve.server import Server
from optserve.server.api.auth import Token
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.shared_memory import abstract_address, receive_message, send_message
from tests.conftest import assert_same_tree, start_server_process, stop_server_process, wait_until
from tests.test_unix_socket import _serve

RNG = np.random.default_rng(0)
W = {
    "w": RNG.normal(size=(64, 32)).astype(np.float32),
    "b": np.zeros(32, np.float32),
    "steps": np.arange(4, dtype=np.int32),
}


def _grads(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(64, 32)).astype(np.float32),
        "b": rng.normal(size=32).astype(np.float32),
        "steps": np.zeros(4, np.int32),
    }


def _memfd_fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "memfd:" in target:
            out.append(target)
    return out


def _memfd_maps() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if "memfd:optserve" in line]


@pytest.fixture(scope="module")
def srv():
    with Server(port=0, shared_memory=True) as s:
        yield s


@pytest.fixture(scope="module")
def shm(srv):
    with Client(srv.address, timeout=60, shared_memory_min_bytes=0) as c:
        yield c


@pytest.fixture(scope="module")
def plain(srv):
    with Client(srv.address, timeout=60, shared_memory=False) as c:
        yield c


def _used(srv: Server) -> int:
    assert srv.shared_memory is not None
    return srv.shared_memory.regions.spans_used


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_results_equal_the_byte_stream(srv, shm, plain, model_name, mode):
    a = shm.create_model(f"{model_name}-shm", W, optim.adam(0.01), mode=mode, workers=1 if mode == "sync" else None)
    b = plain.create_model(f"{model_name}-tcp", W, optim.adam(0.01), mode=mode, workers=1 if mode == "sync" else None)
    used = _used(srv)
    for seed, wire in enumerate((None, "bfloat16", "float16")):
        assert a.push(_grads(seed), wire_dtype=wire) == b.push(_grads(seed), wire_dtype=wire)
        assert_same_tree(a.pull(wire_dtype=wire), b.pull(wire_dtype=wire))
        assert_same_tree(
            a.push_pull(_grads(seed + 10), wire_dtype=wire), b.push_pull(_grads(seed + 10), wire_dtype=wire)
        )
    out = a.pull()
    w = out["w"]
    assert a.pull(out=out) is out and out["w"] is w  # filled in place
    assert_same_tree(out, b.pull())
    assert _used(srv) >= used + 10  # every call above but the first pull went through the region
    wa, wb = a.worker("w0"), b.worker("w0")
    assert_same_tree(wa.push_pull(_grads(5)), wb.push_pull(_grads(5)))
    assert a.info()["step"] == b.info()["step"] == 7


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_row_sparse_pushes_and_row_pulls_equal_the_byte_stream(srv, shm, plain, model_name, mode):
    """An embedding table under lazy_adam: Rows pushes (ids in the header, the rows in the region)
    and row pulls give what the byte stream gives, bit for bit."""
    table = {"embed": Init((4096, 16), "float32", "normal", stddev=0.1, seed=3), "b": np.zeros(16, np.float32)}
    spec = {
        "partition": [
            {"params": ["embed"], "optimizer": {"lazy_adam": {"learning_rate": 0.01}}},
            {"params": "**", "optimizer": {"adam": {"learning_rate": 0.01}}},
        ]
    }
    sync = {"mode": mode, "workers": 1} if mode == "sync" else {}
    a = shm.create_model(f"{model_name}-shm", table, spec, **sync)
    b = plain.create_model(f"{model_name}-tcp", table, spec, **sync)
    used = _used(srv)
    rng = np.random.default_rng(0)
    for _ in range(3):
        ids = rng.integers(0, 4096, 600).astype(np.int64)  # repeats among them
        grads = {"embed": Rows(ids, rng.normal(size=(600, 16)).astype(np.float32)), "b": np.ones(16, np.float32)}
        assert a.push(grads) == b.push(grads)
        want = {"embed": ids[:300]}
        assert_same_tree(a.pull_rows(want), b.pull_rows(want))
    assert _used(srv) > used  # the rows went through the region
    assert_same_tree(a.pull(), b.pull())


def test_a_retried_push_is_a_duplicate(shm, model_name):
    m = shm.create_model(model_name, W, optim.sgd(0.1))
    leaves = m._grad_leaves(_grads(1), None)
    header = m._push_header(None, None, worker_id="w", seq=1)
    first = m.push_raw(header, leaves)
    again = m.push_raw(header, leaves)  # the same (worker_id, seq): answered, not applied
    assert again.duplicate and again.step == first.step == 1 and not header.HasField("shared_memory")
    assert m.info()["step"] == 1


def test_checkpoints_while_pushing(tmp_path, model_name):
    with (
        Server(port=0, shared_memory=True, checkpoint_dir=str(tmp_path)) as s,
        Client(s.address, timeout=60, shared_memory_min_bytes=0) as c,
    ):
        m = c.create_model(model_name, W, optim.adam(0.01))
        m.push(_grads(0))
        saved = m.pull()
        assert m.save() == 1
        m.push(_grads(1))
        assert m.restore(1) == 1
        assert_same_tree(m.pull(), saved)
        assert s.shared_memory is not None and s.shared_memory.regions.spans_used >= 3


def test_sharded_models_negotiate_per_shard(model_name):
    servers = [Server(port=0, shared_memory=True) for _ in range(2)]
    targets = [s.address for s in servers]
    try:
        with Client(targets, timeout=60, shared_memory_min_bytes=0) as c, Client(targets, shared_memory=False) as p:
            sm = c.create_model(f"{model_name}-shm", W, optim.adam(0.01), split_bytes=1024)
            pm = p.create_model(f"{model_name}-tcp", W, optim.adam(0.01), split_bytes=1024)
            for seed in range(2):
                assert_same_tree(sm.push_pull(_grads(seed)), pm.push_pull(_grads(seed)))
            assert_same_tree(sm.pull(wire_dtype="bfloat16"), pm.pull(wire_dtype="bfloat16"))
        assert all(s.shared_memory is not None and s.shared_memory.regions.spans_used >= 2 for s in servers)
    finally:
        for s in servers:
            s.stop(grace=1.0)


def test_without_shared_memory_the_client_says_so_once_and_uses_the_byte_stream(model_name, caplog):
    with Server(port=0) as s, Client(s.address, timeout=60, shared_memory_min_bytes=0) as c:
        m = c.create_model(model_name, W, optim.sgd(0.1))
        with caplog.at_level(logging.INFO, logger="optserve.client"):
            m.push(_grads(0))
            m.push_pull(_grads(1))
        said = [r.message for r in caplog.records if "shared memory not used" in r.message]
        assert len(said) == 1 and "--shared-memory" in said[0]
        assert c.server_info()["shared_memory_socket"] == "" and m.info()["step"] == 2


# -- refusals: clear errors, nothing changed, the server keeps serving ------------------------------


def _raw_push(m, span: pb.SharedMemorySpan, slices: list[pb.TensorSlice]) -> pb.PushResponse:
    msg = pb.PushRequest(header=pb.PushHeader(model=m.name, shared_memory=span), slices=slices)
    return m.client.call(m.client._push_one, msg.SerializeToString())


def _slices(grads: dict) -> list[pb.TensorSlice]:
    return [
        pb.TensorSlice(path=k, dtype=str(v.dtype), shape=v.shape, offset=0, length=v.nbytes) for k, v in grads.items()
    ]


def test_bad_spans_keys_and_regions_are_refused(srv, shm, model_name):
    m = shm.create_model(model_name, W, optim.sgd(0.1))
    m.push(_grads(0))  # registers the region
    region = shm.shared_memory._region
    assert region is not None
    g = _grads(1)
    need = sum(v.nbytes for v in g.values())
    span = pb.SharedMemorySpan(session=region.session, region=region.id, offset=0, length=need)
    with pytest.raises(PermissionDeniedError, match="unknown session key"):
        _raw_push(m, pb.SharedMemorySpan(session="0" * 32, region=region.id, offset=0, length=need), _slices(g))
    with pytest.raises(PermissionDeniedError, match="region 99 is not one of this session's"):
        _raw_push(m, pb.SharedMemorySpan(session=region.session, region=99, offset=0, length=need), _slices(g))
    with pytest.raises(InvalidArgumentError, match=rf"model '{model_name}'.*outside region"):
        _raw_push(
            m,
            pb.SharedMemorySpan(session=region.session, region=region.id, offset=region.size - 8, length=need),
            _slices(g),
        )
    with pytest.raises(InvalidArgumentError, match=rf"model '{model_name}': leaf 'b'.*past the {need - 20}"):
        _raw_push(
            m, pb.SharedMemorySpan(session=region.session, region=region.id, offset=0, length=need - 20), _slices(g)
        )
    req = pb.PullRequest(
        model=m.name, shared_memory=pb.SharedMemorySpan(session=region.session, region=region.id, length=100)
    )
    with pytest.raises(InvalidArgumentError, match=rf"model '{model_name}': leaf 'b' does not fit"):
        m.client.call(m.client._pull_one, req)
    assert m.info()["step"] == 1  # nothing applied
    assert (
        _raw_push(
            m,
            span,
            _slices(
                {"w": np.zeros((64, 32), np.float32), "b": np.zeros(32, np.float32), "steps": np.zeros(4, np.int32)}
            ),
        ).step
        == 2
    )
    with Client(srv.address, timeout=60, shared_memory_min_bytes=0) as other:
        om = other.model(model_name)
        om.push(_grads(2))
        theirs = other.shared_memory._region
        assert theirs is not None and theirs.session != region.session
        # another client's region: named with this client's key, it is not one of this session's
        if theirs.id != region.id:
            with pytest.raises(PermissionDeniedError, match="not one of this session's"):
                _raw_push(
                    m, pb.SharedMemorySpan(session=region.session, region=theirs.id, offset=0, length=need), _slices(g)
                )
    assert m.info()["step"] == 3


def _side(srv) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(30)
    s.connect(abstract_address(srv.shared_memory.name))
    return s


def _register(sock: socket.socket, fd: int, size: int) -> dict:
    send_message(sock, {"op": "register", "size": size}, [fd])
    answer, _ = receive_message(sock)
    assert answer is not None
    return answer


def test_regions_the_server_must_not_map_are_refused(srv):
    with _side(srv) as s:
        send_message(s, {"op": "hello", "token": ""})
        hello, _ = receive_message(s)
        assert hello and hello["ok"]
        fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, 1 << 16)
            os.posix_fallocate(fd, 0, 1 << 16)
            assert "not sealed" in _register(s, fd, 1 << 16)["error"]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)  # may still shrink
            assert "not sealed" in _register(s, fd, 1 << 16)["error"]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            assert "declared 1048576" in _register(s, fd, 1 << 20)["error"]
            assert _register(s, fd, 1 << 16)["ok"]
        finally:
            os.close(fd)
        sparse = os.memfd_create("t", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(sparse, 1 << 16)
            fcntl.fcntl(sparse, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
            assert "not allocated" in _register(s, sparse, 1 << 16)["error"]
        finally:
            os.close(sparse)
        with tempfile.TemporaryFile() as f:
            f.truncate(1 << 16)
            assert "not a memfd" in _register(s, f.fileno(), 1 << 16)["error"]
    assert srv.shared_memory.regions.wait_closed(hello["session"], 60)
    # every fd it was sent was closed, mapped or not (this test's memfds are named "t")
    assert not [f for f in _memfd_fds() if f.startswith("/memfd:t ")]


def test_the_token_is_required_when_the_server_has_one(model_name, caplog):
    with Server(port=0, shared_memory=True, tokens=[Token(b"secret", None)]) as s:
        with _side(s) as side:
            send_message(side, {"op": "hello", "token": "wrong"})
            answer, _ = receive_message(side)
            assert answer is not None and answer["error"] == "unknown token"
        with Client(s.address, token="secret", timeout=60, shared_memory_min_bytes=0) as c:
            m = c.create_model(model_name, W, optim.sgd(0.1))
            m.push(_grads(0))
            assert s.shared_memory is not None and s.shared_memory.regions.spans_used == 1


# -- kill -9 ------------------------------------------------------------------------------------

CHILD = """
import sys, numpy as np
from optserve.client import Client
target, name, point = sys.argv[1:4]
c = Client(target, timeout=60, shared_memory_min_bytes=0)
m = c.model(name)
m.push({"w": np.ones((64, 32), np.float32), "b": np.ones(32, np.float32), "steps": np.zeros(4, np.int32)})
if point == "mid-push":  # a gradient half written into the region, never announced
    with c.shared_memory.region(1) as region:
        region.array[: 4096] = 0x7F
        print(point, flush=True)
        sys.stdin.read()  # parked here until the test kills it (no clock)
print(point, flush=True)
sys.stdin.read()  # parked here until the test kills it (no clock)
"""


@pytest.mark.parametrize("point", ["registered", "mid-push"])
def test_a_killed_client_leaves_nothing_in_the_server(srv, shm, model_name, point):
    shm.create_model(model_name, W, optim.sgd(0.1))
    # The module's client connects its side socket on its first push; pushing here (to another
    # model) makes this test independent of the tests that ran before it.
    shm.create_model(f"{model_name}-connected", W, optim.sgd(0.1)).push(_grads(0))
    wait_until(lambda: srv.shared_memory.connections == 1, "only the module's client to be connected")
    assert srv.shared_memory.regions.wait_sessions(1, 60)
    shm_entries = set(os.listdir("/dev/shm"))
    maps, memfds = len(_memfd_maps()), _memfd_fds()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, srv.address, model_name, point],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        said, _, _ = select.select([child.stdout], [], [], 300)  # bounded: a hang, not a timing bet
        assert said and child.stdout.readline().strip() == point
        assert srv.shared_memory.regions.session_count == 2 and len(_memfd_maps()) == maps + 1
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(60)
    assert srv.shared_memory.regions.wait_sessions(1, 60)
    wait_until(lambda: srv.shared_memory.connections == 1, "the killed client's side connection to close")
    gc.collect()
    assert len(_memfd_maps()) == maps and _memfd_fds() == memfds
    assert set(os.listdir("/dev/shm")) == shm_entries
    m = shm.model(model_name)
    assert m.info()["step"] == 1  # the half-written push was never applied
    m.push(_grads(0))  # the server keeps serving
    assert m.info()["step"] == 2


@pytest.mark.parametrize("point", ["registered", "mid-push"])
def test_a_killed_server_leaves_nothing_in_the_client(tmp_path, point):
    shm_entries, maps, memfds = set(os.listdir("/dev/shm")), len(_memfd_maps()), _memfd_fds()
    with open(tmp_path / "server.log", "w") as log:
        proc, found = _serve("--port", "0", "--unix-socket", str(tmp_path / "s.sock"), "--shared-memory", log=log)
    c = Client(found["tcp"], timeout=60, shared_memory_min_bytes=0)
    try:
        m = c.create_model("k", W, optim.sgd(0.1), mode="sync", workers=3)
        m.push(_grads(0), base_step=0)  # registers; the round waits for two more contributions
        assert len(_memfd_maps()) == maps + 1 and c.shared_memory is not None and c.shared_memory._sock is not None
        failed: list[BaseException] = []
        call = threading.Thread(target=lambda: _catch(failed, lambda: m.push_pull(_grads(1), base_step=0)))
        if point == "mid-push":  # a PushPull counted and waiting for its round, its region lent out
            call.start()
            wait_until(lambda: m.info()["pending_contributions"] == 2, "the PushPull to wait for its round")
        proc.kill()
        proc.wait(60)
        if point == "mid-push":
            call.join(120)
            assert not call.is_alive() and failed and isinstance(failed[0], OptserveError)
        with pytest.raises(OptserveError):
            m.push(_grads(2), base_step=0)  # finds the side socket hung up: unmaps, closes
        gc.collect()
        assert len(_memfd_maps()) == maps and _memfd_fds() == memfds and c.shared_memory._sock is None
        assert set(os.listdir("/dev/shm")) == shm_entries
    finally:
        c.close()
        if proc.poll() is None:
            stop_server_process(proc)


def _catch(into: list, fn) -> None:
    try:
        fn()
    except BaseException as e:
        into.append(e)


def test_mmap_of_a_sealed_memfd_survives_its_fd():
    """Why neither side keeps a region's fd: the mapping alone keeps the memory."""
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    m = mmap.mmap(fd, 4096)
    os.close(fd)
    m[:4] = b"abcd"
    assert m[:4] == b"abcd"
    m.close()


def test_too_little_shared_memory_falls_back_to_the_byte_stream(srv, model_name, monkeypatch, caplog):
    """A container whose shared memory cannot hold the region: said once, the byte stream instead."""
    import optserve.client.shared_memory as client_shm

    def no_room(fd: int, offset: int, size: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(client_shm.os, "posix_fallocate", no_room)
    used = _used(srv)
    with Client(srv.address, timeout=60, shared_memory_min_bytes=0) as c, caplog.at_level(logging.INFO):
        m = c.create_model(model_name, W, optim.sgd(0.1))
        m.push(_grads(0))
        m.push(_grads(1))
        assert m.info()["step"] == 2
    said = [r.message for r in caplog.records if "shared memory not used" in r.message]
    assert len(said) == 1 and "No space left on device" in said[0]
    assert _used(srv) == used


@pytest.mark.parametrize(
    "field, value, why",
    [("uid", os.getuid() + 1, "runs as uid"), ("host_id", "another-boot-id", "another host")],
)
def test_another_uid_or_host_falls_back_to_the_byte_stream(srv, model_name, caplog, field, value, why):
    used = _used(srv)
    with Client(srv.address, timeout=60, shared_memory_min_bytes=0) as c, caplog.at_level(logging.INFO):
        assert c.shared_memory is not None
        ask = c.shared_memory._server_info

        def elsewhere() -> pb.ServerInfo:  # what a server of another uid or host would say
            info = ask()
            setattr(info, field, value)
            return info

        c.shared_memory._server_info = elsewhere
        m = c.create_model(model_name, W, optim.sgd(0.1))
        assert_same_tree(m.push_pull(_grads(0)), m.pull())
        m.push(_grads(1))
    said = [r.message for r in caplog.records if "shared memory not used" in r.message]
    assert len(said) == 1 and why in said[0]
    assert _used(srv) == used


def test_a_session_the_server_forgot_falls_back_and_negotiates_again(srv, model_name):
    with Client(srv.address, timeout=60, shared_memory_min_bytes=0) as c:
        m = c.create_model(model_name, W, optim.sgd(0.1))
        m.push(_grads(0))
        assert c.shared_memory is not None and c.shared_memory._region is not None
        key = c.shared_memory._region.session
        regions = srv.shared_memory.regions
        regions.close_session(regions._sessions[key])  # as if the server had restarted under the client
        m.push(_grads(1))  # PERMISSION_DENIED before anything was applied: resent over the byte stream
        assert m.info()["step"] == 2 and c.shared_memory._region is None
        used = _used(srv)
        m.push(_grads(2))  # a new session
        assert _used(srv) == used + 1 and c.shared_memory._region.session != key and m.info()["step"] == 3


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a peer as another uid")
def test_a_peer_of_another_uid_is_refused_by_the_kernel_s_word(srv):
    """SO_PEERCRED: the uid is the kernel's, whatever the peer says."""
    code = (
        "import os, socket, sys, json\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.settimeout(30)\n"
        "s.connect('\\0' + sys.argv[1])\n"
        "s.send(json.dumps({'op': 'hello', 'token': ''}).encode())\n"
        "print(s.recv(4096).decode())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, srv.shared_memory.name[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert '"ok": false' in r.stdout and "uid 65534 is not the server's uid" in r.stdout


def test_a_model_over_several_devices(model_name):
    """Buffers split over a mesh (padded where a leaf does not divide): pushed into and pulled out
    of the region as over the byte stream (docs/design.md, "Devices and meshes")."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc, address = start_server_process("--devices", "all", "--shared-memory", "--checkpoint-dir", "", env=env)
    params = {**W, "odd": np.linspace(0, 1, 1001, dtype=np.float32), "big": np.ones((513, 64), np.float32)}

    def grads(seed: int) -> dict:
        rng = np.random.default_rng(seed)
        out = {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in params.items()}
        out["steps"] = np.zeros(4, np.int32)
        return out

    try:
        with (
            Client(address, timeout=120, shared_memory_min_bytes=0) as c,
            Client(address, timeout=120, shared_memory=False) as p,
        ):
            assert c.server_info()["devices"] == ["cpu:0", "cpu:1"]
            a = c.create_model(f"{model_name}-shm", params, optim.adam(0.01))
            b = p.create_model(f"{model_name}-tcp", params, optim.adam(0.01))
            for seed, wire in enumerate((None, "bfloat16")):
                assert_same_tree(a.push_pull(grads(seed), wire_dtype=wire), b.push_pull(grads(seed), wire_dtype=wire))
            assert_same_tree(a.pull(), b.pull())
            assert c.shared_memory is not None and c.shared_memory._region is not None
    finally:
        stop_server_process(proc)


# -- region-backed arrays (Worker.shared_arrays; client/shared_arrays.py) ---------------------------

# A large leaf sent alone, small ones the server packs (docs/design.md, "Packed layouts"), an int leaf.
P = {
    "big": RNG.normal(size=(300, 256)).astype(np.float32),
    "small": [RNG.normal(size=16).astype(np.float32) for _ in range(6)],
    "steps": np.arange(4, dtype=np.int32),
}


def _p_grads(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "big": rng.normal(size=(300, 256)).astype(np.float32),
        "small": [rng.normal(size=16).astype(np.float32) for _ in range(6)],
        "steps": np.zeros(4, np.int32),
    }


def _fill(into: dict, values: dict) -> None:
    into["big"][...] = values["big"]
    for a, v in zip(into["small"], values["small"], strict=True):
        a[...] = v
    into["steps"][...] = values["steps"]


def _leaves(tree: dict) -> list[np.ndarray]:
    return [tree["big"], *tree["small"], tree["steps"]]


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_region_backed_arrays_equal_the_byte_stream_and_are_not_copied_by_the_client(srv, plain, model_name, mode):
    """A pull and push_pull `out=` the region-backed params is written by the server where they lie,
    the gradient filled in place into the region-backed grads is sent from there; the parameters
    equal the byte stream's bit for bit, and the connection's own region is never needed."""
    sync = {"mode": mode, "workers": 1 if mode == "sync" else None}
    with Client(srv.address, timeout=60) as c:
        a = c.create_model(f"{model_name}-shm", P, optim.adam(0.01), **sync)
        b = plain.create_model(f"{model_name}-tcp", P, optim.adam(0.01), **sync)
        assert a.info()["packing"], "the small leaves should be packed"
        wa, wb = a.worker("w0"), b.worker("w0")
        grads, params = wa.shared_arrays()
        before = [x.copy() for x in _leaves(params)]
        assert wa.pull(out=params) is params
        assert_same_tree(params, wb.pull())
        assert not all(np.array_equal(x, y) for x, y in zip(before, _leaves(params), strict=True))
        shm = c.shared_memory
        assert shm is not None and len(shm._dedicated) == 1
        region = shm._dedicated[0]
        assert all(region.holds(x) for x in _leaves(grads) + _leaves(params))
        for seed in range(3):
            _fill(grads, _p_grads(seed))
            used = _used(srv)
            assert wa.push_pull(grads, out=params) is params
            assert _used(srv) > used  # through shared memory
            assert_same_tree(params, wb.push_pull(_p_grads(seed)))
        _fill(grads, _p_grads(7))
        assert wa.push(grads) == wb.push(_p_grads(7))
        assert_same_tree(wa.pull(out=params), wb.pull())
        assert shm._region is None  # every call above went through the dedicated region alone
        assert a.info()["step"] == b.info()["step"] == 4


def _in_regions(srv: Server, address: int) -> bool:
    """Whether `address` lies in a region some session of `srv` has mapped."""
    assert srv.shared_memory is not None
    regions = srv.shared_memory.regions
    with regions._lock:
        spans = [(r.array.ctypes.data, r.size) for s in regions._sessions.values() for r in s.regions.values()]
    return any(base <= address < base + size for base, size in spans)


# One leaf of exactly EARLY_DEVICE_PUT_BYTES (core/receiving.py): put on the device by itself.
Z = {"big": np.zeros((512, 512), np.float32), "b": np.zeros(16, np.float32)}


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_the_update_reads_the_gradient_where_it_lies_in_the_region(srv, plain, model_name, monkeypatch, mode):
    """The server copies nothing out of the region: the gradient's leaves reach the update as the
    region's own memory (jax on CPU aliases it: the device buffer's pointer is in the region), and
    its buffer pool never keeps them; results equal the byte stream's."""
    from optserve.server.core.model import Model as ServerModel
    from optserve.server.core.round_sums import RoundSum

    sync = {"mode": mode, "workers": 1 if mode == "sync" else None}
    seen: list[dict] = []
    if mode == "async":
        apply = ServerModel._apply_locked

        def record(self, grads, scale, row_ids=None):
            seen.append(dict(grads))
            return apply(self, grads, scale, row_ids)

        monkeypatch.setattr(ServerModel, "_apply_locked", record)
    else:  # the round's sum reads the gradient; the update reads the sum
        add = RoundSum.add

        def record(self, grads, rows, weight):
            seen.append(dict(grads))
            return add(self, grads, rows, weight)

        monkeypatch.setattr(RoundSum, "add", record)
    with Client(srv.address, timeout=60) as c:
        a = c.create_model(f"{model_name}-shm", Z, optim.adam(0.01), **sync)
        b = plain.create_model(f"{model_name}-tcp", Z, optim.adam(0.01), **sync)
        rng = np.random.default_rng(5)
        g = {"big": rng.normal(size=(512, 512)).astype(np.float32), "b": rng.normal(size=16).astype(np.float32)}
        grads, params = a.shared_arrays()
        grads["big"][...], grads["b"][...] = g["big"], g["b"]
        assert a.push_pull(grads, out=params) is params
        assert_same_tree(params, b.push_pull(g))

        def read_in_place() -> int:  # the updates (sums) whose "big" was the region's memory
            return sum(
                isinstance(x["big"], jax.Array) and _in_regions(srv, x["big"].unsafe_buffer_pointer()) for x in seen
            )

        assert read_in_place() == 1
        assert a.push(g) == b.push(g)  # through the connection's region: its leaves are aligned too
        assert read_in_place() == 2
        assert_same_tree(a.pull(), b.pull())
        held = srv.store.get(a.name).gradient_buffers
        assert held.held_bytes() == 0  # no region view kept in the pool


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_region_written_after_the_reply_changes_nothing(srv, plain, model_name, monkeypatch, mode):
    """The server owns a pushed gradient's span until its reply, and has finished reading it then:
    when push and push_pull return, the update that read it has run (its outputs are ready: async)
    or the round's sum holds it (sync), so a client that overwrites its region at once changes
    nothing; the state equals the byte stream's with the original gradient."""
    from optserve.server.core.model import Model as ServerModel

    sync = {"mode": mode, "workers": 1 if mode == "sync" else None}
    commit = ServerModel.commit_push
    ready: list[bool] = []

    def check_ready(self, receiver, received):
        out = commit(self, receiver, received)
        if receiver.assembler.in_place and mode == "async":  # the step that read the region has run
            ready.append(all(x.is_ready() for x in jax.tree_util.tree_leaves(self._params)))
        return out

    monkeypatch.setattr(ServerModel, "commit_push", check_ready)
    with Client(srv.address, timeout=60) as c:
        a = c.create_model(f"{model_name}-shm", P, optim.adam(0.01), **sync)
        b = plain.create_model(f"{model_name}-tcp", P, optim.adam(0.01), **sync)
        grads, params = a.shared_arrays()
        for seed, call in enumerate(("push_pull", "push")):
            _fill(grads, _p_grads(seed))
            if call == "push":
                assert a.push(grads) == b.push(_p_grads(seed))
            else:
                assert a.push_pull(grads, out=params) is params
                assert_same_tree(params, b.push_pull(_p_grads(seed)))
            for x in _leaves(grads):  # scribbled over as soon as the call returns
                x[...] = np.nan if x.dtype.kind == "f" else 7
            assert_same_tree(a.pull(), b.pull())
        assert a.info()["step"] == b.info()["step"] == 2
        assert ready == ([True, True] if mode == "async" else [])


def test_nan_in_the_region_is_refused_naming_the_leaf(srv, model_name):
    """Checked where it lies: NaN or Inf in a region-backed gradient is INVALID_ARGUMENT naming the
    leaf (one sent alone, one inside a pack), and nothing is applied."""
    with Client(srv.address, timeout=60) as c:
        a = c.create_model(model_name, P, optim.adam(0.01))
        grads, params = a.shared_arrays()
        before = a.pull()
        for leaf, path in ((lambda g: g["big"], "big"), (lambda g: g["small"][3], "small/3")):
            _fill(grads, _p_grads(1))
            leaf(grads)[-1] = np.inf if path == "big" else np.nan
            used = _used(srv)
            with pytest.raises(InvalidArgumentError, match=f"leaf '{path}': gradient has NaN or Inf"):
                a.push_pull(grads, out=params)
            assert _used(srv) > used
        assert a.info()["step"] == 0
        assert_same_tree(a.pull(), before)


def test_region_backed_arrays_work_without_shared_memory(srv, plain, model_name):
    """Without shared memory they are plain arrays of the same shapes; region-backed arrays given to
    a connection that does not use shared memory go over the byte stream; results are the same."""
    a = plain.create_model(f"{model_name}-a", P, optim.sgd(0.1))
    grads, params = a.worker("w0").shared_arrays()
    assert plain.shared_memory is None and isinstance(grads["big"], np.ndarray)
    _fill(grads, _p_grads(3))
    assert a.push_pull(grads, out=params) is params
    assert_same_tree(params, a.pull())
    with Client(srv.address, timeout=60) as c, Server(port=0) as no_shm, Client(no_shm.address, timeout=60) as d:
        b = c.create_model(f"{model_name}-b", P, optim.sgd(0.1))
        shared_grads, shared_params = b.shared_arrays()  # region-backed, given to another connection's model
        _fill(shared_grads, _p_grads(3))
        a2 = plain.create_model(f"{model_name}-a2", P, optim.sgd(0.1))
        assert a2.push_pull(shared_grads, out=shared_params) is shared_params  # the byte stream, into them
        assert_same_tree(shared_params, params)
        e = d.create_model(f"{model_name}-e", P, optim.sgd(0.1))  # a server without shared memory
        g2, p2 = e.shared_arrays()
        _fill(g2, _p_grads(3))
        assert e.push_pull(g2, out=p2) is p2
        assert d.shared_memory is not None and d.shared_memory.unavailable
        assert_same_tree(p2, params)


def test_other_arrays_never_touch_the_region_backed_ones(srv, model_name):
    """Only `out=` the region-backed params writes them; a pull without out, a push of other arrays,
    another structure or a narrower wire dtype go through the connection's region (or convert)."""
    with Client(srv.address, timeout=60) as c:
        a = c.create_model(model_name, P, optim.sgd(0.1))
        grads, params = a.shared_arrays()
        a.pull(out=params)
        kept = [x.copy() for x in _leaves(params)]
        _fill(grads, _p_grads(4))
        a.push(_p_grads(5))  # not the region's arrays
        fresh = a.pull()
        assert not np.array_equal(fresh["big"], kept[0])
        assert all(np.array_equal(x, y) for x, y in zip(kept, _leaves(params), strict=True))
        bf16 = a.pull(wire_dtype="bfloat16", out=params)  # narrower on the wire: converted into them
        assert bf16 is params and np.allclose(params["big"], fresh["big"], rtol=1e-2)
        swapped = {"big": params["big"], "small": params["small"][::-1], "steps": params["steps"]}
        assert a.pull(out=swapped) is swapped  # arrays of the region, not at their places: still right
        assert_same_tree(swapped, fresh)  # each leaf by its path, wherever its array lies
        assert np.array_equal(grads["big"], _p_grads(4)["big"])  # the gradient arrays only read


def test_the_region_goes_when_its_arrays_go_and_comes_back_after_a_restart(srv, model_name):
    with Client(srv.address, timeout=60) as c:
        a = c.create_model(model_name, P, optim.sgd(0.1))
        shm = c.shared_memory
        grads, params = a.shared_arrays()
        assert shm is not None and len(shm._dedicated) == 1
        key = shm._dedicated[0].session
        regions = srv.shared_memory.regions
        regions.close_session(regions._sessions[key])  # as if the server had restarted under the client
        _fill(grads, _p_grads(0))
        a.push(grads)  # PERMISSION_DENIED before anything was applied: resent over the byte stream
        used = _used(srv)
        assert a.push_pull(grads, out=params) is params  # a new session, the region registered again
        assert _used(srv) > used and shm._dedicated[0].session not in ("", key)
        assert a.info()["step"] == 2
        del grads, params
        gc.collect()
        a.pull()  # any shared-memory call releases regions no array views
        assert shm._dedicated == []


def test_more_region_backed_arrays_than_the_server_maps_are_plain_memory(srv, model_name):
    """A session holds at most MAX_REGIONS_PER_SESSION regions: arrays beyond that are plain memory
    (their calls copy), and the connection keeps shared memory for everything else."""
    from optserve.server.core.shared_memory import MAX_REGIONS_PER_SESSION

    with Client(srv.address, timeout=60) as c:
        a = c.create_model(model_name, P, optim.sgd(0.1))
        kept = [a.shared_arrays() for _ in range(MAX_REGIONS_PER_SESSION + 1)]
        shm = c.shared_memory
        assert shm is not None and len(shm._dedicated) == MAX_REGIONS_PER_SESSION and not shm.unavailable
        grads, params = kept[-1]
        assert not any(r.holds(params["big"]) for r in shm._dedicated)
        _fill(grads, _p_grads(0))
        assert a.push_pull(grads, out=params) is params
        assert_same_tree(params, a.pull())
        del kept, grads, params
        gc.collect()
        used = _used(srv)
        a.push(_p_grads(1))  # releases the dedicated regions, then uses the connection's region
        assert _used(srv) == used + 1 and shm._dedicated == [] and shm._region is not None


def test_a_reply_laid_out_otherwise_than_the_slots_is_read_aside(srv, model_name):
    """Defence in depth: should the region's slots ever disagree with where a reply puts the leaves
    (here forced by swapping two slots), the reader copies the span aside before filling `out`, so
    that no leaf is overwritten before it is read."""
    two = {"x": np.arange(70_000, dtype=np.float32), "y": -np.arange(70_000, dtype=np.float32)}
    with Client(srv.address, timeout=60) as c:
        a = c.create_model(model_name, two, optim.sgd(0.1))
        _, params = a.shared_arrays()
        shm = c.shared_memory
        assert shm is not None
        slots = shm._dedicated[0].slots
        slots.params["x"], slots.params["y"] = slots.params["y"], slots.params["x"]
        swapped = {"x": params["y"], "y": params["x"]}
        assert slots.holds_out(swapped, slots.pull_bytes, slots.packed)
        assert a.pull(out=swapped) is swapped
        assert_same_tree(swapped, two)
