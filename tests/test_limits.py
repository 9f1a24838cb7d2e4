"""Limits: --max-models, --max-model-bytes, --max-total-bytes -> RESOURCE_EXHAUSTED before any bytes
are taken, the server keeps serving the other models; the explicit message cap; client deadlines
(a waiting pull ends with DEADLINE_EXCEEDED and a cancelled wait frees its server thread)."""

from __future__ import annotations

import math
import threading

import grpc
import numpy as np
import pytest

from optserve.client import (
    DeadlineExceededError,
    ResourceExhaustedError,
    optim,
)
from optserve.server import Server
from optserve.server.core.admission import compile_for
from optserve.server.core.layout import plan_packing
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.channel import MAX_MESSAGE_BYTES
from optserve.wire.dtypes import LeafSpec
from tests.conftest import wait_until

SMALL = {"w": np.zeros(64, np.float32)}  # 256 bytes of parameters; adam keeps ~2x more
G = {"w": np.ones(64, np.float32)}
# What the server will count for one SMALL adam model, estimated without allocating (the test
# checks below that the estimate equals what the created model holds).
_SCHEMA = [LeafSpec("w", "float32", (64,))]
PER_MODEL = 256 + plan_packing(_SCHEMA, compile_for("x", optim.adam(0.1), _SCHEMA), keeps_ema=False).state_bytes


@pytest.fixture(scope="module")
def limited():
    srv = Server(port=0, max_models=4, max_model_bytes=1500, max_total_bytes=3 * PER_MODEL + 100)
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def lc(limited):
    with limited.client(timeout=30) as c:
        yield c


def _header_only_create(name: str, shape: tuple[int, ...], dtype: str = "float32") -> bytes:
    """A CreateModel whose header declares a leaf but sends none of its bytes."""
    header = pb.CreateModelHeader(
        name=name,
        optimizer_json='{"sgd": {"learning_rate": 0.1}}',
        schema=[pb.LeafSpec(path="w", dtype=dtype, shape=shape)],
    )
    return pb.CreateModelRequest(header=header).SerializeToString()


def test_limits_reject_and_the_server_keeps_serving(limited, lc):
    a = lc.create_model("lim-a", SMALL, optim.adam(0.1))
    a.push(G)
    assert a.info()["param_bytes"] + a.info()["state_bytes"] == PER_MODEL > 2 * 256

    # Per model: parameters and optimizer state count (640 B of parameters alone fit in 1500 B).
    with pytest.raises(ResourceExhaustedError, match=r"lim-big.*per-model limit of 1500"):
        lc.create_model("lim-big", {"w": np.zeros(160, np.float32)}, optim.adam(0.1))
    # ...checked before the bytes arrive: a header declaring 1 GB and sending nothing is refused
    # for its size, not for its missing bytes.
    with pytest.raises(grpc.RpcError) as e:
        lc._create(iter([_header_only_create("lim-huge", (1 << 28,))]), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "lim-huge" in e.value.details()

    # Total bytes: two more fit (3 x PER_MODEL), the fourth does not.
    lc.create_model("lim-b", SMALL, optim.adam(0.1))
    lc.create_model("lim-c", SMALL, optim.adam(0.1))
    with pytest.raises(ResourceExhaustedError, match=r"lim-d.*server's limit"):
        lc.create_model("lim-d", SMALL, optim.adam(0.1))
    # Model count: sgd keeps no state, so the fourth model fits the bytes but not the count of 4...
    lc.create_model("lim-d", {"w": np.zeros(16, np.float32)}, optim.sgd(0.1))
    with pytest.raises(ResourceExhaustedError, match=r"lim-e.*limit of 4 models"):
        lc.create_model("lim-e", {"w": np.zeros(1, np.float32)}, optim.sgd(0.1))

    names = [m["name"] for m in lc.list_models()]
    assert names == ["lim-a", "lim-b", "lim-c", "lim-d"]
    # ...and the others keep serving: pushes and pulls work, and deleting frees room.
    assert a.push(G) == 2
    np.testing.assert_allclose(a.pull()["w"], lc.model("lim-a").pull()["w"])
    lc.delete_model("lim-d")
    lc.create_model("lim-e", {"w": np.zeros(1, np.float32)}, optim.sgd(0.1))


def test_declared_size_beyond_device_memory_is_refused_without_a_limit(server, client):
    # No limits configured: a create declaring 2**50 floats still fails cleanly, allocating nothing.
    for shape in ((1 << 50,), (1 << 31, 1 << 31, 1 << 31)):
        with pytest.raises(grpc.RpcError) as e:
            client._create(iter([_header_only_create("too-big", shape)]), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert "too-big" in e.value.details()
    client.create_model("after-too-big", SMALL, optim.sgd(0.1)).push(G)


def test_message_cap(server, client):
    m = client.create_model("cap", SMALL, optim.sgd(0.1))
    over = b"\x00" * (MAX_MESSAGE_BYTES + 1024)
    with pytest.raises(grpc.RpcError) as e:
        client._push(iter([over]), timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert m.push(G) == 1  # the server is unharmed


def test_pull_waiting_for_a_step_honours_deadlines(server, client):
    m = client.create_model("deadline", SMALL, optim.sgd(0.1))
    with pytest.raises(DeadlineExceededError, match=r"deadline.*step 100 not reached"):
        m.pull(min_step=100, timeout=0.3)
    # Only the gRPC deadline (no timeout_seconds): DEADLINE_EXCEEDED as well.
    req = pb.PullRequest(model="deadline", min_step=100)
    with pytest.raises(grpc.RpcError) as e:
        list(client._pull(req, timeout=0.5))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for bad in (math.nan, math.inf, -1.0):  # what another language's client might send
        with pytest.raises(grpc.RpcError) as e:
            list(client._pull(pb.PullRequest(model="deadline", min_step=100, timeout_seconds=bad), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "timeout_seconds" in e.value.details()
    # A waiting pull completes once the step is reached.
    got = {}
    t = threading.Thread(target=lambda: got.update(step=m.pull(min_step=1, timeout=30) is not None and m.last_step))
    t.start()
    m.push(G)
    t.join(30)
    assert got == {"step": 1}


def test_cancelled_waits_free_their_threads():
    # Two RPC threads only, so one call may wait for a step (service.waiting_call_limit). A client
    # waits for a step that never comes, with no deadline at all, then goes away: its wait must
    # give back the waiting slot and the thread, or the next waiter could never be served.
    with Server(port=0, max_workers=2) as srv, srv.client(timeout=30) as c:
        assert srv.service.waiting.limit == 1
        c.create_model("waited", SMALL, optim.sgd(0.1))
        call = c._pull(pb.PullRequest(model="waited", min_step=10**6))
        wait_until(lambda: srv.service.waiting.waiting == 1)
        call.cancel()
        wait_until(lambda: srv.service.waiting.waiting == 0)
        waiter = c._pull(pb.PullRequest(model="waited", min_step=1))
        wait_until(lambda: srv.service.waiting.waiting == 1)
        assert c.model("waited").push(G) == 1  # served (within the client's 30 s deadline)
        assert [pb.PullResponse.FromString(m).header.step for m in waiter][:1] == [1]
