"""End to end against a live server: results equal in-process optax, pytrees round-trip, big tensors
stream, many threads push concurrently."""

from __future__ import annotations

import collections
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from optserve.client import optim

K = 12


def _params(rng: np.random.Generator) -> dict:
    return {
        "dense": {"kernel": rng.standard_normal((5, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)},
        "scale": np.float32(1.5) * np.ones((), np.float32),
        "conv": rng.standard_normal((2, 1, 2, 3)).astype(np.float32),
    }


CASES = {
    "sgd_momentum": (optim.sgd(0.05, momentum=0.9), optax.sgd(0.05, momentum=0.9)),
    "sgd_nesterov": (optim.sgd(0.05, momentum=0.9, nesterov=True), optax.sgd(0.05, momentum=0.9, nesterov=True)),
    "adam": (optim.adam(1e-2), optax.adam(1e-2)),
    "chain_clip_schedule": (
        optim.chain(
            optim.clip_by_global_norm(0.5),
            optim.adamw(optim.exponential_decay(1e-2, 3, 0.5), weight_decay=0.01),
        ),
        optax.chain(
            optax.clip_by_global_norm(0.5),
            optax.adamw(optax.exponential_decay(1e-2, 3, 0.5), weight_decay=0.01),
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pushes_match_inprocess_optax(client, model_name, case):
    spec, tx = CASES[case]
    rng = np.random.default_rng(0)
    params = _params(rng)
    model = client.create_model(model_name, params, optimizer=spec)
    grads = [jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params) for _ in range(K)]

    expected = jax.tree.map(jnp.asarray, params)
    state = tx.init(expected)
    for i, g in enumerate(grads):
        assert model.push(g) == i + 1
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, expected)
        expected = optax.apply_updates(expected, updates)

    got = model.pull()
    assert model.info()["step"] == K
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.asarray(b), rtol=1e-6, atol=1e-7), got, expected)


Point = collections.namedtuple("Point", "x y")


def _tree_equal(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _tree_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _tree_equal(x, y)
    elif a is None:
        assert b is None
    else:
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.shape(a) == np.shape(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pytree_round_trip(client, model_name):
    rng = np.random.default_rng(1)
    tree = {
        "layers": [
            {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.zeros(4, ml_dtypes.bfloat16)},
            (rng.standard_normal(2).astype(np.float16), np.arange(6, dtype=np.int32).reshape(2, 3)),
        ],
        "point": Point(x=np.float32(2.5), y=np.array(7, np.int32)),
        "empty": np.zeros((0, 3), np.float32),
        "nothing": None,
        "bf16_scalar": np.array(1.25, ml_dtypes.bfloat16),
        "odd/key%": np.ones(2, np.float32),
    }
    model = client.create_model(model_name, tree, optimizer=optim.sgd(0.1))
    _tree_equal(model.pull(), tree)
    _tree_equal(client.model(model_name).pull(like=tree), tree)
    # A client that never saw the structure gets nested dicts keyed by the path components.
    plain = client.model(model_name).pull()
    assert set(plain) == {"layers", "point", "empty", "bf16_scalar", "odd/key%"}
    np.testing.assert_array_equal(plain["layers"]["1"]["1"], tree["layers"][1][1])
    assert plain["point"]["x"].dtype == np.float32


def test_gradient_larger_than_message_cap(client, model_name):
    from optserve.wire.channel import MAX_MESSAGE_BYTES

    n = 50_000_000  # 200 MB of float32 against a 64 MiB per-message cap
    assert 4 * n > 2.5 * MAX_MESSAGE_BYTES
    params = {"w": np.zeros(n, np.float32)}
    model = client.create_model(model_name, params, optimizer=optim.sgd(1.0))
    grad = {"w": np.full(n, 0.5, np.float32)}
    grad["w"][-1] = 2.0
    assert model.push(grad) == 1
    out = model.pull()["w"]
    assert out.shape == (n,) and out[0] == -0.5 and out[-1] == -2.0 and np.all(out[:-1] == -0.5)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_narrow_wire_dtypes_on_push_and_pull(client, model_name, wire):
    """The server converts a narrow gradient to the parameter dtype; a narrow pull is the parameters
    rounded once to the wire dtype, returned in their own dtype. Leaves span several chunks."""
    target = ml_dtypes.bfloat16 if wire == "bfloat16" else np.float16
    rng = np.random.default_rng(3)
    params = {
        "w": rng.standard_normal(5000).astype(np.float32),
        "n": np.arange(3, dtype=np.int32),
        "d": rng.standard_normal(7).astype(np.float16),
    }
    model = client.create_model(model_name, params, optimizer=optim.sgd(1.0))
    model.client.chunk_bytes, saved = 1000, model.client.chunk_bytes  # many chunks per leaf
    try:
        grad = {
            "w": rng.standard_normal(5000).astype(np.float32),
            "n": np.zeros(3, np.int32),
            "d": rng.standard_normal(7).astype(np.float16),
        }
        assert model.push(grad, wire_dtype=wire) == 1
        expected = {k: params[k] - grad[k].astype(target).astype(params[k].dtype) for k in ("w", "d")}
        got = model.pull()
        for k in ("w", "d"):
            assert got[k].dtype == params[k].dtype
            np.testing.assert_array_equal(got[k], expected[k])
        np.testing.assert_array_equal(got["n"], params["n"])
        narrow = model.pull(wire_dtype=wire)
        for k in ("w", "d"):
            assert narrow[k].dtype == params[k].dtype
            np.testing.assert_array_equal(narrow[k], expected[k].astype(target).astype(params[k].dtype))
        np.testing.assert_array_equal(narrow["n"], params["n"])
        pushed_pulled = model.push_pull(grad, wire_dtype=wire)
        assert pushed_pulled["w"].dtype == np.float32
    finally:
        model.client.chunk_bytes = saved


@pytest.mark.parametrize("chunk_bytes", [1000, 4 << 20])  # streamed in many chunks; one unary message
def test_pull_into_the_callers_arrays(client, model_name, chunk_bytes):
    from optserve.client import InvalidArgumentError

    rng = np.random.default_rng(4)
    params = {
        "w": rng.standard_normal((40, 30)).astype(np.float32),
        "b": np.zeros(30, ml_dtypes.bfloat16),
        "n": np.arange(4, dtype=np.int32),
    }
    model = client.create_model(model_name, params, optimizer=optim.sgd(0.5))
    model.client.chunk_bytes, saved = chunk_bytes, model.client.chunk_bytes
    try:
        grad = {"w": np.ones((40, 30), np.float32), "b": np.ones(30, ml_dtypes.bfloat16), "n": np.zeros(4, np.int32)}
        buffers = model.pull()
        arrays = dict(buffers)
        model.push(grad)
        got = model.pull(out=buffers)
        assert got is buffers and all(got[k] is arrays[k] for k in arrays)  # written in place
        fresh = model.pull()
        for k in params:
            np.testing.assert_array_equal(got[k], fresh[k])
        assert got["w"][0, 0] == params["w"][0, 0] - 0.5
        narrow = model.pull(out=buffers, wire_dtype="bfloat16")  # another wire dtype: received apart, copied in
        assert narrow["w"] is arrays["w"] and narrow["w"].dtype == np.float32
        np.testing.assert_array_equal(narrow["w"], fresh["w"].astype(ml_dtypes.bfloat16).astype(np.float32))
        after = model.push_pull(grad, out=buffers)
        assert after["w"] is arrays["w"]
        np.testing.assert_array_equal(after["w"], model.pull()["w"])

        read_only = np.zeros(4, np.int32)
        read_only.setflags(write=False)
        bad = {
            "no leaf 'n'": {"w": buffers["w"], "b": buffers["b"]},
            "out leaf 'x' is not a leaf of the model": {**buffers, "x": np.zeros(1, np.float32)},
            r"out leaf 'w' is float64\[40, 30\], the model's float32\[40, 30\]": {**buffers, "w": np.zeros((40, 30))},
            "leaf 'w' cannot be written in place": {**buffers, "w": np.zeros((30, 40), np.float32).T},
            "leaf 'n' cannot be written in place": {**buffers, "n": read_only},
            r"leaf 'b' cannot be written in place \(a jax leaf\)": {**buffers, "b": jnp.zeros(30, jnp.bfloat16)},
        }
        before = {k: v.copy() for k, v in buffers.items()}
        for message, out in bad.items():
            with pytest.raises(InvalidArgumentError, match=message):
                model.pull(out=out)
        for k in before:  # a refused `out` is left as it was
            np.testing.assert_array_equal(buffers[k], before[k])
        with pytest.raises(ValueError, match="not both"):
            model.pull(out=buffers, like=params)
    finally:
        model.client.chunk_bytes = saved


def test_concurrent_threads_sum_of_sgd_gradients(client, model_name):
    lr, threads, per_thread = 0.1, 8, 10
    rng = np.random.default_rng(2)
    p0 = {"w": rng.standard_normal(64).astype(np.float32), "b": np.zeros((), np.float32)}
    model = client.create_model(model_name, p0, optimizer=optim.sgd(lr))
    grads = [
        [
            {"w": rng.standard_normal(64).astype(np.float32), "b": np.float32(rng.standard_normal())}
            for _ in range(per_thread)
        ]
        for _ in range(threads)
    ]
    errors = []

    def run(i):
        try:
            for g in grads[i]:
                client.model(model_name).push(g)
        except Exception as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in ts)
    assert model.info()["step"] == threads * per_thread
    total_w = np.sum([g["w"] for gs in grads for g in gs], axis=0, dtype=np.float64)
    total_b = np.sum([g["b"] for gs in grads for g in gs], dtype=np.float64)
    out = model.pull()
    np.testing.assert_allclose(out["w"], p0["w"] - lr * total_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["b"], -lr * total_b, rtol=1e-5, atol=1e-5)


def test_push_pull_returns_updated_parameters(client, model_name):
    model = client.create_model(model_name, {"w": np.ones(3, np.float32)}, optimizer=optim.sgd(0.5))
    out = model.push_pull({"w": np.ones(3, np.float32)})
    np.testing.assert_array_equal(out["w"], np.full(3, 0.5, np.float32))
    assert model.last_step == 1


@pytest.mark.parametrize("spec", ["flux:AdaMax", "flux:AMSGrad", {"objax:Adam": {"learning_rate": 0.01}}])
def test_rules_whose_initial_state_shares_arrays_can_be_donated(client, model_name, spec):
    """These inits put one zeros array in two places; the server must still donate the state."""
    model = client.create_model(model_name, {"w": np.ones(3, np.float32), "s": np.ones((), np.float32)}, optimizer=spec)
    for i in range(3):
        assert model.push({"w": np.full(3, 0.1, np.float32), "s": np.float32(0.1)}) == i + 1
    assert np.all(model.pull()["w"] < 1.0)


def test_unary_twins_serve_small_models_and_refuse_large_replies(client, model_name):
    """PushOne / PullOne / PushPullOne: one message each way, same semantics; the client uses them
    when the tensors fit in one chunk. A reply that cannot fit in one message is refused."""
    from optserve.v1 import optserve_pb2 as pb
    from optserve.wire.chunks import chunk_messages

    small = client.create_model(model_name, {"w": np.zeros(4, np.float32)}, optimizer=optim.sgd(1.0))
    assert small._params_fit_one_chunk
    (msg,) = chunk_messages(
        pb.PushRequest(header=pb.PushHeader(model=model_name)), [("w", np.ones(4, np.float32))], 1 << 20
    )
    assert client.call(client._push_one, msg).step == 1
    reply = small.read_pull_stream([client.call(client._pull_one, pb.PullRequest(model=model_name))], None)
    assert reply[0] == 1 and reply[1]["w"].tolist() == [-1.0] * 4
    assert small.push_pull({"w": np.ones(4, np.float32)})["w"].tolist() == [-2.0] * 4

    from optserve.client import ResourceExhaustedError
    from optserve.wire.channel import DEFAULT_RECEIVE_LIMIT, MAX_MESSAGE_BYTES

    n = DEFAULT_RECEIVE_LIMIT // 4 + 1  # float32 values: one reply would exceed gRPC's default 4 MiB
    big = client.create_model(f"{model_name}-big", {"w": np.zeros(n, np.float32)}, optimizer=optim.sgd(1.0))
    assert not big._params_fit_one_chunk  # so the client streams instead
    with pytest.raises(ResourceExhaustedError, match="do not fit in one message"):
        client.call(client._pull_one, pb.PullRequest(model=f"{model_name}-big"))
    # A client that raised its receive limit says so and gets the single reply.
    raw = client.call(client._pull_one, pb.PullRequest(model=f"{model_name}-big", max_message_bytes=MAX_MESSAGE_BYTES))
    assert big.read_pull_stream([raw], None)[1]["w"].shape == (n,)
    assert big.pull()["w"].shape == (n,)


def test_the_step_compiles_once(server, client, model_name):
    """The initial optimizer state must look to jit exactly like the step's own outputs (committed to
    the device); otherwise the second push compiles the step again, which takes minutes for models
    with thousands of leaves."""
    params = {f"layer{i}": np.zeros(4, np.float32) for i in range(20)}
    model = client.create_model(model_name, params, optimizer=optim.adam(1e-3), ema=0.9)
    for _ in range(4):
        model.push(params)
    step = server.store.get(model_name)._steps[True]
    assert step._cache_size() == 1
