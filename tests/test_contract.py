"""The contract as a client in another language sees it: every reply fits gRPC's default 4 MiB
receive limit (or is refused clearly), waiting calls cannot starve the server, PushPull's reply and
its pull are what the .proto says, a scoped token sees only its models, and the per-model policy
that refuses non-finite updates leaves the state exactly as it was.

Raw grpcio channels with DEFAULT options stand in for grpc-js / grpc-go / grpc-java clients.
"""

from __future__ import annotations

import queue
import re
import threading
import urllib.request
from collections.abc import Callable

import grpc
import jax
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client import Client, optim
from optserve.client.errors import FailedPreconditionError, ResourceExhaustedError
from optserve.server import Server
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.channel import DEFAULT_RECEIVE_LIMIT, MAX_MESSAGE_BYTES, method
from optserve.wire.chunks import chunk_messages
from tests.conftest import start_server_with_metrics, wait_until

G4 = {"w": np.ones(4, np.float32)}


def _raw(bytes_: bytes) -> bytes:
    return bytes_


def _default_channel(address: str) -> grpc.Channel:
    """A channel as another language's client opens it: no options, so 4 MiB receive limit."""
    return grpc.insecure_channel(address)


def _pending(client: Client, name: str) -> int:
    return client.model(name).info()["pending_contributions"]


def _push_messages(
    name: str, grads: dict, pull: pb.PullRequest | None = None, chunk_bytes: int = 1 << 20
) -> list[bytes]:
    h = pb.PushHeader(model=name)
    if pull is not None:
        h.pull.CopyFrom(pull)
    return list(chunk_messages(pb.PushRequest(header=h), list(grads.items()), chunk_bytes))


# -- waiting calls are bounded: health and every other call keep answering ------------------------


def _gauge(metrics_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def _pull_in_thread(
    pull: Callable, request: pb.PullRequest, outcomes: queue.Queue, timeout: float | None = None
) -> None:
    """Runs one streaming pull to its end on a thread; puts ("ok", step) or (status, details)."""

    def run() -> None:
        try:
            steps = [m.header.step for m in pull(request, timeout=timeout) if m.HasField("header")]
            outcomes.put(("ok", steps[0]))
        except grpc.RpcError as e:
            outcomes.put((e.code(), e.details()))

    threading.Thread(target=run, daemon=True).start()


def test_waiting_pulls_are_bounded_and_never_starve_the_server():
    proc, address, metrics_port = start_server_with_metrics(
        "--max-workers", "8", "--checkpoint-dir", "", "--log-level", "WARNING", keep_stderr=False
    )
    try:
        with Client(address, timeout=30) as client:
            client.create_model("waited", {"w": np.zeros(4, np.float32)}, optim.sgd(0.1))
            channel = _default_channel(address)
            pull = channel.unary_stream(method("Pull"), pb.PullRequest.SerializeToString, pb.PullResponse.FromString)
            outcomes: queue.Queue = queue.Queue()
            for _ in range(8):  # no timeout_seconds, no deadline: they would wait forever
                _pull_in_thread(pull, pb.PullRequest(model="waited", min_step=1), outcomes)
            refused = [outcomes.get(timeout=60) for _ in range(2)]
            for code, details in refused:
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
                assert "'waited'" in details and "6 calls are already waiting" in details and "--max-workers" in details
            assert _gauge(metrics_port, "optserve_waiting_calls_limit") == 6  # 8 threads less a reserve of 2
            assert _gauge(metrics_port, "optserve_waiting_calls") == 6 and outcomes.empty()

            # Every other call answers while the waiting calls are at their bound.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            get = channel.unary_unary(method("GetModel"), pb.GetModelRequest.SerializeToString, pb.ModelInfo.FromString)
            assert get(pb.GetModelRequest(model="waited"), timeout=30).step == 0
            assert client.model("waited").push(G4) == 1
            assert sorted(outcomes.get(timeout=60) for _ in range(6)) == [("ok", 1)] * 6

            # Waits end on their deadline (the server's timeout_seconds or the call's) and give
            # their slots back.
            for i in range(6):
                far = pb.PullRequest(model="waited", min_step=10**9, timeout_seconds=0.2 if i % 2 else 0.0)
                _pull_in_thread(pull, far, outcomes, timeout=None if i % 2 else 1.0)
            ended = [outcomes.get(timeout=60) for _ in range(6)]
            assert [code for code, _ in ended] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 6, ended
            wait_until(lambda: _gauge(metrics_port, "optserve_waiting_calls") == 0, "waiting slots given back")
            channel.close()
    finally:
        proc.kill()
        proc.wait(30)


def test_sync_push_pull_beyond_the_waiting_bound_applies_nothing_unless_it_completes_the_round():
    """4 RPC threads: 2 calls may wait. Two PushPulls wait for their round; a third, which would
    wait too, is refused before it is counted; the push that completes the round needs no wait. The
    raw PushPulls send no heartbeats: a fixed membership (heartbeat 0), so that no lease expires under
    them however slow the machine."""
    with Server(port=0, max_workers=4) as srv, srv.client(timeout=60) as client:
        assert srv.service.waiting.limit == 2
        model = client.create_model(
            "bounded-sync", {"w": np.zeros(4, np.float32)}, optim.sgd(1.0), mode="sync", workers=4, heartbeat=0
        )
        results: queue.Queue = queue.Queue()

        def push_pull(worker: int) -> None:
            header = model._push_header(None, None, f"w{worker}", 1)
            results.put(model.push_pull_raw(header, [("w", np.full(4, worker, np.float32))])[0])

        for worker in (1, 2):
            threading.Thread(target=push_pull, args=(worker,), daemon=True).start()
        wait_until(lambda: srv.service.waiting.waiting == 2 and _pending(client, "bounded-sync") == 2, "2 waiting")
        header = model._push_header(None, None, "w3", 1)
        with pytest.raises(ResourceExhaustedError) as refused:
            model.push_pull_raw(header, [("w", np.full(4, 3, np.float32))])
        assert "'bounded-sync'" in refused.value.message, refused.value.message
        assert _pending(client, "bounded-sync") == 2  # the refused push was not counted
        assert model.worker("w3").push({"w": np.full(4, 3, np.float32)}) == 1  # joins by Push (no wait)
        last = model.push_pull_raw(model._push_header(None, None, "w4", 1), [("w", np.full(4, 4, np.float32))])
        assert last[0].applied and last[0].step == 1
        np.testing.assert_array_equal(last[1]["w"], np.full(4, -2.5, np.float32))  # mean of 1, 2, 3, 4
        replies = [results.get(timeout=60) for _ in range(2)]
        assert [(r.step, r.applied) for r in replies] == [(1, True), (1, True)]


# -- PushPull: its reply and its pull --------------------------------------------------------------


def test_sync_push_pull_reply_says_applied_once_its_step_is_applied(client, model_name):
    model = client.create_model(model_name, {"w": np.zeros(4, np.float32)}, optim.sgd(1.0), mode="sync", workers=2)
    first: queue.Queue = queue.Queue()
    threading.Thread(
        target=lambda: first.put(model.push_pull_raw(model._push_header(None, None), list(G4.items()))), daemon=True
    ).start()
    wait_until(lambda: _pending(client, model_name) == 1, "first contribution")
    second, _ = model.push_pull_raw(model._push_header(None, None), list(G4.items()))
    reply, params = first.get(timeout=60)
    assert (reply.step, reply.applied) == (1, True) and (second.step, second.applied) == (1, True)
    np.testing.assert_array_equal(params["w"], -np.ones(4, np.float32))


@pytest.mark.parametrize("rpc", ["PushPull", "PushPullOne"])
def test_push_pull_refuses_a_pull_it_cannot_serve_before_applying(client, model_name, rpc):
    model = client.create_model(model_name, {"w": np.zeros(4, np.float32)}, optim.sgd(1.0))
    client.create_model(f"{model_name}-other", {"w": np.zeros(4, np.float32)}, optim.sgd(1.0))
    stub = client._push_pull if rpc == "PushPull" else client._push_pull_one

    def call(pull: pb.PullRequest) -> list[bytes]:
        msgs = _push_messages(model_name, G4, pull)
        return list(stub(iter(msgs), timeout=30)) if rpc == "PushPull" else [stub(msgs[0], timeout=30)]

    for pull, field in [
        (pb.PullRequest(model=f"{model_name}-other"), "pull.model"),
        (pb.PullRequest(wire_dtype="int8"), "wire_dtype"),
        (pb.PullRequest(timeout_seconds=-1.0), "timeout_seconds"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            call(pull)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
        assert repr(model_name) in e.value.details()
        assert model.info()["step"] == 0  # nothing applied
    with pytest.raises(grpc.RpcError) as e:
        call(pb.PullRequest(ema=True))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and model.info()["step"] == 0
    # Empty or the push's own name is fine.
    for pull in (pb.PullRequest(), pb.PullRequest(model=model_name)):
        replies = [pb.PullResponse.FromString(r) for r in call(pull)]
        assert replies[0].push.applied and replies[0].header.step == replies[0].push.step
    assert model.info()["step"] == 2


# -- every reply fits gRPC's default receive limit, or is refused clearly --------------------------


def test_default_grpc_clients_pull_and_download_anything_and_get_a_clear_unary_refusal(client, model_name):
    n = 1_250_000  # 5 MB of float32: one leaf larger than 4 MiB
    values = np.arange(n, dtype=np.float32)
    model = client.create_model(model_name, {"w": values, "b": np.ones(3, np.float32)}, optim.sgd(1.0))
    channel = _default_channel(client.target)
    pull = channel.unary_stream(method("Pull"), pb.PullRequest.SerializeToString, _raw)
    messages = list(pull(pb.PullRequest(model=model_name), timeout=60))
    assert len(messages) == 2 and max(len(m) for m in messages) <= DEFAULT_RECEIVE_LIMIT
    np.testing.assert_array_equal(model.read_pull_stream(messages, None)[1]["w"], values)

    download = channel.unary_stream(method("Download"), pb.DownloadRequest.SerializeToString, pb.FileChunk.FromString)
    chunks = list(download(pb.DownloadRequest(model=model_name), timeout=60))
    assert len(chunks) >= 2 and all(c.total_bytes == sum(len(x.data) for x in chunks) for c in chunks)

    # A 4.8 MB model does not fit in one 4 MiB reply: a clear status, not a transport failure.
    client.create_model(f"{model_name}-one", {"w": np.zeros(1_200_000, np.float32)}, optim.sgd(1.0))
    pull_one = channel.unary_unary(method("PullOne"), pb.PullRequest.SerializeToString, _raw)
    with pytest.raises(grpc.RpcError) as e:
        pull_one(pb.PullRequest(model=f"{model_name}-one"), timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"'{model_name}-one'" in e.value.details() and "streaming Pull" in e.value.details()
    push_pull_one = channel.unary_unary(method("PushPullOne"), _raw, _raw)
    (msg,) = _push_messages(f"{model_name}-one", {"w": np.ones(1_200_000, np.float32)}, chunk_bytes=8 << 20)
    with pytest.raises(grpc.RpcError) as e:
        push_pull_one(msg, timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_message_bytes" in e.value.details()
    assert client.model(f"{model_name}-one").info()["step"] == 0  # refused before the push was applied
    channel.close()


def test_many_leaves_with_long_paths_are_cut_so_that_every_message_fits(client, model_name):
    # 700 paths of ~4000 characters: the schema (~2.8 MB) and the slice list (~2.8 MB) together
    # exceed 4 MiB, so the first message cannot carry every slice next to the header.
    params = {f"k{i:03d}" + "x" * 3990: np.full(2, i, np.float32) for i in range(700)}
    client.create_model(model_name, params, optim.sgd(1.0))
    channel = _default_channel(client.target)
    pull = channel.unary_stream(method("Pull"), pb.PullRequest.SerializeToString, _raw)
    messages = list(pull(pb.PullRequest(model=model_name), timeout=60))
    assert len(messages) >= 2 and max(len(m) for m in messages) <= DEFAULT_RECEIVE_LIMIT
    pulled = client.model(model_name).read_pull_stream(messages, None)[1]
    assert len(pulled) == 700 and all(pulled[p].tolist() == a.tolist() for p, a in params.items())
    channel.close()


def test_a_client_that_raised_its_limit_gets_big_unary_replies_and_tiny_chunks_are_clamped(client, model_name):
    values = np.arange(1_200_000, dtype=np.float32)  # 4.8 MB
    model = client.create_model(model_name, {"w": values}, optim.sgd(1.0))
    raw = client.call(client._pull_one, pb.PullRequest(model=model_name, max_message_bytes=MAX_MESSAGE_BYTES))
    np.testing.assert_array_equal(model.read_pull_stream([raw], None)[1]["w"], values)
    # chunk_bytes below 1024 is raised to 1024 (the contract says so).
    small = client.create_model(f"{model_name}-small", {"w": np.zeros(1024, np.float32)}, optim.sgd(1.0))
    messages = list(client._pull(pb.PullRequest(model=f"{model_name}-small", chunk_bytes=1), timeout=30))
    assert [sum(s.length for s in pb.PullResponse.FromString(m).slices) for m in messages] == [1024] * 4
    assert small.pull()["w"].shape == (1024,)


# -- a scoped token sees only its models -----------------------------------------------------------


def test_server_info_counts_only_the_models_a_scoped_token_may_see(tmp_path):
    import argparse

    from optserve.server.api import auth as security

    tokens = tmp_path / "tokens"
    tokens.write_text("admin-secret\nteam-a-secret model-a model-gone\n")
    args = argparse.Namespace(token_file=str(tokens), tls_cert=None, tls_key=None, tls_client_ca=None)
    with (
        Server(port=0, **security.server_options(args)) as srv,
        srv.client(token="admin-secret", timeout=30) as admin,
        srv.client(token="team-a-secret", timeout=30) as a,
    ):
        for name in ("model-a", "model-b", "model-c"):
            admin.create_model(name, {"w": np.zeros(2, np.float32)}, optim.sgd(0.1))
        assert admin.server_info()["models"] == 3
        assert a.server_info()["models"] == 1
        assert [m["name"] for m in a.list_models()] == ["model-a"]


# -- reject_nonfinite_updates ----------------------------------------------------------------------

HUGE = np.float32(3e38)  # finite; one adam step of learning rate 1e38 takes it past float32's max


def _state_bytes(server: Server, name: str) -> dict:
    """Every leaf of parameters, optimizer state and EMA, as raw bytes (bitwise comparison)."""
    state, _ = server.store.get(name).capture_state()
    trees = {"params": state.params, "opt": state.opt_state, "ema": state.ema_state}
    return {
        f"{k}{jax.tree_util.keystr(path)}": np.asarray(x).tobytes()
        for k, tree in trees.items()
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _overflowing(client: Client, name: str, **kwargs):
    params = {"w": np.array([HUGE, 1.0, -2.0], np.float32), "n": np.arange(3, dtype=np.int32)}
    return client.create_model(name, params, optim.adam(1e38), ema=0.5, **kwargs)


BAD = {"w": -np.ones(3, np.float32), "n": np.zeros(3, np.int32)}  # w[0] -> 3e38 + 1e38 = inf
GOOD = {"w": np.ones(3, np.float32), "n": np.zeros(3, np.int32)}  # w[0] -> 3e38 - 1e38


def test_nonfinite_update_is_refused_and_leaves_the_state_bitwise_unchanged(server, client, model_name):
    model = _overflowing(client, model_name, reject_nonfinite=True)
    assert model.info()["settings"]["reject_nonfinite"] is True
    before = _state_bytes(server, model_name)
    worker = model.worker("w1")
    for push in (lambda: worker.push(BAD), lambda: model.push_pull(BAD)):
        with pytest.raises(FailedPreconditionError) as e:
            push()
        assert repr(model_name) in e.value.message and "parameter 'w'" in e.value.message
        assert _state_bytes(server, model_name) == before
        info = model.info()
        assert info["step"] == 0 and info["workers"] == {} and info["counters"]["pushes_applied"] == 0
    assert model.info()["counters"]["nonfinite_rejected"] == 2
    # The same worker's same seq is not taken as applied: its next push goes through.
    worker.seq -= 1
    assert worker.push(GOOD) == 1
    pulled = model.pull()
    assert np.isfinite(pulled["w"]).all() and pulled["w"][0] < HUGE
    assert np.isfinite(model.pull(ema=True)["w"]).all()


def test_nonfinite_updates_are_applied_by_default(client, model_name):
    model = _overflowing(client, model_name)
    assert model.info()["settings"]["reject_nonfinite"] is False
    assert model.push(BAD) == 1
    assert np.isinf(model.pull()["w"][0])


def test_reject_nonfinite_is_kept_by_checkpoints_and_downloads(tmp_path):
    with Server(port=0, checkpoint_dir=str(tmp_path / "ckpt")) as srv, srv.client(timeout=60) as client:
        model = _overflowing(client, "kept", reject_nonfinite=True)
        model.save()
        model.download(tmp_path / "kept.safetensors")
        client.upload(tmp_path / "kept.safetensors", name="uploaded")
    with Server(port=0, checkpoint_dir=str(tmp_path / "ckpt")) as srv, srv.client(timeout=60) as client:
        for name in ("kept", "uploaded"):
            model = client.model(name)
            assert model.info()["settings"]["reject_nonfinite"] is True
            with pytest.raises(FailedPreconditionError):
                model.push(BAD)
            assert model.info()["step"] == 0


def test_sync_round_with_nonfinite_mean_is_dropped_and_every_waiter_told(server, client, model_name):
    model = _overflowing(client, model_name, reject_nonfinite=True, mode="sync", workers=2)
    before = _state_bytes(server, model_name)
    outcomes: queue.Queue = queue.Queue()

    def run(what: str, call: Callable) -> None:
        try:
            call()
            outcomes.put((what, "ok"))
        except FailedPreconditionError as e:
            outcomes.put((what, e.message))

    waiting_before = server.service.waiting.waiting
    threading.Thread(target=run, args=("push_pull", lambda: model.worker("a").push_pull(BAD)), daemon=True).start()
    wait_until(lambda: _pending(client, model_name) == 1, "a's contribution")
    threading.Thread(target=run, args=("pull", lambda: model.pull(min_step=1, timeout=60)), daemon=True).start()
    wait_until(lambda: server.service.waiting.waiting == waiting_before + 2, "both waiting")
    with pytest.raises(FailedPreconditionError) as e:
        model.worker("b").push(BAD)  # completes the round: its mean overflows
    assert "round for step 1" in e.value.message and "parameter 'w'" in e.value.message
    told = dict(outcomes.get(timeout=60) for _ in range(2))
    assert set(told) == {"push_pull", "pull"}
    assert all(
        repr(model_name) in m and "round for step 1" in m and "push again against step 0" in m for m in told.values()
    ), told
    info = model.info()
    assert info["step"] == 0 and info["pending_contributions"] == 0 and info["workers"] == {}
    assert _state_bytes(server, model_name) == before
    # The workers push again against the unchanged step; a finite round is applied.
    threading.Thread(target=run, args=("again", lambda: model.worker("a").push_pull(GOOD)), daemon=True).start()
    wait_until(lambda: _pending(client, model_name) == 1, "a's second contribution")
    assert model.worker("b").push(GOOD) == 1
    assert outcomes.get(timeout=60) == ("again", "ok")
    assert model.info()["step"] == 1 and np.isfinite(model.pull()["w"]).all()


def test_list_rules_says_which_hyperparameters_may_be_tunable(client, model_name):
    adam = {h["name"]: h for r in client.rules() if r["name"] == "adam" for h in r["hyperparams"]}
    assert adam["learning_rate"]["tunable"] and adam["learning_rate"]["type"] == "number >= 0 or schedule"
    assert not adam["nesterov"]["tunable"] and adam["nesterov"]["type"] == "boolean"
    # What the contract says SetHyperparams accepts: names the spec marked tunable.
    model = client.create_model(
        model_name, {"w": np.zeros(2, np.float32)}, {"adam": {"learning_rate": 0.1, "tunable": ["learning_rate"]}}
    )
    assert model.set_hyperparams(learning_rate=0.01) == {"learning_rate": pytest.approx(0.01)}
