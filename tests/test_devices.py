"""Models sharded over several devices (issue 14; docs/design.md, "Devices and meshes").

CI has no accelerators: the servers with several devices run in subprocesses with fake CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=4), and this process keeps its one CPU
device for the one-device side of each comparison. The conformance cases are compared in
tests/mesh_compare.py, a script run the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from optserve.client import Client, Rows
from optserve.server import Server
from tests.conftest import assert_same_tree, start_server_process
from tests.reference.cases import CASES, EMA_CASES

FOUR = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAM = {"adam": {"learning_rate": 0.01}}


def _params(seed: int = 0) -> dict:
    """Leaves divisible by 4 (packed, and one large loose leaf split along an axis), prime sizes
    (padded packs, a replicated loose leaf), a scalar and a non-float leaf."""
    rng = np.random.default_rng(seed)
    layers = {f"l{i}": {"w": rng.normal(size=(16, 8)), "b": rng.normal(size=8)} for i in range(4)}
    out = {
        **layers,
        "prime": {"a": rng.normal(size=(7, 5)), "b": rng.normal(size=13)},
        "big": rng.normal(size=(1 << 14, 20)),  # 1.25 MiB: loose, split along axis 0
        "odd": rng.normal(size=(65537 * 5,)),  # 1.25 MiB, a prime factor: loose, replicated
        "scale": np.float64(1.5),
    }
    out = _as_float32(out)
    out["steps"] = np.arange(3, dtype=np.int32)
    return out


def _as_float32(tree):
    if isinstance(tree, dict):
        return {k: _as_float32(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def _grads(k: int) -> dict:
    g = _params(100 + k)
    g["steps"] = np.zeros(3, np.int32)
    return g


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(a server over 4 fake CPU devices with checkpoints, a one-device server): clients, and the
    4-device server's checkpoint directory."""
    ckpt = tmp_path_factory.mktemp("four")
    proc, address = start_server_process("--devices", "all", "--checkpoint-dir", str(ckpt), env=FOUR)
    one = Server(port=0)

    try:
        yield Client(address, timeout=120.0), one.client(timeout=120.0), ckpt
    finally:
        one.stop()
        _stop(proc)


def test_a_four_device_server_reports_its_devices_and_splits_adam_state_evenly(servers):
    four, one, _ = servers
    assert four.server_info()["devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    assert one.server_info()["devices"] == ["cpu:0"]
    params = {f"l{i}": np.ones((64, 32), np.float32) for i in range(8)}  # packs of 4 divisible leaves
    params["big"] = np.ones((1024, 512), np.float32)  # 2 MiB: loose, split along axis 0
    params["scale"] = np.float32(2.0)  # replicated
    info = four.create_model("even", params, ADAM).info()
    by_name = {b["name"]: b for b in info["placement"]}
    assert by_name["big"]["sharding"] == "split axis 0 over 4" and by_name["scale"]["sharding"] == "replicated"
    assert {b["sharding"] for b in info["placement"] if b["name"].startswith("@")} == {"split axis 0 over 4"}
    assert all(b["padding"] == 0 for b in info["placement"])
    assert by_name["big"]["param_bytes_per_device"] == 1024 * 512 * 4 // 4
    assert by_name["big"]["state_bytes_per_device"] == 2 * 1024 * 512 * 4 // 4  # mu and nu follow it
    state_per_device = sum(b["state_bytes_per_device"] for b in info["placement"])
    assert abs(state_per_device - info["state_bytes"] / 4) <= 0.01 * info["state_bytes"] / 4
    total = info["param_bytes"] + info["state_bytes"]
    assert len(info["device_bytes"]) == 4
    for held in info["device_bytes"]:
        assert abs(held - total / 4) <= 0.01 * total / 4
    assert four.server_info()["device_bytes"] == info["device_bytes"]  # the only model there
    single = one.create_model("even", params, ADAM).info()
    assert {b["sharding"] for b in single["placement"]} == {"single"}
    assert single["device_bytes"] == [single["param_bytes"] + single["state_bytes"]]
    for c in (four, one):
        c.delete_model("even")


def test_four_devices_and_one_compute_theassert_same_tree(servers):
    four, one, _ = servers
    spec = {"chain": [{"clip": {"max_delta": 1.0}}, {"adamw": {"learning_rate": 0.01, "mask": ["**/w"]}}]}
    models = [c.create_model("same", _params(), spec, ema=0.9) for c in (four, one)]
    padded = [b for b in models[0].info()["placement"] if b["padding"]]
    assert padded and all(b["name"].startswith("@") for b in padded)  # the prime leaves' packs
    assert {b["name"]: b["sharding"] for b in models[0].info()["placement"]}["odd"] == "replicated"
    for k in range(3):
        for m in models:
            m.push(_grads(k), wire_dtype="bfloat16" if k == 1 else None)
    assert_same_tree(models[0].pull(), models[1].pull())
    assert_same_tree(models[0].pull(ema=True), models[1].pull(ema=True))
    assert_same_tree(models[0].pull(wire_dtype="bfloat16"), models[1].pull(wire_dtype="bfloat16"))

    leafwise = Client(four.target, packed=False, timeout=120.0).model("same")  # every leaf a view of its pack
    assert_same_tree(leafwise.pull(), one.model("same").pull())


def test_sync_rounds_sum_on_four_devices_as_on_one(servers):
    four, one, _ = servers
    models = [c.create_model("sync", _params(), ADAM, mode="sync", workers=2) for c in (four, one)]
    for m in models:
        workers = [m.worker(f"w{i}") for i in range(2)]
        for k in range(2):
            for i, w in enumerate(workers):
                w.push(_grads(2 * k + i), weight=i + 1.0)
        assert m.pull(min_step=2, timeout=60)["big"].shape == (1 << 14, 20)
    assert_same_tree(models[0].pull(), models[1].pull())


def test_saved_on_four_devices_restores_on_one_and_on_two(servers, tmp_path):
    four, _, ckpt = servers
    model = four.create_model("moved", _params(), ADAM, ema=0.5)
    for k in range(2):
        model.push(_grads(k))
    assert model.save() == 2
    want, want_ema = model.pull(), model.pull(ema=True)
    model.push(_grads(5))
    after = model.pull()
    assert model.restore(2) == 2
    assert_same_tree(model.pull(), want)
    for devices in (1, 2):
        copy = tmp_path / f"on{devices}"
        shutil.copytree(ckpt, copy)
        env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
        proc, address = start_server_process("--devices", "all", "--checkpoint-dir", str(copy), env=env)
        try:
            restored = Client(address, timeout=120.0).model("moved")
            assert restored.info()["step"] == 2 and len(restored.info()["device_bytes"]) == devices
            assert_same_tree(restored.pull(), want)
            assert_same_tree(restored.pull(ema=True), want_ema)
            restored.push(_grads(5))  # and it goes on as the original does
            assert_same_tree(restored.pull(), after)
        finally:
            _stop(proc)
    four.delete_model("moved", delete_checkpoints=True)


def test_a_one_device_download_uploads_into_four_devices_and_back(servers, tmp_path):
    four, one, _ = servers
    source = one.create_model("up", _params(), ADAM)
    source.push(_grads(0))
    source.download(tmp_path / "one.safetensors")
    moved = four.upload(tmp_path / "one.safetensors", "up")
    assert_same_tree(moved.pull(), source.pull())
    for m in (moved, source):
        m.push(_grads(1))
    assert_same_tree(moved.pull(), source.pull())
    moved.download(tmp_path / "four.safetensors")
    back = one.upload(tmp_path / "four.safetensors", "back")
    assert_same_tree(back.pull(), source.pull())


LAZY_SPEC = {
    "partition": [
        {"params": ["split"], "optimizer": {"lazy_adam": {"learning_rate": 0.01}}},
        {"params": ["whole"], "optimizer": {"sparse_sgd": {"learning_rate": 0.1, "momentum": 0.9}}},
        {"params": ["rowwise"], "optimizer": {"rowwise_adagrad": {"learning_rate": 0.1}}},
        {"params": "**", "optimizer": {"adam": {"learning_rate": 0.01}}},
    ]
}
# rows of each push, duplicates and an empty push among them
ROW_PUSHES = [[0, 1, 2, 0], [63, 5, 5], [], [1, 2, 48, 9]]


def _lazy_params() -> dict:
    rng = np.random.default_rng(7)
    return {
        "split": rng.normal(size=(64, 8)).astype(np.float32),  # split along axis 0 over 4
        "whole": rng.normal(size=(49, 3)).astype(np.float32),  # no axis divisible by 4: replicated
        "rowwise": rng.normal(size=(64, 4)).astype(np.float32),
        "dense": rng.normal(size=13).astype(np.float32),
    }


def _row_grads(k: int, shift: int = 0) -> dict:
    """Push k's gradient: Rows of ROW_PUSHES[k] (moved by `shift`) for each table, the dense leaf dense."""
    rng = np.random.default_rng(200 + 10 * shift + k)
    ids = np.array(ROW_PUSHES[k], np.int64) + shift
    out = {
        path: Rows(ids % rows, rng.normal(size=(len(ids), width)).astype(np.float32))
        for path, rows, width in (("split", 64, 8), ("whole", 49, 3), ("rowwise", 64, 4))
    }
    out["dense"] = rng.normal(size=13).astype(np.float32)
    return out


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_lazy_rules_update_rows_on_four_devices_as_on_one(servers, mode):
    """Row-sparse pushes under lazy rules on a mesh take the row step as on one device: the same
    parameters bit for bit, and rows no push touched keep their values (a dense update of
    lazy_adam would move them by their decaying moments). Sync: two workers' rows a round."""
    four, one, _ = servers
    sync = {"mode": "sync", "workers": 2} if mode == "sync" else {}
    shifts = (0, 10) if mode == "sync" else (0,)
    models = [c.create_model(f"lazy-{mode}", _lazy_params(), LAZY_SPEC, **sync) for c in (four, one)]
    placement = {b["name"]: b["sharding"] for b in models[0].info()["placement"]}
    assert placement["split"] == "split axis 0 over 4" and placement["whole"] == "replicated"
    start = models[0].pull()
    for m in models:
        workers = [m.worker(f"w{i}") for i in range(len(shifts))]
        for k in range(len(ROW_PUSHES)):
            for w, shift in zip(workers, shifts, strict=True):
                w.push(_row_grads(k, shift))
        assert m.pull(min_step=len(ROW_PUSHES), timeout=60)["dense"].shape == (13,)
    got = models[0].pull()
    assert_same_tree(got, models[1].pull())
    touched = np.unique([i + s for ids in ROW_PUSHES for i in ids for s in shifts])
    for path in ("split", "rowwise"):
        untouched = np.setdiff1d(np.arange(64), touched % 64)
        assert len(untouched) > 40
        np.testing.assert_array_equal(got[path][untouched], start[path][untouched])
        assert not np.array_equal(got[path][touched % 64], start[path][touched % 64])
    for c in (four, one):
        c.delete_model(f"lazy-{mode}")


@pytest.mark.parametrize("part", range(3))
def test_every_conformance_case_gives_on_four_devices_what_it_gives_on_one(part):
    ids = [c.id for c in (*CASES, *EMA_CASES)][part::3]
    script = os.path.join(ROOT, "tests", "mesh_compare.py")
    run = subprocess.run(
        [sys.executable, script, *ids],
        env={**os.environ, **FOUR},
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["id"] for r in results] == ids
    assert [r for r in results if r["diff"]] == []
    assert sum(r["exact"] for r in results) >= len(results) // 2  # most cases bit for bit


@pytest.mark.parametrize(
    "args, says",
    [
        (["--devices", "cpu:0-7"], "there are 1 cpu device(s)"),
        (["--devices", "cpu:1-0"], "a range goes up"),
        (["--devices", "cpu:0,0"], "named twice"),
        (["--devices", "npu"], "not a JAX platform"),
        (["--devices", "cpu", "--device", "cpu"], "give one"),
    ],
)
def test_bad_devices_are_one_line_and_exit_2(args, says):
    run = subprocess.run(
        [sys.executable, "-m", "optserve.server.cli", "serve", "--port", "0", "--checkpoint-dir", "", *args],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], run.stderr


def test_the_metrics_give_the_bytes_each_device_holds():
    server = Server(port=0)
    try:
        info = server.client(timeout=60.0).create_model("held", {"w": np.ones((8, 4), np.float32)}, ADAM).info()
        held = server.metrics.registry.get_sample_value("optserve_device_bytes", {"device": "cpu:0"})
        assert held == info["param_bytes"] + info["state_bytes"] == info["device_bytes"][0]
    finally:
        server.stop()


def test_a_model_over_two_shards_one_of_them_on_four_devices_computes_what_one_server_does(servers):
    """Each shard server may itself hold its part over a mesh (issue 14 with shards, docs/design.md
    "Shards"): shard 0 is the 4-device server, shard 1 the one-device one, and the twin an unsharded
    model on the one-device server. The large leaves are split by rows over both shards, so shard 0
    holds row ranges of them spread again over its 4 devices."""
    four, one, _ = servers
    sharded = Client([four.target, one.target], timeout=120.0)
    sm = sharded.create_model("meshshards", _params(), ADAM, ema=0.9, split_bytes=1 << 20)
    twin = one.create_model("meshtwin", _params(), ADAM, ema=0.9)
    info = sm.info()
    assert "placement" not in info and len(info["shards"][0]["device_bytes"]) == 4
    assert len(info["shards"][1]["device_bytes"]) == 1
    held = {leaf["path"]: leaf["rows"] for leaf in info["shards"][0]["leaves"]}
    assert held["big"] == (0, 1 << 13) and held["odd"] is not None  # row ranges of both split leaves
    on_mesh = {b["name"]: b["sharding"] for b in info["shards"][0]["placement"]}
    # its rows of "big" and "odd" (640 KiB each) are packed with its small leaves, each pack split over 4
    assert {s for n, s in on_mesh.items() if n.startswith("@")} == {"split axis 0 over 4"}, on_mesh
    for k in range(3):
        for m in (sm, twin):
            m.push(_grads(k), wire_dtype="bfloat16" if k == 1 else None)
    assert_same_tree(sm.pull(), twin.pull())
    assert_same_tree(sm.pull(ema=True), twin.pull(ema=True))
    sharded.delete_model("meshshards")
    one.delete_model("meshtwin")
