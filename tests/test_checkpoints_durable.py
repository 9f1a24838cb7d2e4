"""Checkpoints that lose nothing: the restore rule (a checkpoint is used only if its manifest and every
file verify and its state installs; otherwise it is moved aside and the previous one is used), the
manifest's own checksum, changes at a step that already has a checkpoint, durable restores,
all-or-nothing deletes, a failed final checkpoint at SIGTERM, and retried periodic saves.

Real servers on 127.0.0.1 and real files in tmp_path; a subprocess wherever SIGTERM or the exit
status is involved. Waits are for events the server exposes (info() fields, listings), bounded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import types

import grpc
import numpy as np
import pytest
import safetensors.numpy

from optserve.client import Client, OptserveError
from optserve.server import Server
from optserve.server.checkpoint import manager as checkpoints
from tests.conftest import start_server_process, stop_server_process

TUNABLE = {"adam": {"learning_rate": 0.1, "tunable": ["learning_rate"]}}
MANIFEST_DIGEST = "manifest_sha256"
PARAMS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}


def _grads(i: int) -> dict:
    return {"w": np.full((2, 3), 0.1 * (i + 1), np.float32), "b": np.full(3, -0.05 * (i + 1), np.float32)}


def _state(model, path) -> dict:
    model.download(path)
    return {k: v.tobytes() for k, v in safetensors.numpy.load_file(str(path)).items()}


def _wait_for(what: str, condition, timeout: float = 60.0):
    """Polls `condition()` until it returns something truthy; bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _two_checkpoints(root, tmp_path) -> dict:
    """Model 'm' with checkpoints step_1 and step_2 (a worker's record in each); returns step 1's state."""
    with Server(port=0, checkpoint_dir=str(root)) as srv, srv.client(timeout=60.0) as c:
        m = c.create_model("m", PARAMS, optimizer=TUNABLE)
        w = m.worker("w0")
        w.pull()
        w.push(_grads(0))
        assert m.save() == 1
        good = _state(m, tmp_path / "good.safetensors")
        w.push(_grads(1))
        assert m.save() == 2
    return good


def manifest_digest(manifest: dict) -> str:
    """The manifest's checksum as README.md, "Checkpoint format", defines it (independently of the server's code)."""
    fields = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _edit_manifest(step_dir, edit, *, reseal: bool) -> None:
    """Rewrites a checkpoint's manifest.json; `reseal`: with a matching checksum, as a buggy writer
    would, so that only the deeper checks can catch it."""
    path = step_dir / "manifest.json"
    manifest = edit(json.loads(path.read_text()))
    if reseal and isinstance(manifest, dict):
        manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def _set(path: tuple, value):
    def edit(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return manifest

    return edit


def _schema_shape(manifest):
    manifest["schema"][0]["shape"] = [3, 2]  # the tensors are [2, 3]
    return manifest


def _other_optimizer(manifest):  # parses and verifies, but the state does not install: sgd has no adam moments
    manifest["spec"] = {"sgd": {"learning_rate": 0.1}}
    return manifest


def _asynd(text: str) -> str:
    assert text.count('"async"') == 1
    return text.replace('"async"', '"asynd"')


UNUSABLE = {
    "manifest-is-a-list": (lambda m: [], True),
    "files-is-a-list": (lambda m: {**m, "files": list(m["files"].values())}, True),
    "file-entry-is-a-list": (lambda m: {**m, "files": {k: list(v.values()) for k, v in m["files"].items()}}, True),
    "schema-shape-disagrees": (_schema_shape, True),
    "state-does-not-install": (_other_optimizer, True),
    # edited by hand, checksum left as it was: only the manifest's own checksum can tell
    "learning-rate-edited": (_set(("hyperparams", "learning_rate"), 0.2), False),
    "worker-seq-a-string": (_set(("workers", "w0", "last_seq"), "2"), False),
}


@pytest.mark.parametrize("case", [*UNUSABLE, "async-to-asynd"])
def test_unusable_newest_checkpoint_is_moved_aside_and_the_previous_restored(tmp_path, caplog, case):
    root = tmp_path / "ck"
    good = _two_checkpoints(root, tmp_path)
    step_dir = root / "m" / "step_2"
    if case == "async-to-asynd":  # one byte of the file
        (step_dir / "manifest.json").write_text(_asynd((step_dir / "manifest.json").read_text()))
    else:
        edit, reseal = UNUSABLE[case]
        _edit_manifest(step_dir, edit, reseal=reseal)

    caplog.set_level(logging.WARNING, logger="optserve.checkpoints")
    with Server(port=0, checkpoint_dir=str(root)) as srv, srv.client(timeout=60.0) as c:
        m = c.model("m")
        assert m.step == 1, caplog.text
        assert _state(m, tmp_path / "now.safetensors") == good
        assert m.info()["workers"] == {"w0": {"last_seq": 1, "last_base_step": 0}}
        warning = "\n".join(r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage())
        assert "step_2" in warning, caplog.text
        assert [x["name"] for x in m.checkpoints()] == ["step_1"]
        assert [n for n in os.listdir(root / "m") if n.startswith("step_2.corrupt-")]
        m.push(_grads(2))
        assert m.save() == 2  # the name is free again


def test_new_checkpoints_carry_a_checksum_of_their_manifest_and_version_1_is_still_read(tmp_path, caplog):
    root = tmp_path / "ck"
    good = _two_checkpoints(root, tmp_path)
    for name in ("step_1", "step_2"):
        manifest = json.loads((root / "m" / name / "manifest.json").read_text())
        assert manifest["format_version"] == 2 and manifest[MANIFEST_DIGEST] == manifest_digest(manifest)
    # a checkpoint written before the checksum existed: read as it is, reported once
    shutil.rmtree(root / "m" / "step_2")
    manifest = json.loads((root / "m" / "step_1" / "manifest.json").read_text())
    del manifest[MANIFEST_DIGEST]
    manifest["format_version"] = 1
    (root / "m" / "step_1" / "manifest.json").write_text(json.dumps(manifest))
    caplog.set_level(logging.INFO, logger="optserve.checkpoints")
    with Server(port=0, checkpoint_dir=str(root)) as srv, srv.client(timeout=60.0) as c:
        assert _state(c.model("m"), tmp_path / "now.safetensors") == good
        assert "format_version 1" in caplog.text


def test_no_usable_checkpoint_moves_the_directory_aside_and_the_name_starts_clean(tmp_path):
    root = tmp_path / "ck"
    _two_checkpoints(root, tmp_path)
    for name in ("step_1", "step_2"):
        _edit_manifest(root / "m" / name, _other_optimizer, reseal=True)
    with Server(port=0, checkpoint_dir=str(root)) as srv, srv.client(timeout=60.0) as c:
        assert c.list_models() == []
        assert not (root / "m").exists()
        (archived,) = os.listdir(root / ".archive")
        assert archived.startswith("m-") and sorted(
            n.split(".corrupt-")[0] for n in os.listdir(root / ".archive" / archived)
        ) == ["step_1", "step_2"]
        fresh = c.create_model("m", {"other": np.zeros(4, np.float32)}, optimizer=TUNABLE)
        fresh.push({"other": np.ones(4, np.float32)})
        assert fresh.save() == 1  # its own history: nothing of the old model in the way
    with Server(port=0, checkpoint_dir=str(root)) as srv, srv.client(timeout=60.0) as c:
        assert [x["path"] for x in c.model("m").info()["schema"]] == ["other"]


def test_directories_without_checkpoints_are_left_alone(tmp_path, monkeypatch):
    """A checkpoint directory pointed at a project: its folders are not models' and nothing in them
    is moved, archived or removed (seen once: every folder of a repository moved to .archive)."""
    root = tmp_path / "project"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "src" / "notes.tmp-1").write_text("a file whose name has the incomplete mark\n")
    (root / "step_1").mkdir()  # a checkpoint's name at the root is a model named step_1, empty
    (root / "empty").mkdir()
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with Server(port=0, checkpoint_dir=str(root)) as srv, srv.client(timeout=60.0) as c:
        assert c.list_models() == []
        c.create_model("m", {"w": np.zeros(4, np.float32)}, optimizer=TUNABLE).save()
        # a model named like one of the folders saves beside its files, moving none of them
        assert c.create_model("src", {"w": np.zeros(4, np.float32)}, optimizer=TUNABLE).save() == 0
    after = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not p.is_relative_to(root / "m") and not p.is_relative_to(root / "src" / "step_0")
    )
    assert after == before
    everything = sorted(root.rglob("*"))
    # '' is no checkpoint directory at all (as `optserve serve --checkpoint-dir ''`), not the cwd
    monkeypatch.chdir(root)
    with Server(port=0, checkpoint_dir="") as srv, srv.client(timeout=60.0) as c:
        assert srv.checkpoints is None
        c.create_model("n", {"w": np.zeros(4, np.float32)}, optimizer=TUNABLE)
    assert sorted(root.rglob("*")) == everything


def test_a_model_created_over_checkpoints_left_by_an_unrestored_one_does_not_mix_with_them(tmp_path):
    root = tmp_path / "ck"
    with Server(port=0, checkpoint_dir=str(root)) as srv, srv.client(timeout=60.0) as c:
        for name in ("a", "b"):
            m = c.create_model(name, PARAMS, optimizer=TUNABLE)
            m.push(_grads(0))
            assert m.save() == 1
    # a server that may hold one model restores "a"; "b" is not the checkpoints' fault: left in place
    with Server(port=0, checkpoint_dir=str(root), max_models=1) as srv, srv.client(timeout=60.0) as c:
        assert [x["name"] for x in c.list_models()] == ["a"]
        assert os.listdir(root / "b") == ["step_1"]
        c.delete_model("a", delete_checkpoints=True)
        b = c.create_model("b", {"other": np.zeros(4, np.float32)}, optimizer=TUNABLE)
        assert not (root / "b").exists()  # the old b's checkpoints were archived at creation
        b.push({"other": np.ones(4, np.float32)})
        assert b.save() == 1
        assert b.checkpoints()[0]["name"] == "step_1"
    (archived,) = os.listdir(root / ".archive")
    assert archived.startswith("b-") and os.listdir(root / ".archive" / archived) == ["step_1"]
    with Server(port=0, checkpoint_dir=str(root), max_models=1) as srv, srv.client(timeout=60.0) as c:
        assert [x["path"] for x in c.model("b").info()["schema"]] == ["other"]


def test_a_change_at_a_saved_step_and_a_restore_survive_restarts(tmp_path):
    root = str(tmp_path / "ck")
    proc, target = start_server_process("--checkpoint-dir", root)
    try:
        with Client(target, timeout=60.0) as c:
            m = c.create_model("m", PARAMS, optimizer=TUNABLE)
            m.push(_grads(0))
            assert m.save() == 1
            m.set_hyperparams(learning_rate=0.2)  # same step, another state
        rc, err = stop_server_process(proc)
        assert rc == 0, err[-3000:]

        proc, target = start_server_process("--checkpoint-dir", root)
        with Client(target, timeout=60.0) as c:
            m = c.model("m")
            info = m.info()
            assert (info["step"], info["hyperparams"]["learning_rate"]) == (1, pytest.approx(0.2)), err[-3000:]
            assert [x["name"] for x in m.checkpoints()] == ["step_1.1", "step_1"]
            at_1 = _state(m, tmp_path / "at1.safetensors")
            m.push(_grads(1))
            m.push(_grads(2))
            assert m.save() == 3
            assert m.restore(1) == 1  # the newest checkpoint of step 1: step_1.1
            assert _state(m, tmp_path / "restored.safetensors") == at_1
            assert [x["name"] for x in m.checkpoints()] == ["step_1.1", "step_1"]
        rc, err = stop_server_process(proc)
        assert rc == 0, err[-3000:]
        assert [n for n in os.listdir(os.path.join(root, "m")) if n.startswith("step_3.superseded-")]

        proc, target = start_server_process("--checkpoint-dir", root)
        with Client(target, timeout=60.0) as c:
            m = c.model("m")
            assert m.step == 1 and m.info()["hyperparams"]["learning_rate"] == pytest.approx(0.2)
            assert _state(m, tmp_path / "after.safetensors") == at_1
        rc, err = stop_server_process(proc)
        assert rc == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_sigterm_exits_1_and_names_the_lost_steps_when_the_final_checkpoint_fails(tmp_path):
    root = tmp_path / "ck"
    proc, target = start_server_process("--checkpoint-dir", str(root))
    try:
        with Client(target, timeout=60.0) as c:
            m = c.create_model("m", PARAMS, optimizer=TUNABLE)
            m.push(_grads(0))
            assert m.save() == 1
            m.push(_grads(1))
            m.push(_grads(2))
        os.rename(root / "m", tmp_path / "m-moved")
        (root / "m").write_text("a file where the model's directory should be")
        rc, err = stop_server_process(proc)
        assert rc == 1, err[-3000:]
        assert "model 'm': steps 2..3 are lost" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_stop_returns_the_models_whose_final_checkpoint_failed(tmp_path):
    srv = Server(port=0, checkpoint_dir=str(tmp_path))
    with srv.client(timeout=60.0) as c:
        c.create_model("ok", PARAMS, optimizer=TUNABLE).push(_grads(0))
        (tmp_path / "bad").write_text("a file where the model's directory should be")
        c.create_model("bad", PARAMS, optimizer=TUNABLE).push(_grads(0))
    failures = srv.stop(grace=1.0)
    assert len(failures) == 1 and failures[0].startswith("model 'bad': steps 0..1 are lost"), failures
    assert os.listdir(tmp_path / "ok") == ["step_1"]
    assert srv.stop() == []


def test_delete_is_all_or_nothing(tmp_path):
    root = tmp_path / "ck"
    with Server(port=0, checkpoint_dir=str(root)) as srv, srv.client(timeout=60.0) as c:
        m = c.create_model("m", PARAMS, optimizer=TUNABLE)
        m.push(_grads(0))
        assert m.save() == 1
        (root / ".archive").write_text("a file where the archive directory should be")  # moving aside fails
        with pytest.raises(OptserveError) as e:
            c.delete_model("m")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "'m' was not deleted" in e.value.message
        assert [x["name"] for x in c.list_models()] == ["m"]
        m.push(_grads(1))  # still serving
        assert os.listdir(root / "m") == ["step_1"]
    with Server(port=0, checkpoint_dir=str(root)) as srv, srv.client(timeout=60.0) as c:
        assert c.model("m").step == 2  # not half-deleted: it comes back whole
        os.remove(root / ".archive")
        c.delete_model("m")
        assert c.list_models() == [] and not (root / "m").exists()
    with Server(port=0, checkpoint_dir=str(root)) as srv, srv.client(timeout=60.0) as c:
        assert c.list_models() == []


def test_delete_with_checkpoints_is_all_or_nothing(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    with Server(port=0, checkpoint_dir=str(root)) as srv, srv.client(timeout=60.0) as c:
        m = c.create_model("m", PARAMS, optimizer=TUNABLE)
        assert m.save() == 0
        # the name the checkpoints would be moved to is taken by a non-empty directory: rename fails
        monkeypatch.setattr(checkpoints, "secrets", types.SimpleNamespace(token_hex=lambda n: "0" * 2 * n))
        (root / ".deleted-m-00000000" / "x").mkdir(parents=True)
        with pytest.raises(OptserveError) as e:
            c.delete_model("m", delete_checkpoints=True)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "'m' was not deleted" in e.value.message
        assert [x["name"] for x in c.list_models()] == ["m"] and os.listdir(root / "m") == ["step_0"]
        os.rmdir(root / ".deleted-m-00000000" / "x")
        os.rmdir(root / ".deleted-m-00000000")
        c.delete_model("m", delete_checkpoints=True)
        assert c.list_models() == [] and not (root / "m").exists()


def test_failed_periodic_save_is_retried_without_new_steps(tmp_path):
    opts = {"every_steps": 1}
    (tmp_path / "r").write_text("a file where the model's directory should be")  # every save fails
    with Server(port=0, checkpoint_dir=str(tmp_path), checkpoint_options=opts) as srv, srv.client(timeout=60.0) as c:
        m = c.create_model("r", PARAMS, optimizer=TUNABLE)
        m.push(_grads(0))
        _wait_for(
            "the periodic save of step 1 to fail",
            lambda: (m.info()["last_checkpoint_error"] or "").startswith("step 1:"),
        )
        os.remove(tmp_path / "r")  # the disk is fixed; no further step comes
        _wait_for(
            "the retry to commit step 1",
            lambda: (lambda i: i["last_checkpoint_step"] == 1 and i["last_checkpoint_error"] is None)(m.info()),
        )
        assert [x["name"] for x in m.checkpoints()] == ["step_1"]


def test_a_hyperparameter_change_is_a_change_for_periodic_saves(tmp_path):
    opts = {"every_steps": 1000}  # no step count will make a save due
    with Server(port=0, checkpoint_dir=str(tmp_path), checkpoint_options=opts) as srv, srv.client(timeout=60.0) as c:
        m = c.create_model("h", PARAMS, optimizer=TUNABLE)
        assert m.save() == 0
        m.set_hyperparams(learning_rate=0.3)
        _wait_for(
            "a periodic save of the change", lambda: [x["name"] for x in m.checkpoints()] == ["step_0.1", "step_0"]
        )
        manifest = json.loads((tmp_path / "h" / "step_0.1" / "manifest.json").read_text())
        assert manifest["hyperparams"]["learning_rate"] == pytest.approx(0.3)
