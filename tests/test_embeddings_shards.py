"""Tables over several servers: an `Init` table split by rows is drawn shard by shard exactly as one
server draws it whole, `Rows` pushes and row pulls route each id to the shard that holds it, and an
initialized table's checkpoint restores bitwise."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from optserve.client import Client, Init, Rows
from tests.conftest import in_process_servers

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
