"""Noise rules over several servers (docs/design.md, "Shards"): real servers on 127.0.0.1, three
holding the shards of a model and one holding the same model whole, fed the same pushes. Every
shard splits the rule's key over the whole model's leaves in the whole model's order
(core/sharding.py, core/shard_noise.py), so parameters and state are the whole model's bit for bit:
leaves placed whole on any shard, leaves split by rows, a whole model that packs the leaves the
noise does not reach, sync rounds, and a model downloaded from three shards and uploaded over two."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import safetensors

from optserve.client import Client
from tests.conftest import in_process_servers
from tests.reference.cases import NOISE_CASES
from tests.test_shards import SPLIT, _params  # embed and out split by rows, the other leaves whole

NOISY_SGD = {"noisy_sgd": {"learning_rate": 0.1, "eta": 0.02, "gamma": 0.55, "key": 7}}
STEPS = 3


def _packable(seed: int = 0) -> dict:
    """Three blocks of small leaves (alike under adam: the whole model packs them) beside a table
    and a head that the noise reaches."""
    rng = np.random.default_rng(seed)
    blocks = {
        str(i): {"w": rng.normal(size=(4, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
        for i in range(3)
    }
    head = {"w": rng.normal(size=(6, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}
    return {"embed": rng.normal(size=(100, 8)).astype(np.float32), "blocks": blocks, "head": head}


def _grads(params: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)

    def like(tree):
        if isinstance(tree, dict):
            return {k: like(v) for k, v in tree.items()}
        return rng.normal(size=np.shape(tree)).astype(np.float32)

    return like(params)


def _assert_same_bits(a, b, where: str = "") -> None:
    """Two pulled pytrees hold the same arrays, bit for bit."""
    assert isinstance(a, dict) == isinstance(b, dict), where
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            _assert_same_bits(a[k], b[k], f"{where}/{k}")
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), f"{where}: not bit for bit the whole model's"


def _assert_same_file(a, b) -> None:
    """Two downloaded state files hold the same tensors bit for bit."""
    with safetensors.safe_open(str(a), framework="numpy") as fa, safetensors.safe_open(str(b), framework="numpy") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():  # noqa: SIM118
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), f"tensor {k} differs"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Three shard servers and one for the whole model."""
    root = tmp_path_factory.mktemp("noise")
    with in_process_servers([str(root / f"s{i}") for i in range(4)]) as srvs:
        yield srvs


def _split_leaves(model) -> list[str]:
    return sorted(leaf.spec.path for leaf in model.shard_map.leaves if leaf.split)


# The two rules' own mechanisms; their Axon/Polaris presets are the same transforms with other
# defaults, compared over three shards with the other conformance cases (tests/test_shards_conformance.py).
RULES = [c for c in NOISE_CASES if c.id in ("add_noise", "noisy_sgd")]


@pytest.mark.parametrize("case", RULES, ids=[c.id for c in RULES])
def test_noise_over_three_shards_equals_the_whole_model_bit_for_bit(sharded_client, whole_client, model_name, case):
    sm = sharded_client.create_model(model_name, _params(), case.spec, split_bytes=SPLIT)
    wm = whole_client.create_model(model_name, _params(), case.spec)
    assert _split_leaves(sm) == ["embed", "out"]
    assert {s["target"] for s in sm.info()["shards"]} == set(sharded_client.targets)
    for seed in range(STEPS):
        g = _grads(_params(), seed)
        _assert_same_bits(sm.push_pull(g), wm.push_pull(g), f"{case.id} step {seed + 1}")


def test_noise_beside_packed_leaves_equals_the_whole_model(sharded_client, whole_client, model_name):
    spec = {
        "partition": [
            {"params": ["embed", "head/**"], "optimizer": NOISY_SGD},
            {"params": "**", "optimizer": {"adam": {"learning_rate": 0.01}}},
        ]
    }
    sm = sharded_client.create_model(model_name, _packable(), spec, split_bytes=SPLIT)
    wm = whole_client.create_model(model_name, _packable(), spec)
    # the whole model packs the blocks; the noise is given embed, head/b, head/w (its dict's order)
    packed = {leaf for pack in wm.info()["packing"] for leaf in pack["leaves"]}
    assert packed == {f"blocks/{i}/{k}" for i in range(3) for k in ("w", "b")}
    assert _split_leaves(sm) == ["embed"]
    for seed in range(STEPS):
        g = _grads(_packable(), seed)
        _assert_same_bits(sm.push_pull(g), wm.push_pull(g), f"step {seed + 1}")


def test_sync_rounds_with_noise_equal_the_whole_model(sharded_client, whole_client, model_name):
    sm = sharded_client.create_model(model_name, _params(), NOISY_SGD, split_bytes=SPLIT, mode="sync", workers=2)
    wm = whole_client.create_model(model_name, _params(), NOISY_SGD, mode="sync", workers=2)

    def work(model, wid: str) -> None:
        w = model.worker(wid)
        w.pull()
        for seed in range(STEPS):
            w.push_pull(_grads(_params(), seed * 10 + int(wid[-1])), weight=1 + int(wid[-1]))

    for model in (sm, wm):
        threads = [threading.Thread(target=work, args=(model, f"w{i}")) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
    _assert_same_bits(sm.pull(min_step=STEPS, timeout=30), wm.pull(min_step=STEPS, timeout=30))


def test_a_noisy_model_checkpointed_and_resharded_from_three_servers_to_two_continues_as_the_whole_model(
    sharded_client, whole_client, targets, model_name, tmp_path
):
    sm = sharded_client.create_model(model_name, _params(), NOISY_SGD, split_bytes=SPLIT)
    wm = whole_client.create_model(model_name, _params(), NOISY_SGD)
    for seed in range(2):
        sm.push(_grads(_params(), seed))
        wm.push(_grads(_params(), seed))
    # a checkpoint of every shard brings back the rule's key with the rest
    assert sm.save() == 2
    sm.push(_grads(_params(), 9))
    assert sm.restore() == 2
    # the shards' states gather into the whole model's file: its key (replicated, equal on every
    # shard) included
    sm.download(tmp_path / "sharded.safetensors")
    wm.download(tmp_path / "whole.safetensors")
    _assert_same_file(tmp_path / "sharded.safetensors", tmp_path / "whole.safetensors")
    with safetensors.safe_open(str(tmp_path / "whole.safetensors"), framework="numpy") as f:
        assert f.get_tensor("opt/inner_state/0/rng_key").dtype == np.uint32
    with Client(targets[:2], timeout=60) as two:
        moved = two.upload(tmp_path / "sharded.safetensors", name=f"{model_name}-2", split_bytes=SPLIT)
        assert len(moved.shards) == 2 and _split_leaves(moved) == ["embed", "out"]
        for seed in range(2, 4):
            g = _grads(_params(), seed)
            _assert_same_bits(moved.push_pull(g), wm.push_pull(g), f"step {seed + 1} after resharding")
        moved.download(tmp_path / "moved.safetensors")
        wm.download(tmp_path / "whole4.safetensors")
        _assert_same_file(tmp_path / "moved.safetensors", tmp_path / "whole4.safetensors")
