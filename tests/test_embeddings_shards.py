"""Tables over several servers: an `Init` table split by rows is drawn shard by shard exactly as one
server draws it whole, `Rows` pushes and row pulls route each id to the shard that holds it, row
pulls return the rows of one step on every shard, and an initialized table's checkpoint restores
bitwise."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from optserve.client import Client, Init, Rows
from tests.conftest import in_process_servers, wait_until

SPEC = {
    "partition": [
        {"params": ["table"], "optimizer": {"lazy_adam": {"learning_rate": 0.01}}},
        {"params": "**", "optimizer": {"adam": {"learning_rate": 0.01}}},
    ]
}


def _params():
    return {"table": Init((200, 4), "float32", "truncated_normal", stddev=0.1, seed=9), "w": np.ones(3, np.float32)}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    with in_process_servers([str(root / "s0"), str(root / "s1")]) as srvs:
        yield srvs


def test_split_table_matches_the_whole_one(servers, model_name):
    with Client([s.address for s in servers], timeout=60) as both, Client(servers[0].address, timeout=60) as one:
        sharded = both.create_model(model_name, _params(), SPEC, split_bytes=1024)
        whole = one.create_model(model_name + "-whole", _params(), SPEC)
        assert len({p.shard for p in sharded.shard_map.leaves[0].pieces}) == 2  # the table is split
        np.testing.assert_array_equal(sharded.pull()["table"], whole.pull()["table"])
        rng = np.random.default_rng(0)
        for ids in ([0, 199, 199, 100, 5], [], [150, 151, 3]):
            g = {"table": Rows(ids, rng.standard_normal((len(ids), 4)).astype(np.float32)), "w": np.ones(3, np.float32)}
            sharded.push(g)
            whole.push(g)
        a, b = sharded.pull(), whole.pull()
        np.testing.assert_allclose(a["table"], b["table"], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(a["w"], b["w"])
        ids = np.array([199, 0, 150, 3, 3])
        np.testing.assert_array_equal(sharded.pull_rows({"table": ids})["table"], a["table"][ids])
        g = {"table": Rows([0, 199], np.ones((2, 4), np.float32)), "w": np.ones(3, np.float32)}
        got = sharded.push_pull(g, rows={"table": ids})
        np.testing.assert_allclose(got["table"], whole.push_pull(g, rows={"table": ids})["table"], rtol=1e-6, atol=1e-7)
        low = sharded.push_pull(g, rows={"table": [1, 2]})  # rows of one shard: the other only pushes
        np.testing.assert_allclose(
            low["table"], whole.push_pull(g, rows={"table": [1, 2]})["table"], rtol=1e-6, atol=1e-7
        )


def test_checkpoint_of_an_initialized_table_restores_bitwise(servers, model_name):
    with Client(servers[0].address, timeout=60) as one:
        model = one.create_model(model_name, _params(), SPEC)
        model.push({"table": Rows([1, 2], np.ones((2, 4), np.float32)), "w": np.ones(3, np.float32)})
        saved = model.pull()
        step = model.save()
        model.push({"table": Rows([1, 7], np.ones((2, 4), np.float32)), "w": np.ones(3, np.float32)})
        model.restore(step)
        again = model.pull()
        for k in saved:
            np.testing.assert_array_equal(again[k], saved[k])


def test_sharded_worker_push_pull_of_rows(servers, model_name):
    with Client([s.address for s in servers], timeout=60) as both:
        sharded = both.create_model(model_name, _params(), SPEC, split_bytes=1024)
        before = sharded.pull()["table"]
        worker = sharded.worker("w0")
        worker.pull()
        g = {"table": Rows([0, 199], np.ones((2, 4), np.float32)), "w": np.ones(3, np.float32)}
        got = worker.push_pull(g, rows={"table": [199, 50]})
        assert not np.array_equal(got["table"][0], before[199])
        np.testing.assert_array_equal(got["table"][1], before[50])  # untouched under lazy_adam
        np.testing.assert_array_equal(got["table"], sharded.pull()["table"][[199, 50]])


ROUND_IDS = {"w0": [[0, 5, 5, 150], [1, 150], [7]], "w1": [[5, 199], [180], [199, 0, 0]]}


def _rows_grad(worker_id: str, seq: int) -> dict:
    ids = ROUND_IDS[worker_id][seq - 1]
    values = np.random.default_rng([seq, int(worker_id[1:])]).standard_normal((len(ids), 4)).astype(np.float32)
    return {"table": Rows(ids, values), "w": np.full(3, 0.5 * seq, np.float32)}


def test_sync_rounds_that_shard_0_decides_apply_lazy_rows_like_the_whole_model(servers, model_name):
    """core/shard_rounds.py: every shard applies a lazy table's round mean only at the rows the decided
    contributions touched, as the whole model's round does (rows of a round's other workers stay)."""
    settings = {"mode": "sync", "workers": 3, "quorum": 2}
    with Client([s.address for s in servers], timeout=60) as both, Client(servers[0].address, timeout=60) as one:
        sharded = both.create_model(model_name, _params(), SPEC, split_bytes=1024, **settings)
        whole = one.create_model(model_name + "-whole", _params(), SPEC, **settings)
        assert sharded.decides_rounds
        initial = sharded.pull()["table"]
        errors: list[BaseException] = []

        def train(worker_id: str) -> None:
            try:
                w = sharded.worker(worker_id)
                w.pull()
                for seq in range(1, len(ROUND_IDS[worker_id]) + 1):
                    w.push_pull(_rows_grad(worker_id, seq))
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=train, args=(wid,)) for wid in ROUND_IDS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        rounds = [sharded.shards[0].decide_round(step)["contributors"] for step in (1, 2, 3)]
        for step, contributors in enumerate(rounds):
            assert sorted(w for w, _ in contributors) == ["w0", "w1"], rounds
            for wid, seq in contributors:
                whole.push(_rows_grad(wid, seq), base_step=step)
        got, want = sharded.pull(min_step=3, timeout=30), whole.pull(min_step=3, timeout=30)
        # (rows 5 and 150, touched in rounds 1 and 2 only, would have moved again in a dense round 3)
        np.testing.assert_allclose(got["table"], want["table"], rtol=1e-6, atol=1e-7)
        never = np.setdiff1d(np.arange(200), np.concatenate([np.concatenate(v) for v in ROUND_IDS.values()]))
        np.testing.assert_array_equal(got["table"][never], initial[never])


def _table_grads(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = [0, 199, 5, 150]  # rows of both shards
    return {"table": Rows(ids, rng.standard_normal((4, 4)).astype(np.float32)), "w": np.ones(3, np.float32)}


def _ahead_on_shard_0(sharded, grads: dict) -> list[dict]:
    """Pushes `grads` to shard 0 only (as a push that reached it before the other shard), leaving
    shard 1 a step behind; returns each shard's part."""
    parts = sharded._split(sharded._leaves(grads, "gradient"))
    sharded.shards[0].push(parts[0])
    return parts


def _in_thread(call) -> tuple[threading.Thread, list]:
    got: list = []
    t = threading.Thread(target=lambda: got.append(call()))
    t.start()
    return t, got


def test_a_row_pull_returns_one_step_of_every_shard(servers, model_name):
    ids = np.array([199, 0, 150, 5, 5, 120])
    with Client([s.address for s in servers], timeout=60) as both, Client(servers[0].address, timeout=60) as one:
        sharded = both.create_model(model_name, _params(), SPEC, split_bytes=1024)
        whole = one.create_model(model_name + "-whole", _params(), SPEC)
        parts = _ahead_on_shard_0(sharded, _table_grads(1))
        whole.push(_table_grads(1))
        at_one = whole.pull_rows({"table": ids})["table"]
        # shard 0 answers at step 1, shard 1 at step 0: shard 1 is asked again for exactly step 1
        puller, got = _in_thread(lambda: sharded.pull_rows({"table": ids}, timeout=60))
        behind = servers[1].store.get(model_name)
        wait_until(lambda: behind._expected, "the row pull of step 1 to be registered on shard 1")
        sharded.shards[1].push(parts[1])  # shard 1 gets to step 1 ...
        sharded.push(_table_grads(2))  # ... and past it: the pull still gets step 1's rows
        puller.join(timeout=120)
        assert len(got) == 1
        np.testing.assert_allclose(got[0]["table"], at_one, rtol=1e-6, atol=1e-7)
        assert sharded.last_step == 1
        whole.push(_table_grads(2))
        np.testing.assert_allclose(
            sharded.pull_rows({"table": ids})["table"], whole.pull_rows({"table": ids})["table"], rtol=1e-6, atol=1e-7
        )


def test_a_row_pull_of_an_exact_step_gets_that_step_however_fast_the_model_moves_on(servers, model_name):
    ids = np.array([150, 3, 3])
    with Client(servers[0].address, timeout=60) as one:
        m = one.create_model(model_name, _params(), SPEC)
        m.push(_table_grads(1))
        puller, got = _in_thread(lambda: m.pull_rows({"table": ids}, exact_step=2, timeout=60))
        held = servers[0].store.get(model_name)
        wait_until(lambda: held._expected, "the row pull of step 2 to be registered")
        m.push(_table_grads(2))
        at_two = m.pull_rows({"table": ids})["table"]
        m.push(_table_grads(3))
        puller.join(timeout=120)
        assert len(got) == 1 and m.step == 3
        np.testing.assert_array_equal(got[0]["table"], at_two)


@pytest.mark.parametrize("by", ["model", "worker"])
def test_push_pull_of_rows_returns_them_at_the_step_of_its_parameters(servers, model_name, by):
    ids = np.array([199, 0, 150, 5])
    with Client([s.address for s in servers], timeout=60) as both:
        sharded = both.create_model(model_name, _params(), SPEC, split_bytes=1024)
        pusher = sharded.worker("w0") if by == "worker" else sharded
        if by == "worker":
            pusher.pull()
        parts = _ahead_on_shard_0(sharded, _table_grads(1))
        # its push takes shard 0 to step 2 and shard 1 to step 1: shard 1's rows are pulled at step 2
        caller, got = _in_thread(lambda: pusher.push_pull(_table_grads(2), rows={"table": ids}))
        behind = servers[1].store.get(model_name)
        wait_until(lambda: behind._expected, "the row pull of step 2 to be registered on shard 1")
        sharded.shards[1].push(parts[1])
        caller.join(timeout=120)
        assert len(got) == 1
        # shard 1 applied the two pushes in the other order (as concurrent workers' pushes may
        # reach shards), so no unsharded twin holds its step 2: the model's own pull of step 2 does
        whole = sharded.pull()
        assert sharded.last_step == 2
        np.testing.assert_array_equal(got[0]["table"], whole["table"][ids])
