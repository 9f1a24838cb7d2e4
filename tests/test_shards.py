"""One model over several servers (docs/design.md, "Shards"): real servers on 127.0.0.1, three
holding the shards of a model and one holding the same model whole, fed the same pushes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from optserve.client import Client
from optserve.client.errors import FailedPreconditionError, InvalidArgumentError
from optserve.client.sharded import ShardedModel
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.dtypes import LeafSpec
from optserve.wire.errors import WireError
from optserve.wire.shards import Piece, ShardedLeaf, ShardMap, balance, place
from tests.conftest import assert_same_tree, in_process_servers, wait_until

ADAM = {"adam": {"learning_rate": 0.01}}
SPLIT = 1024  # bytes: "embed" and "out" split over the shards in these tests


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.normal(size=(100, 8)).astype(np.float32),
        "block": {"w": rng.normal(size=(8, 8)).astype(np.float32), "b": np.zeros(8, np.float32)},
        "out": rng.normal(size=(37, 9)).astype(np.float32),
        "scale": np.array(1.5, np.float32),
    }


def _grads(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        k: (
            {kk: rng.normal(size=np.shape(vv)).astype(np.float32) for kk, vv in v.items()}
            if isinstance(v, dict)
            else rng.normal(size=np.shape(v)).astype(np.float32)
        )
        for k, v in _params().items()
    }


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Three shard servers and one for the whole model, each with its checkpoint directory."""
    root = tmp_path_factory.mktemp("shards")
    with in_process_servers([str(root / f"s{i}") for i in range(4)]) as srvs:
        yield srvs


def _pair(sharded_client, whole_client, name, spec=ADAM, **settings):
    sm = sharded_client.create_model(name, _params(), spec, split_bytes=SPLIT, **settings)
    wm = whole_client.create_model(name, _params(), spec, **settings)
    return sm, wm


# -- placement ------------------------------------------------------------------------------------


def _transformer() -> list[LeafSpec]:
    schema = [LeafSpec("embed", "float32", (30522, 768)), LeafSpec("pos", "float32", (512, 768))]
    for b in range(12):
        schema += [LeafSpec(f"blocks/{b}/attn/{n}", "float32", (768, 768)) for n in "qkvo"]
        schema += [
            LeafSpec(f"blocks/{b}/mlp/in", "float32", (768, 3072)),
            LeafSpec(f"blocks/{b}/mlp/out", "float32", (3072, 768)),
        ]
        schema += [LeafSpec(f"blocks/{b}/{n}", "float32", (768,)) for n in ("ln1", "ln2", "bias")]
    return [*schema, LeafSpec("final_ln", "float32", (768,))]


@pytest.mark.parametrize("shards", [2, 3, 4, 5, 7, 8])
def test_transformer_placement_is_balanced(shards):
    shard_map = place(_transformer(), [f"h{i}:8470" for i in range(shards)], model_id="t")
    assert balance(shard_map) <= 1.05, shard_map.shard_bytes()
    assert sum(shard_map.shard_bytes()) == sum(4 * int(np.prod(leaf.shape)) for leaf in _transformer())
    embed = shard_map.leaves[0]
    assert embed.split and len(embed.pieces) == shards  # above 4 MiB: split over every shard
    assert not shard_map.leaves[-1].split  # small leaves stay whole


def test_placement_keeps_whole_what_it_is_told():
    schema = [LeafSpec("a", "float32", (4096, 512)), LeafSpec("b", "float32", (4096, 512))]
    shard_map = place(schema, ["x:1", "y:1"], model_id="t", whole={"b"})
    assert shard_map.leaves[0].split and not shard_map.leaves[1].split


def test_placement_refuses_more_shards_than_it_can_fill():
    with pytest.raises(WireError, match="holds no leaf"):
        place([LeafSpec("s", "float32", ())], ["x:1", "y:1"], model_id="t")


@pytest.mark.parametrize(
    "leaves, why",
    [
        ((ShardedLeaf(LeafSpec("a", "float32", (4,)), (Piece(0, 0, 2), Piece(1, 3, 4))),), "cover rows"),
        ((ShardedLeaf(LeafSpec("a", "float32", (4,)), (Piece(0, 0, 2), Piece(5, 2, 4))),), "outside"),
        ((ShardedLeaf(LeafSpec("a", "float32", (4,)), (Piece(0, 0, 3),)),), "the leaf has 4"),
        ((ShardedLeaf(LeafSpec("a", "float32", ()), (Piece(0, 0, 0), Piece(1, 0, 0))),), "rank >= 1"),
        ((ShardedLeaf(LeafSpec("a", "float32", (4,)), (Piece(0, 0, 4),)),), "holds no leaf"),
    ],
)
def test_inconsistent_maps_are_refused(leaves, why):
    with pytest.raises(WireError, match=why):
        ShardMap("id", 1, ("x:1", "y:1"), leaves).check()


def test_shard_map_json_round_trip():
    shard_map = place(_transformer(), ["h0:1", "h1:1", "h2:1"], model_id="t")
    assert ShardMap.from_json(shard_map.to_json()) == shard_map
    bad = shard_map.to_json()
    bad["leaves"][0]["pieces"][0][0] = "zero"
    with pytest.raises(WireError, match="malformed"):
        ShardMap.from_json(bad)


# -- the data path --------------------------------------------------------------------------------


def test_push_pull_and_pull_match_the_whole_model(sharded_client, whole_client, model_name):
    sm, wm = _pair(sharded_client, whole_client, model_name)
    assert isinstance(sm, ShardedModel)
    for seed in range(3):
        assert_same_tree(sm.push_pull(_grads(seed)), wm.push_pull(_grads(seed)))
    assert sm.push(_grads(7)) == wm.push(_grads(7)) == 4
    assert_same_tree(sm.pull(), wm.pull())
    assert sm.last_step == 4
    out = sm.pull()  # into the arrays of a previous pull, each shard writing its rows in place
    embed = out["embed"]
    assert sm.pull(out=out) is out and out["embed"] is embed
    assert_same_tree(out, wm.pull())
    assert_same_tree(sm.pull(wire_dtype="bfloat16"), wm.pull(wire_dtype="bfloat16"))
    assert sm.pull(if_newer_than=4) is None
    assert_same_tree(sm.pull(min_step=4, timeout=5), wm.pull())


def test_info_lists_each_shard(sharded_client, targets, model_name):
    sm = sharded_client.create_model(model_name, _params(), ADAM, split_bytes=SPLIT)
    info = sm.info()
    assert [s["target"] for s in info["shards"]] == targets
    assert {leaf["path"] for leaf in info["schema"]} == {"embed", "block/w", "block/b", "out", "scale"}
    embed_rows = [leaf["rows"] for s in info["shards"] for leaf in s["leaves"] if leaf["path"] == "embed"]
    assert embed_rows == [(0, 34), (34, 67), (67, 100)]
    assert info["param_bytes"] == sum(s["param_bytes"] for s in info["shards"]) == 4 * (800 + 64 + 8 + 333 + 1)
    assert info["shard_map"]["version"] == 1


def test_ema_pulls_and_hyperparameters(sharded_client, whole_client, model_name):
    spec = {"adam": {"learning_rate": 0.01, "tunable": ["learning_rate"]}}
    sm, wm = _pair(sharded_client, whole_client, model_name, spec, ema=0.9)
    sm.push(_grads(1))
    wm.push(_grads(1))
    assert sm.set_hyperparams(learning_rate=0.5) == wm.set_hyperparams(learning_rate=0.5)
    sm.push(_grads(2))
    wm.push(_grads(2))
    assert_same_tree(sm.pull(ema=True), wm.pull(ema=True))
    assert_same_tree(sm.pull(), wm.pull())


@pytest.mark.parametrize("max_norm", [{"max_norm": 0.5}, {"max_norm": 0.5, "tunable": ["max_norm"]}, {"max_norm": 1e6}])
def test_clip_by_global_norm_over_the_shards_matches_the_whole_model(
    sharded_client, whole_client, model_name, max_norm
):
    spec = {"chain": [{"clip_by_global_norm": max_norm}, ADAM]}
    sm, wm = _pair(sharded_client, whole_client, model_name, spec)
    assert sm.shard_map.global_norm
    for seed in range(3):
        a, b = sm.push_pull(_grads(seed)), wm.push_pull(_grads(seed))
    for k in ("embed", "out"):  # the clip factor rounds differently (t * (m / n) against t / n * m)
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
    w = sm.worker("w")
    w.pull()
    w.push_pull(_grads(5), wire_dtype="bfloat16")
    wm.push_pull(_grads(5), wire_dtype="bfloat16")
    np.testing.assert_allclose(sm.pull()["embed"], wm.pull()["embed"], rtol=1e-5, atol=1e-6)
    # a push without the norm is refused by a shard before anything is applied
    part = sm._split(sm._leaves(_grads(1), "gradient"))[0]
    with pytest.raises(InvalidArgumentError, match=r"global_norm_sq must be the whole gradient's squared norm"):
        sm.shards[0].push(part)
    assert [s["step"] for s in sm.info()["shards"]] == [4, 4, 4]


def test_sync_rounds_match_the_whole_model(sharded_client, whole_client, model_name):
    sm, wm = _pair(sharded_client, whole_client, model_name, mode="sync", workers=2)

    def work(model, wid: str) -> None:
        w = model.worker(wid)
        w.pull()
        for seed in range(3):
            w.push_pull(_grads(seed * 10 + int(wid[-1])), weight=1 + int(wid[-1]))

    for model in (sm, wm):
        threads = [threading.Thread(target=work, args=(model, f"w{i}")) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
    assert sm.pull(min_step=3, timeout=30) is not None
    assert_same_tree(sm.pull(), wm.pull())


def test_a_retry_after_a_partial_failure_completes_only_the_shards_that_missed_it(
    sharded_client, whole_client, model_name
):
    sm, wm = _pair(sharded_client, whole_client, model_name)
    worker = sm.worker("w")
    worker.pull()
    # the push reached shard 0 only (the others' calls failed): shard 0 applied it under seq 1
    parts = sm._split(sm._leaves(_grads(1), "gradient"))
    worker.workers[0].push(parts[0])
    worker.workers[0].seq = 0
    # the worker sends seq 1 again to every shard: shard 0 answers with its first reply
    worker.push(_grads(1))
    wm.push(_grads(1))
    assert_same_tree(sm.pull(), wm.pull())
    duplicates = [sh.info()["counters"]["duplicates"] for sh in sm.shards]
    assert duplicates == [1, 0, 0]
    assert [s["step"] for s in sm.info()["shards"]] == [1, 1, 1]


def test_discovery_from_any_shard(sharded_client, targets, whole_client, model_name):
    sm, wm = _pair(sharded_client, whole_client, model_name)
    sm.push(_grads(3))
    wm.push(_grads(3))
    with Client(targets[2], timeout=60) as one:
        found = one.model(model_name)
        assert isinstance(found, ShardedModel)
        assert [m.client.target for m in found.shards] == targets
        assert_same_tree(found.pull(), wm.pull())


def test_checkpoints_save_list_and_restore(sharded_client, whole_client, model_name):
    sm, wm = _pair(sharded_client, whole_client, model_name)
    sm.push(_grads(1))
    wm.push(_grads(1))
    assert sm.save() == 1
    saved = sm.pull()
    sm.push(_grads(2))
    assert [c["step"] for c in sm.checkpoints()] == [1]
    assert sm.restore() == 1
    assert_same_tree(sm.pull(), saved)
    assert_same_tree(sm.pull(), wm.pull())


def test_delete_removes_every_shard(sharded_client, targets, model_name):
    sharded_client.create_model(model_name, _params(), ADAM, split_bytes=SPLIT)
    sharded_client.delete_model(model_name)
    for t in targets:
        with Client(t) as c:
            assert model_name not in {m["name"] for m in c.list_models()}


# -- bad input ------------------------------------------------------------------------------------


def test_specs_and_settings_a_sharded_model_cannot_compute_exactly_are_refused(sharded_client, model_name):
    chain = {"chain": [ADAM, {"clip_by_global_norm": {"max_norm": 1.0}}]}
    with pytest.raises(InvalidArgumentError, match=r"clip_by_global_norm.*only as the first rule of its chain"):
        sharded_client.create_model(model_name, _params(), chain)
    with pytest.raises(InvalidArgumentError, match="reject_nonfinite"):
        sharded_client.create_model(model_name, _params(), ADAM, reject_nonfinite=True)
    assert model_name not in {m["name"] for m in sharded_client.list_models()}
    # a rule that needs each leaf whole (LAMB's trust ratio) keeps its leaves whole instead
    sm = sharded_client.create_model(model_name, _params(), {"lamb": {"learning_rate": 0.01}}, split_bytes=SPLIT)
    assert not any(leaf.split for leaf in sm.shard_map.leaves)


def test_a_gradient_one_shard_would_refuse_changes_no_shard(sharded_client, model_name):
    sm = sharded_client.create_model(model_name, _params(), ADAM, split_bytes=SPLIT)
    sm.push(_grads(1))
    before = sm.pull()
    nan = _grads(2)
    nan["out"][36, 8] = np.nan  # the last row: the last shard's part
    with pytest.raises(InvalidArgumentError, match="'out': non-finite"):
        sm.push(nan)
    wrong = _grads(2)
    wrong["embed"] = np.zeros((99, 8), np.float32)
    with pytest.raises(InvalidArgumentError, match="'embed': shape"):
        sm.push(wrong)
    missing = _grads(2)
    del missing["block"]["b"]
    with pytest.raises(InvalidArgumentError, match="missing leaf 'block/b'"):
        sm.push_pull(missing)
    assert [s["step"] for s in sm.info()["shards"]] == [1, 1, 1]
    assert_same_tree(sm.pull(), before)


def test_a_leaf_pushed_to_the_wrong_shard_is_refused_naming_the_shard(sharded_client, model_name):
    sm = sharded_client.create_model(model_name, _params(), ADAM, split_bytes=SPLIT)
    holder = sm.shard_map.holder("block/w")[0]
    other = sm.shards[(holder + 1) % 3]
    parts = sm._split(sm._leaves(_grads(1), "gradient"))
    wrong = {**parts[(holder + 1) % 3], "block": {"w": np.zeros((8, 8), np.float32)}}
    with pytest.raises(InvalidArgumentError, match=r"shard \d of 3\): unexpected leaf 'block/w'"):
        other.push(wrong)
    assert other.info()["step"] == 0


def test_a_shard_created_with_a_schema_that_is_not_its_part_is_refused(sharded_client, targets, model_name):
    plan = pb.PlanShardsRequest(
        name=model_name,
        optimizer_json='{"sgd": {"learning_rate": 0.1}}',
        schema=[pb.LeafSpec(path="a", dtype="float32", shape=[4]), pb.LeafSpec(path="b", dtype="float32", shape=[2])],
        targets=targets[:2],
    )
    shard_map = sharded_client.call(sharded_client._stub.PlanShards, plan)
    header = pb.CreateModelHeader(
        name=model_name,
        optimizer_json=plan.optimizer_json,
        schema=[pb.LeafSpec(path="a", dtype="float32", shape=[4]), pb.LeafSpec(path="b", dtype="float32", shape=[2])],
        shard=pb.ShardOf(map=shard_map, index=0),
    )
    with pytest.raises(InvalidArgumentError, match=r"shard 0 .*the shard map gives"):
        sharded_client.call(sharded_client._create, iter([pb.CreateModelRequest(header=header).SerializeToString()]))
    header.shard.index = 7
    with pytest.raises(InvalidArgumentError, match="shard index 7"):
        sharded_client.call(sharded_client._create, iter([pb.CreateModelRequest(header=header).SerializeToString()]))


def test_a_map_naming_a_server_that_does_not_hold_the_shard_is_refused(sharded_client, targets, model_name):
    sharded_client.create_model(model_name, _params(), ADAM, split_bytes=SPLIT)
    with Client(targets[1]) as c:  # shard 1 replaced by an unrelated model of the same name
        c.call(c._stub.DeleteModel, pb.DeleteModelRequest(model=model_name))
        c.create_model(model_name, {"x": np.zeros(3, np.float32)}, ADAM)
    with Client(targets[0]) as c, pytest.raises(FailedPreconditionError, match=r"shard 1 .*unsharded model"):
        c.model(model_name)


# -- checkpoints of one step on every shard ------------------------------------------------------


def test_a_save_of_a_step_waits_for_it_and_a_step_left_behind_is_refused(whole_client, model_name):
    m = whole_client.create_model(model_name, _params(), ADAM)
    done: list[int] = []
    saver = threading.Thread(target=lambda: done.append(m.save(step=2, timeout=60)))
    saver.start()
    m.push(_grads(1))
    m.push(_grads(2))
    saved = m.pull()  # step 2: what the save must hold, whatever comes after
    m.push(_grads(3))
    saver.join(timeout=120)
    assert done == [2]
    with pytest.raises(FailedPreconditionError, match="step 1 cannot be saved: the model is at step 3"):
        m.save(step=1)
    assert m.restore(2) == 2
    assert_same_tree(m.pull(), saved)


def test_shard_behind_the_others_without_pushes_to_replay_brings_every_shard_back(sharded_client, model_name):
    sm = sharded_client.create_model(model_name, _params(), ADAM, split_bytes=SPLIT)
    worker = sm.worker("w", replay_window=0, catch_up_wait=0.2)
    worker.pull()
    worker.push_pull(_grads(1))
    assert sm.save() == 1
    saved = sm.pull()
    worker.push_pull(_grads(2))
    sm.shards[1].restore(1)  # shard 1 alone went back (as a restart from its checkpoint would)
    # its step never comes back (nothing to replay): every shard goes back to step 1
    with pytest.raises(FailedPreconditionError, match="every shard went back to step 1"):
        worker.push_pull(_grads(3))
    assert worker.realigned == 1
    assert [s["step"] for s in sm.info()["shards"]] == [1, 1, 1]
    assert_same_tree(worker.pull(), saved)
    worker.push_pull(_grads(2))
    assert [s["step"] for s in sm.info()["shards"]] == [2, 2, 2]


def test_a_pull_of_an_exact_step_gets_that_step_however_fast_the_model_moves_on(servers, whole_client, model_name):
    m = whole_client.create_model(model_name, _params(), ADAM)
    m.push(_grads(1))
    got: list = []
    puller = threading.Thread(target=lambda: got.append(m.pull(exact_step=2, timeout=60)))
    puller.start()
    held = servers[3].store.get(model_name)
    wait_until(lambda: held._expected, "the pull of step 2 to be registered")  # then it cannot miss it
    m.push(_grads(2))
    at_two = m.pull()
    m.push(_grads(3))
    m.push(_grads(4))
    puller.join(timeout=120)
    assert len(got) == 1
    assert_same_tree(got[0], at_two)
    with pytest.raises(FailedPreconditionError, match="step 1 is gone: the model is at step 4"):
        m.pull(exact_step=1)
    assert_same_tree(m.pull(exact_step=4), m.pull())
