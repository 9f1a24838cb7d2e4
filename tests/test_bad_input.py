"""Bad input gets the status docs/design.md ("Errors") gives, a message naming the model and the leaf or field,
and changes nothing: parameters and step are untouched and the server keeps serving."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from optserve.client import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    optim,
)
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import chunk_messages

P0 = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}


@pytest.fixture(scope="module")
def model(client):
    m = client.create_model("victim", P0, optimizer=optim.adam(0.1))
    m.push({"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)})
    return m


def _state(model):
    return model.info()["step"], model.pull()


def assert_unchanged(model, before):
    step, params = _state(model)
    assert step == before[0]
    for k in params:
        np.testing.assert_array_equal(params[k], before[1][k])
    # ...and the server keeps serving: a valid push still works (on another model).
    probe = model.client.create_model(
        f"probe-{np.random.randint(1 << 30)}", {"x": np.zeros(2, np.float32)}, optim.sgd(0.1)
    )
    assert probe.push({"x": np.ones(2, np.float32)}) == 1


BAD_GRADS = {
    "missing leaf": ({"w": np.ones((2, 3), np.float32)}, "missing leaf 'b'"),
    "extra leaf": ({**P0, "c": np.ones(1, np.float32)}, "unexpected leaf 'c'"),
    "wrong dtype": ({"w": np.ones((2, 3), np.int32), "b": np.ones(3, np.float32)}, "leaf 'w': dtype int32"),
    "wrong shape": ({"w": np.ones((3, 2), np.float32), "b": np.ones(3, np.float32)}, "leaf 'w': shape [3, 2]"),
    "nan": ({"w": np.full((2, 3), np.nan, np.float32), "b": np.ones(3, np.float32)}, "leaf 'w': gradient has NaN"),
    "inf": (
        {"w": np.ones((2, 3), np.float32), "b": np.array([1, np.inf, 1], np.float32)},
        "leaf 'b': gradient has NaN or Inf",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_GRADS))
def test_bad_gradient_is_rejected_and_changes_nothing(model, case):
    grads, expected = BAD_GRADS[case]
    before = _state(model)
    with pytest.raises(InvalidArgumentError) as e:
        model.client.model("victim").push(grads)
    assert "model 'victim'" in e.value.message and expected in e.value.message, e.value.message
    assert_unchanged(model, before)


def test_unknown_model(client, model):
    before = _state(model)
    with pytest.raises(NotFoundError, match="model 'nope' not found"):
        client.model("nope")
    m = client.model("victim")
    m.name = "nope"
    with pytest.raises(NotFoundError, match="'nope'"):
        m.push(P0)
    with pytest.raises(NotFoundError, match="'nope'"):
        m.pull()
    assert_unchanged(model, before)


def test_duplicate_create(client, model):
    before = _state(model)
    with pytest.raises(AlreadyExistsError, match="model 'victim' already exists"):
        client.create_model("victim", {"w": np.zeros(1, np.float32)}, optim.sgd(0.1))
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"chain": [{"clip_by_global_norm": {"max_norm": 1.0}}, {"adamw": {"b1": "x"}}]}, "chain[1].adamw.b1"),
        ({"adamm": {"learning_rate": 0.1}}, "adamm"),
        ({"adam": {"learning_rate": 0.1, "bogus": 1}}, "bogus"),
        ({"sgd": {"learning_rate": {"exponential_decay": {"init_value": 0.1}}}}, "exponential_decay"),
    ],
)
def test_invalid_spec_names_the_field(client, model_name, spec, field):
    with pytest.raises(InvalidArgumentError) as e:
        client.create_model(model_name, {"w": np.zeros(2, np.float32)}, optimizer=spec)
    assert field in e.value.message and model_name in e.value.message, e.value.message
    assert model_name not in [m["name"] for m in client.list_models()]
    client.create_model(model_name, {"w": np.zeros(2, np.float32)}, optim.sgd(0.1))  # the name is free again


def test_invalid_settings_and_names(client, model_name):
    with pytest.raises(InvalidArgumentError, match=r"settings\.quorum"):
        client.create_model(model_name, P0, optim.sgd(0.1), mode="sync", workers=2, quorum=3)
    with pytest.raises(InvalidArgumentError, match="model name"):
        client.create_model("../escape", P0, optim.sgd(0.1))
    with pytest.raises(InvalidArgumentError, match="no leaves"):
        client.create_model(model_name, {}, optim.sgd(0.1))


def test_push_cancelled_mid_stream_changes_nothing(client, model):
    before = _state(model)
    grads = [(k, np.ones_like(v)) for k, v in P0.items()]
    header = pb.PushHeader(model="victim")
    messages = list(chunk_messages(pb.PushRequest(header=header), grads, 8))  # several small chunks
    assert len(messages) > 2
    release = threading.Event()

    def stream():
        yield messages[0]
        yield messages[1]
        release.wait(60)  # the rest never comes: the client cancels first
        yield from messages[2:]

    future = client._push.future(stream(), timeout=60)
    # No timer releases the rest: the push cannot complete before the cancel, however slow the machine.
    assert future.cancel() or future.exception() is not None
    release.set()
    assert_unchanged(model, before)


def test_malformed_chunks(client, model):
    before = _state(model)
    raw = [pb.PushRequest(header=pb.PushHeader(model="victim")).SerializeToString() + b"\xff\xff\xff"]
    with pytest.raises(grpc.RpcError) as e:
        client._push(iter(raw), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Overlapping slices of one leaf.
    s = pb.TensorSlice(path="b", dtype="float32", shape=[3], offset=0, length=8)
    msg = pb.PushRequest(header=pb.PushHeader(model="victim"), slices=[s, s], payload=b"\0" * 16)
    with pytest.raises(grpc.RpcError) as e:
        client._push(iter([msg.SerializeToString()]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "overlaps" in e.value.details()
    assert_unchanged(model, before)
