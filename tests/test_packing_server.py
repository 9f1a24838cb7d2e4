"""Packed layouts through real servers (docs/design.md, "Packed layouts"): a packed and an unpacked
server fed the same pushes return the same parameters, EMA and files; checkpoints, downloads and
uploads move between them bit for bit; sync rounds sum packs."""

from __future__ import annotations

import numpy as np
import pytest

from optserve.server import Server
from tests.conftest import assert_same_tree

SPEC = {"chain": [{"clip": {"max_delta": 1.0}}, {"adamw": {"learning_rate": 0.01, "mask": ["**/w"]}}]}


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    layers = {f"layer{i}": {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
              for i in range(6)}  # fmt: skip
    return {**layers, "scale": np.float32(1.5), "steps": np.arange(3, dtype=np.int32)}


def _grads(k: int) -> dict:
    g = _params(100 + k)
    g["steps"] = np.zeros(3, np.int32)
    return g


@pytest.fixture(scope="module")
def servers():
    packed, unpacked = Server(port=0), Server(port=0, packed=False)
    try:
        yield packed.client(timeout=60.0), unpacked.client(timeout=60.0)
    finally:
        packed.stop()
        unpacked.stop()


def test_a_packed_server_computes_what_an_unpacked_one_does(servers):
    models = [c.create_model("alike", _params(), SPEC, ema=0.9) for c in servers]
    packing = models[0].info()["packing"]
    assert not models[1].info()["packing"] and len(packing) == 4  # (w, b) x (2 buffers each)
    assert sorted(leaf for p in packing for leaf in p["leaves"]) == sorted(
        f"layer{i}/{k}" for i in range(6) for k in ("w", "b")
    )  # the scalar and the int leaf stay loose
    for k in range(3):
        for m in models:
            m.push(_grads(k), wire_dtype="bfloat16" if k == 1 else None)
    assert_same_tree(models[0].pull(), models[1].pull())
    assert_same_tree(models[0].pull(ema=True), models[1].pull(ema=True))
    assert_same_tree(models[0].pull(wire_dtype="bfloat16"), models[1].pull(wire_dtype="bfloat16"))


def test_sync_rounds_sum_packs_as_they_sum_leaves(servers):
    models = [c.create_model("sync", _params(), SPEC, mode="sync", workers=2) for c in servers]
    for m in models:
        workers = [m.worker(f"w{i}") for i in range(2)]
        for k in range(2):
            for i, w in enumerate(workers):
                w.push(_grads(2 * k + i), weight=i + 1.0)
        assert m.pull(min_step=2, timeout=60)["layer0"]["w"].shape == (3, 4)
    assert_same_tree(models[0].pull(), models[1].pull())


def test_downloads_and_checkpoints_move_between_packed_and_unpacked_servers(servers, tmp_path):
    packed, unpacked = (c.create_model("moved", _params(), SPEC, ema=0.5) for c in servers)
    for k in range(2):
        unpacked.push(_grads(k))
    unpacked.download(tmp_path / "unpacked.safetensors")
    into_packed = servers[0].upload(tmp_path / "unpacked.safetensors", "from-unpacked")
    assert_same_tree(into_packed.pull(), unpacked.pull())
    assert_same_tree(into_packed.pull(ema=True), unpacked.pull(ema=True))
    # both continue alike, and the packed one's file goes back bit for bit
    into_packed.push(_grads(7))
    unpacked.push(_grads(7))
    assert_same_tree(into_packed.pull(), unpacked.pull())
    into_packed.download(tmp_path / "packed.safetensors")
    back = servers[1].upload(tmp_path / "packed.safetensors", "from-packed")
    assert_same_tree(back.pull(), into_packed.pull())
    assert_same_tree(back.pull(ema=True), into_packed.pull(ema=True))
    del packed


def test_a_checkpoint_of_an_unpacked_server_restores_into_a_packed_one(tmp_path):
    ckpt = str(tmp_path / "ck")
    with Server(port=0, checkpoint_dir=ckpt, packed=False) as srv, srv.client(timeout=60.0) as c:
        m = c.create_model("ck", _params(), SPEC, ema=0.9)
        for k in range(3):
            m.push(_grads(k))
        m.save()
        want, want_ema = m.pull(), m.pull(ema=True)
    with Server(port=0, checkpoint_dir=ckpt) as srv, srv.client(timeout=60.0) as c:
        m = c.model("ck")
        assert_same_tree(m.pull(), want)
        assert_same_tree(m.pull(ema=True), want_ema)
        m.push(_grads(9))
        m.save()
        want = m.pull()
    with Server(port=0, checkpoint_dir=ckpt, packed=False) as srv, srv.client(timeout=60.0) as c:
        assert_same_tree(c.model("ck").pull(), want)


def test_a_pack_of_one_leaf_restores_in_its_buffer_form(servers, tmp_path):
    """Four alike leaves make two packs; here one of them holds a single leaf ("out"). Its optimizer
    state must come back from a file as the pack's 1-D buffer, not in the leaf's own shape (every
    push after an upload or a restore failed with INTERNAL: incompatible shapes)."""
    rng = np.random.default_rng(0)
    params = {
        "block": {"w": rng.normal(size=(8, 8)).astype(np.float32), "b": np.zeros(8, np.float32)},
        "embed": rng.normal(size=(100, 8)).astype(np.float32),
        "out": rng.normal(size=(37, 9)).astype(np.float32),
    }
    model = servers[0].create_model("one-leaf-pack", params, {"adam": {"learning_rate": 0.01}}, ema=0.9)
    assert ["out"] in [p["leaves"] for p in model.info()["packing"]]
    model.push(params)
    model.download(tmp_path / "m.safetensors")
    uploaded = servers[0].upload(tmp_path / "m.safetensors", "one-leaf-pack-2")
    assert_same_tree(uploaded.push_pull(params), model.push_pull(params))
    assert_same_tree(uploaded.pull(ema=True), model.pull(ema=True))
