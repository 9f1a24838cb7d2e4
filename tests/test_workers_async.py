"""Async mode against a live server: bounded staleness, exact staleness scaling, pushes repeated with
the same (worker_id, seq) -- also after a reply lost by cancelling the call -- applied exactly once."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from optserve.client import optim
from optserve.client.errors import FailedPreconditionError
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import chunk_messages


def _ones(n: int = 4) -> dict:
    return {"w": np.zeros(n, np.float32)}


def test_max_staleness_rejects_a_push_three_steps_behind_naming_the_current_step(client, model_name):
    model = client.create_model(model_name, _ones(), optimizer=optim.sgd(0.1), max_staleness=2)
    g = {"w": np.ones(4, np.float32)}
    for _ in range(3):
        model.push(g)
    before = model.info()["counters"]["stale_rejected"]
    with pytest.raises(FailedPreconditionError) as e:
        model.push(g, base_step=0)
    msg = e.value.message
    assert model_name in msg and "current step 3" in msg and "3 steps behind" in msg and "max_staleness=2" in msg
    info = model.info()
    assert info["step"] == 3 and info["counters"]["stale_rejected"] == before + 1
    assert model.push(g, base_step=1) == 4  # 2 behind: within the bound
    assert model.push(g, base_step=4) == 5


def test_inverse_staleness_scaling_scales_the_update_exactly(client, model_name):
    """sgd(1.0): the update is -g; a push `s` steps behind moves the parameters by -g / (1 + s)."""
    model = client.create_model(model_name, _ones(), optimizer=optim.sgd(1.0), staleness_scaling="inverse")
    g = {"w": np.array([1.0, 2.0, 4.0, 0.375], np.float32)}
    for staleness in range(4):  # the model is at step `staleness`; every push is computed against step 0
        before = model.pull()["w"]
        model.push(g, base_step=0)
        scale = np.float32(1.0 / (1.0 + staleness))
        # the same float32 operations the server's step performs: update = -lr * g, p + scale * update
        np.testing.assert_array_equal(model.pull()["w"], before + scale * (np.float32(-1.0) * g["w"]))
    # without scaling, the same stale push moves the parameters by the full update
    plain = client.create_model(model_name + "-plain", _ones(), optimizer=optim.sgd(1.0), max_staleness=10)
    for _ in range(3):
        plain.push({"w": np.zeros(4, np.float32)})
    plain.push(g, base_step=0)
    np.testing.assert_array_equal(plain.pull()["w"], -g["w"])


def test_repeated_worker_seq_is_applied_once(client, model_name):
    model = client.create_model(model_name, _ones(), optimizer=optim.sgd(1.0))
    g = {"w": np.ones(4, np.float32)}
    header = model._push_header(None, None, "w1", 1)
    leaves = model._grad_leaves(g, None)
    first = model.push_raw(header, leaves)
    second = model.push_raw(header, leaves)
    assert (first.step, first.applied, first.duplicate) == (1, True, False)
    assert (second.step, second.applied, second.duplicate) == (1, True, True)
    assert model.push_raw(model._push_header(None, None, "w1", 2), leaves).step == 2
    third = model.push_raw(header, leaves)  # seq 1 again after seq 2: within the window of kept replies
    assert (third.step, third.applied, third.duplicate) == (1, True, True)
    info = model.info()
    assert info["step"] == 2 and info["counters"]["pushes_applied"] == 2
    assert info["workers"]["w1"]["last_seq"] == 2
    np.testing.assert_array_equal(model.pull()["w"], -2 * g["w"])


def test_reply_lost_by_cancelling_the_call_after_apply_then_retry_is_applied_once(client, model_name):
    """PushPull whose pull waits for a far step: the server applies the gradient, the client cancels
    the call before any reply arrives, then resends the same (worker_id, seq)."""
    model = client.create_model(model_name, _ones(), optimizer=optim.sgd(1.0))
    g = {"w": np.ones(4, np.float32)}
    header = model._push_header(0, None, "w1", 7)
    header.pull.CopyFrom(pb.PullRequest(model=model_name, min_step=1_000, timeout_seconds=60))
    call = client._push_pull(
        chunk_messages(pb.PushRequest(header=header), model._grad_leaves(g, None), 1 << 20), timeout=60
    )
    deadline = time.monotonic() + 120
    while model.info()["step"] != 1:
        assert time.monotonic() < deadline, "the push was not applied"
        time.sleep(0.02)
    call.cancel()
    with pytest.raises(grpc.RpcError) as cancelled:  # the reply is lost
        next(iter(call))
    assert cancelled.value.code() == grpc.StatusCode.CANCELLED, cancelled.value
    header.ClearField("pull")
    retry = model.push_raw(header, model._grad_leaves(g, None))
    assert retry.duplicate and retry.applied and retry.step == 1
    info = model.info()
    assert info["step"] == 1 and info["counters"]["pushes_applied"] == 1 and info["counters"]["duplicates"] >= 1
    np.testing.assert_array_equal(model.pull()["w"], -g["w"])
