"""Checkpoints in one process: bitwise save/restore, restore on start, corruption, download/upload,
path traversal, idempotent saves, pruning, periodic saves and reported failures.

Each test uses real files in a temporary directory and a real server on 127.0.0.1; tests that need
a restart start their own (in-process, cheap) server on their own directory.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time

import grpc
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from optserve.client import OptserveError
from optserve.server import Server
from optserve.server.state.safetensors_io import parse_safetensors
from optserve.v1 import optserve_pb2 as pb

SPEC = {
    "chain": [
        {"clip_by_global_norm": {"max_norm": 1.0}},
        {"adamw": {"learning_rate": 0.01, "weight_decay": 0.01, "tunable": ["learning_rate"]}},
    ]
}


def _params(rng: np.random.Generator, bf16: bool = True) -> dict:
    p = {
        "enc": {"w": rng.standard_normal((6, 5)).astype(np.float32), "b": np.zeros(5, np.float32)},
        "out": {"w": rng.standard_normal((5, 3)).astype(np.float32)},
        "step_table": np.arange(4, dtype=np.int32),  # not trainable: carried unchanged
    }
    if bf16:
        p["emb"] = rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16)
    return p


def _grads(rng: np.random.Generator, params: dict) -> dict:
    def g(x):
        if isinstance(x, dict):
            return {k: g(v) for k, v in x.items()}
        return (
            (rng.standard_normal(x.shape) * 0.3).astype(x.dtype)
            if x.dtype.kind == "f" or x.dtype == ml_dtypes.bfloat16
            else np.zeros_like(x)
        )

    return g(params)


def _download(model, path) -> tuple[dict, dict]:
    model.download(path)
    with open(path, "rb") as f:
        tensors, metadata = parse_safetensors(f.read(), str(path))
    return {k: v.copy() for k, v in tensors.items()}, {k: json.loads(v) for k, v in metadata.items()}


def _assert_bitwise(a: dict, b: dict, keys=None) -> None:
    keys = sorted(a) if keys is None else keys
    assert sorted(a) == sorted(b)
    for k in keys:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def server(ckpt_dir):
    srv = Server(port=0, checkpoint_dir=str(ckpt_dir), checkpoint_options={"keep": 3})
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def client(server):
    with server.client(timeout=60.0) as c:
        yield c


def test_save_restore_is_bitwise_and_continues_like_a_twin(client, ckpt_dir, tmp_path, model_name):
    rng = np.random.default_rng(1)
    params = _params(rng)
    a = client.create_model(model_name, params, optimizer=SPEC, ema=0.9)
    twin = client.create_model(model_name + "-twin", params, optimizer=SPEC, ema=0.9)
    first = [_grads(rng, params) for _ in range(3)]
    more = [_grads(rng, params) for _ in range(4)]
    wa, wt = a.worker("w0"), twin.worker("w0")
    for w in (wa, wt):
        w.pull()
        for g in first:
            w.push(g)
    a.set_hyperparams(learning_rate=0.005)
    twin.set_hyperparams(learning_rate=0.005)

    assert a.save() == 3
    saved_info = a.info()
    assert saved_info["last_checkpoint_step"] == 3 and saved_info["last_checkpoint_error"] is None
    saved, saved_meta = _download(a, tmp_path / "saved.safetensors")
    # the committed files hold exactly the state at the save
    step_dir = ckpt_dir / model_name / "step_3"
    with open(step_dir / "params.safetensors", "rb") as f:
        on_disk = parse_safetensors(f.read(), "params")[0]
    _assert_bitwise(
        {f"params/{k}": v for k, v in on_disk.items()}, {k: v for k, v in saved.items() if k.startswith("params/")}
    )
    assert any(k.startswith("opt/") and k.endswith("count") for k in saved)  # step counts are state too
    assert "ema/count" in saved and any(k.startswith("ema/ema/") for k in saved)  # and the parameter EMA

    for g in more:  # diverge, then come back
        a.push(g)
    assert a.restore(3) == 3
    restored, restored_meta = _download(a, tmp_path / "restored.safetensors")
    _assert_bitwise(saved, restored)
    for key in ("step", "hyperparams", "workers", "spec", "settings", "schema"):
        assert restored_meta[key] == saved_meta[key], key
    info = a.info()
    assert (info["step"], info["hyperparams"], info["workers"]) == (3, saved_info["hyperparams"], saved_info["workers"])
    assert info["workers"] == {"w0": {"last_seq": 3, "last_base_step": 0}}

    for g in more:  # the same K pushes on the restored model and on the twin that was never checkpointed
        a.push(g)
        twin.push(g)
    final_a, _ = _download(a, tmp_path / "a.safetensors")
    final_t, _ = _download(twin, tmp_path / "t.safetensors")
    _assert_bitwise(final_a, final_t)
    assert a.step == twin.step == 7


ADAM = {"adam": {"learning_rate": 0.01}}


def test_restart_restores_every_model_and_keeps_deduplicating(tmp_path):
    rng = np.random.default_rng(2)
    params = _params(rng, bf16=False)
    before = {}
    with Server(port=0, checkpoint_dir=str(tmp_path / "ck")) as srv, srv.client(timeout=60.0) as c:
        for name in ("alpha", "beta"):
            m = c.create_model(name, params, optimizer=ADAM, ema=0.5 if name == "beta" else None)
            w = m.worker("w")
            w.pull()
            for _ in range(2 if name == "alpha" else 3):
                w.push(_grads(rng, params))
        c.model("alpha").save()
        c.model("alpha").push(_grads(rng, params))  # after its save: the final checkpoint at stop holds it
        for name in ("alpha", "beta"):
            before[name] = _download(c.model(name), tmp_path / f"{name}.safetensors")
    assert sorted(os.listdir(tmp_path / "ck" / "alpha")) == ["step_2", "step_3"]
    assert os.listdir(tmp_path / "ck" / "beta") == ["step_3"]

    with Server(port=0, checkpoint_dir=str(tmp_path / "ck")) as srv, srv.client(timeout=60.0) as c:
        assert sorted(m["name"] for m in c.list_models()) == ["alpha", "beta"]
        for name in ("alpha", "beta"):
            now = _download(c.model(name), tmp_path / f"{name}-after.safetensors")
            _assert_bitwise(before[name][0], now[0])
            assert now[1]["workers"] == before[name][1]["workers"]
        # a retry of beta's last push, sent after the restart, is answered from the checkpoint
        beta = c.model("beta")
        header = pb.PushHeader(model="beta", worker_id="w", seq=3, base_step=0)
        reply = beta.push_raw(header, sorted(_flat(_grads(rng, params)).items()))
        assert reply.duplicate and reply.step == 3 and reply.incarnation == srv.service.incarnation
        assert beta.step == 3
        beta.save()  # unchanged since the restore: no new checkpoint, no clash
        assert [x["step"] for x in beta.checkpoints()] == [3]


def test_checkpoints_with_replies_as_serialized_push_responses_still_restore(tmp_path):
    """Checkpoints written before replies were stored as {"step", "applied"} hold each one as a
    base64 PushResponse: after a restart from such a checkpoint, a retry gets the reply it holds,
    marked as a duplicate with this server's incarnation, and nothing is applied twice."""
    import base64

    from optserve.server.checkpoint import files as checkpoint_files

    rng = np.random.default_rng(3)
    params = _params(rng, bf16=False)
    grads = [_grads(rng, params) for _ in range(2)]
    with Server(port=0, checkpoint_dir=str(tmp_path / "ck")) as srv, srv.client(timeout=60.0) as c:
        w = c.create_model("gamma", params, optimizer=ADAM).worker("w")
        w.pull()
        for g in grads:
            w.push(g)
    path = tmp_path / "ck" / "gamma" / "step_2" / checkpoint_files.MANIFEST
    manifest = json.loads(path.read_text())
    record = manifest["workers"]["w"]
    assert record["replies"] == [
        {"seq": 1, "reply": {"step": 1, "applied": True}},
        {"seq": 2, "reply": {"step": 2, "applied": True}},
    ]
    for entry in record["replies"]:
        old = pb.PushResponse(model="gamma", step=entry["reply"]["step"], applied=True, incarnation="earlier")
        entry["reply"] = {"proto": "PushResponse", "b64": base64.b64encode(old.SerializeToString()).decode()}
    manifest[checkpoint_files.MANIFEST_DIGEST] = checkpoint_files.manifest_digest(manifest)
    path.write_text(json.dumps(manifest))

    with Server(port=0, checkpoint_dir=str(tmp_path / "ck")) as srv, srv.client(timeout=60.0) as c:
        gamma = c.model("gamma")
        assert gamma.step == 2
        for seq in (1, 2):
            header = pb.PushHeader(model="gamma", worker_id="w", seq=seq)
            reply = gamma.push_raw(header, sorted(_flat(grads[seq - 1]).items()))
            assert reply.duplicate and reply.step == seq and reply.applied and reply.model == "gamma"
            assert reply.incarnation == srv.service.incarnation
        assert gamma.step == 2 and gamma.info()["workers"]["w"]["last_seq"] == 2


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _flip_byte(path) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 3)  # in the tensor data, past the header
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))


def _truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize(
    "damage, victim",
    [
        (_flip_byte, "opt_state.safetensors"),
        (_truncate, "manifest.json"),
        (os.remove, "params.safetensors"),
    ],
)
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage, victim):
    rng = np.random.default_rng(3)
    params = _params(rng, bf16=False)
    ck = tmp_path / "ck"
    with Server(port=0, checkpoint_dir=str(ck)) as srv, srv.client(timeout=60.0) as c:
        m = c.create_model("m", params, optimizer=ADAM)
        m.push(_grads(rng, params))
        assert m.save() == 1
        good = _download(m, tmp_path / "good.safetensors")[0]
        m.push(_grads(rng, params))
        assert m.save() == 2
    damage(ck / "m" / "step_2" / victim)

    caplog.set_level(logging.WARNING, logger="optserve.checkpoints")
    with Server(port=0, checkpoint_dir=str(ck)) as srv, srv.client(timeout=60.0) as c:
        m = c.model("m")
        assert m.step == 1
        _assert_bitwise(good, _download(m, tmp_path / "now.safetensors")[0])
        warning = "\n".join(r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage())
        assert "step_2" in warning and victim in warning, caplog.text
        assert [x["step"] for x in m.checkpoints()] == [1]
        assert any(n.startswith("step_2.corrupt-") for n in os.listdir(ck / "m"))  # kept aside, for inspection
        m.push(_grads(rng, params))
        assert m.save() == 2  # the name is free again


def test_download_opens_with_plain_safetensors_and_upload_continues(client, tmp_path, model_name):
    rng = np.random.default_rng(4)
    params = _params(rng, bf16=False)
    m = client.create_model(model_name, params, optimizer=SPEC)
    w = m.worker("w7")
    w.pull()
    for _ in range(3):
        w.push(_grads(rng, params))
    path = tmp_path / "m.safetensors"
    size = m.download(path)
    assert size == os.path.getsize(path)

    plain = safetensors.numpy.load_file(str(path))  # any safetensors reader, nothing of optserve
    pulled = _flat(m.pull())
    for k, v in pulled.items():
        assert plain[f"params/{k}"].tobytes() == v.tobytes()
    assert any(k.startswith("opt/inner_state/") for k in plain)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert json.loads(meta["step"]) == 3 and json.loads(meta["model"]) == model_name
    assert json.loads(meta["workers"])["w7"]["last_seq"] == 3

    copy = client.upload(path, name=model_name + "-copy")
    info, original = copy.info(), m.info()
    for key in ("step", "hyperparams", "workers", "spec", "settings", "schema"):
        assert info[key] == original[key], key
    for _ in range(3):
        g = _grads(rng, params)
        m.push(g)
        copy.push(g)
    _assert_bitwise(_download(m, tmp_path / "a.st")[0], _download(copy, tmp_path / "b.st")[0])

    # a damaged file creates nothing
    data = bytearray(path.read_bytes())
    data[len(data) // 2 :] = b""
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(OptserveError) as e:
        client.upload(tmp_path / "bad.safetensors", name=model_name + "-bad")
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
    assert model_name + "-bad" not in [x["name"] for x in client.list_models()]


@pytest.mark.parametrize("name", ["../x", "..", "/etc/passwd", "a/b", "a\x00b", ".hidden", "x/../../y", ""])
def test_checkpoint_names_cannot_escape(client, ckpt_dir, tmp_path, name):
    before = sorted(os.listdir(ckpt_dir.parent))
    calls = [
        lambda: client.call(client._stub.SaveCheckpoint, pb.SaveCheckpointRequest(model=name)),
        lambda: client.call(client._stub.ListCheckpoints, pb.ListCheckpointsRequest(model=name)),
        lambda: client.call(client._stub.RestoreCheckpoint, pb.RestoreCheckpointRequest(model=name, step=1)),
    ]
    for call in calls:
        with pytest.raises(OptserveError) as e:
            call()
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT, e.value
    # an uploaded file cannot smuggle a name in either
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(OptserveError) as e:
        client.upload(path, name=name or "\x00")
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(os.listdir(ckpt_dir.parent)) == before


def test_uploaded_file_naming_another_path_is_rejected(client, tmp_path, model_name):
    m = client.create_model(model_name, {"w": np.ones(3, np.float32)}, optimizer={"sgd": {"learning_rate": 0.1}})
    path = tmp_path / "m.safetensors"
    m.download(path)
    tensors = safetensors.numpy.load_file(str(path))
    with safetensors.safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    meta["model"] = json.dumps("../../evil")
    safetensors.numpy.save_file(tensors, str(tmp_path / "evil.safetensors"), metadata=meta)
    with pytest.raises(OptserveError) as e:
        client.upload(tmp_path / "evil.safetensors")  # no name given: the file's would be used
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "evil" in e.value.message


@pytest.mark.parametrize(
    "step, code",
    [
        (-1, grpc.StatusCode.INVALID_ARGUMENT),
        (2**62, grpc.StatusCode.INVALID_ARGUMENT),
        (12345, grpc.StatusCode.NOT_FOUND),
    ],
)
def test_restore_steps_are_validated(client, model_name, step, code):
    m = client.create_model(model_name, {"w": np.ones(3, np.float32)}, optimizer={"sgd": {"learning_rate": 0.1}})
    m.save()
    with pytest.raises(OptserveError) as e:
        m.restore(step)
    assert _code(e) == code and model_name in e.value.message


def test_saves_never_replace_and_prune_to_keep(client, ckpt_dir, model_name):
    m = client.create_model(
        model_name,
        {"w": np.ones(3, np.float32)},
        optimizer={"adam": {"learning_rate": 0.1, "tunable": ["learning_rate"]}},
    )
    assert m.save() == 0 and m.save() == 0  # nothing changed: the same checkpoint
    m.set_hyperparams(learning_rate=0.05)
    assert m.save() == 0  # same step, another state: committed beside the first, which is kept
    assert [c["name"] for c in m.checkpoints()] == ["step_0.1", "step_0"]
    for _ in range(5):
        m.push({"w": np.ones(3, np.float32)})
        m.save()
    assert m.info()["last_checkpoint_error"] is None
    assert [c["step"] for c in m.checkpoints()] == [5, 4, 3]  # keep=3
    assert sorted(os.listdir(ckpt_dir / model_name)) == ["step_3", "step_4", "step_5"]


def test_periodic_checkpoints_every_n_steps(tmp_path):
    opts = {"every_steps": 2, "keep": 10}
    with Server(port=0, checkpoint_dir=str(tmp_path), checkpoint_options=opts) as srv, srv.client(timeout=60.0) as c:
        m = c.create_model("p", {"w": np.ones(3, np.float32)}, optimizer={"sgd": {"learning_rate": 0.1}})
        for _ in range(6):
            m.push({"w": np.ones(3, np.float32)})
        # The poller saves when a model has no checkpoint yet and then whenever it is 2 steps past its
        # last save: whenever its polls land (a loaded machine may let all 6 pushes in first), the
        # newest periodic checkpoint ends within one step of the last push. The bound is a safety
        # net for a hung poller, not a bet on its timing.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not m.checkpoints() or m.checkpoints()[0]["step"] < 5):
            time.sleep(0.05)
        steps = [x["step"] for x in m.checkpoints()]
        assert steps and steps[0] >= 5, steps
        assert all(b - a >= 2 for a, b in itertools.pairwise(steps[::-1])), steps


def test_failed_save_is_reported(tmp_path):
    with Server(port=0, checkpoint_dir=str(tmp_path)) as srv, srv.client(timeout=60.0) as c:
        m = c.create_model("f", {"w": np.ones(3, np.float32)}, optimizer={"sgd": {"learning_rate": 0.1}})
        (tmp_path / "f").write_text("a file where the model's directory should be")
        with pytest.raises(OptserveError) as e:
            m.save()
        assert _code(e) == grpc.StatusCode.INTERNAL and "'f'" in e.value.message
        assert m.info()["last_checkpoint_error"]
        os.remove(tmp_path / "f")
        assert m.save() == 0
        assert m.info()["last_checkpoint_error"] is None


def test_deleted_model_stays_deleted_and_its_checkpoints_are_archived(tmp_path):
    rng = np.random.default_rng(7)
    params = _params(rng, bf16=False)
    root = tmp_path / "ck"
    with Server(port=0, checkpoint_dir=str(root)) as srv, srv.client(timeout=60.0) as c:
        old = c.create_model("gone", params, optimizer=ADAM)
        old.push(_grads(rng, params))
        old.push(_grads(rng, params))
        assert old.save() == 2
        c.delete_model("gone")  # keeps (archives) its checkpoints
        fresh = c.create_model("gone", {"other": np.zeros(3, np.float32)}, optimizer=ADAM)
        assert fresh.save() == 0  # a new model of the same name starts its own history
        c.create_model("purged", params, optimizer=ADAM).save()
        c.delete_model("purged", delete_checkpoints=True)
    archived = os.listdir(root / ".archive")
    assert len(archived) == 1 and archived[0].startswith("gone-")
    assert os.listdir(root / ".archive" / archived[0]) == ["step_2"]
    assert not (root / "purged").exists()
    with Server(port=0, checkpoint_dir=str(root)) as srv, srv.client(timeout=60.0) as c:
        assert [m["name"] for m in c.list_models()] == ["gone"]
        assert c.model("gone").info()["schema"][0]["path"] == "other"  # the new model, not the deleted one
