"""Leases over shards (docs/design.md, "Shards", "Sync rounds" and "Membership and leases";
core/shard_rounds.py, client/rounds.py): a sync model over two real servers, created without a
heartbeat setting (the default: leases), has its rounds decided by shard 0. Three workers train a
round; one stops heartbeating (its worker closed, as a dead process stops renewing); the next round
closes once that lease expires on shard 0 ("membership", not a timeout), with the same two
contributors on every shard. A fourth worker joins while a round is open: shard 0 counts it from the
next round and the other shard, which had taken its push, drops it as shard 0 decided. Every shard
holds what SGD fed the recorded rounds gives. Each phase ends on an event (a call returning, a
pending count, the membership epoch), never on the clock."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from optserve.client import Client
from optserve.client.errors import FailedPreconditionError
from tests.conftest import in_process_servers, wait_until

LR = 0.5
PARAMS = {"a": np.zeros(48, np.float32), "b": np.zeros(32, np.float32)}  # one leaf per shard


def _grad(worker_id: str, seq: int) -> dict:
    rng = np.random.default_rng([int(worker_id[1:]), seq])
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in PARAMS.items()}


def _round(workers: list) -> list[BaseException]:
    """Each worker push_pulls its next gradient on a thread of its own (a round waits for all of
    them); returns what they raised."""
    errors: list[BaseException] = []

    def one(w) -> None:
        try:
            w.push_pull(_grad(w.worker_id, w.seq + 1))
        except BaseException as e:  # reported to the test
            errors.append(e)

    threads = [threading.Thread(target=one, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a round never closed"
    return errors


def _twin(rounds: list[dict]) -> dict:
    """SGD fed the rounds: each round's gradients summed in shard 0's order, averaged."""
    w = {k: v.copy() for k, v in PARAMS.items()}
    for r in rounds:
        for k in w:
            total = None
            for worker_id, seq in r["contributors"]:
                g = _grad(worker_id, seq)[k]
                total = g.copy() if total is None else total + g
            assert total is not None
            w[k] = w[k] + np.float32(-LR) * (total / np.float32(len(r["contributors"])))
    return w


@pytest.fixture(scope="module")
def servers():
    with in_process_servers([None, None]) as srvs:
        yield srvs


def test_a_worker_that_stops_heartbeating_leaves_every_shards_rounds_alike(servers):
    with Client([s.address for s in servers], timeout=60) as client:
        sm = client.create_model("elastic", PARAMS, {"sgd": {"learning_rate": LR}}, mode="sync", workers=3)
        assert sm.decides_rounds and all(sh.info()["settings"]["heartbeat"] == 5.0 for sh in sm.shards)
        assert all(len(sm.shard_map.shard_schema(i)) == 1 for i in range(2))
        models = [s.store.get("elastic") for s in servers]
        workers = [sm.worker(f"w{i}") for i in range(3)]
        try:
            for w in workers:
                w.pull()
            assert [m.membership_info()[0] for m in models] == [3, 3]
            assert _round(workers) == []  # step 1: all three
            workers[2].close()  # w2 stops renewing its leases on both shards
            assert _round(workers[:2]) == []  # step 2: closed by w2's expiry on shard 0
            for m in models:  # w2 left every shard's membership (each by its own lease)
                assert m.wait_for_epoch(4, timeout=120)
                assert "w2" not in [w for w, _, _ in m.membership_info()[1]]

            # w3 joins during the round for step 3: shard 0 refuses its push (counted from the next
            # round); shard 1 takes it and drops it when shard 0's decision, without it, arrives
            w3 = sm.worker("w3")
            w3.pull()
            errors: list[BaseException] = []
            joiner = threading.Thread(target=lambda: errors.extend(_round([w3])))
            joiner.start()
            wait_until(lambda: sm.shards[1].info()["pending_contributions"] == 1, "w3's push on shard 1", 120)
            assert _round(workers[:2]) == []  # step 3: w0 and w1
            joiner.join(timeout=180)
            assert not joiner.is_alive()
            assert len(errors) == 1 and isinstance(errors[0], FailedPreconditionError), errors
            assert "counted from the next round" in errors[0].message
            w3.pull()
            assert _round([workers[0], workers[1], w3]) == []  # step 4: w3 counted
            infos = [sh.info() for sh in sm.shards]
            final = sm.pull()
        finally:
            for w in workers:
                w.close()

    assert [i["step"] for i in infos] == [4, 4]
    rounds = [{r["step"]: r for r in i["recent_rounds"]} for i in infos]
    for shard in rounds:
        assert sorted(shard) == [1, 2, 3, 4]
        for step, who, closed_by in (
            (1, ["w0", "w1", "w2"], "quorum"),
            (2, ["w0", "w1"], "membership"),
            (3, ["w0", "w1"], "quorum"),
            (4, ["w0", "w1", "w3"], "quorum"),
        ):
            assert sorted(w for w, _ in shard[step]["contributors"]) == who, (step, shard[step])
            assert shard[step]["closed_by"] == closed_by, (step, shard[step])
    # the same contributors, in the same order, on both shards; shard 0 says whom each round expected
    assert all(rounds[0][s]["contributors"] == rounds[1][s]["contributors"] for s in range(1, 5))
    assert [rounds[0][s]["expected"] for s in range(1, 5)] == [3, 2, 2, 3]
    assert all(i["counters"]["sync_timeouts"] == 0 for i in infos)
    twin = _twin([rounds[0][s] for s in range(1, 5)])
    for k in PARAMS:
        np.testing.assert_allclose(final[k], twin[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_a_shard_other_than_0_refuses_no_join_for_its_own_membership(servers):
    """Each shard keeps its own leases, which may differ (here two workers only shard 1 ever saw
    fill its `workers`); only shard 0's membership gates joins and rounds, so the workers that
    shard 0 takes are taken everywhere."""
    with Client([s.address for s in servers], timeout=60) as client:
        sm = client.create_model("ghosts", PARAMS, {"sgd": {"learning_rate": LR}}, mode="sync", workers=2)
        for i, ghost in enumerate(("ghost-a", "ghost-b"), start=1):
            sm.shards[1].heartbeat(ghost, i)  # a header-only pull naming a worker: joins shard 1 only
        workers = [sm.worker(f"w{i}") for i in range(2)]
        try:
            for w in workers:
                w.pull()
            assert _round(workers) == []
            infos = [sh.info() for sh in sm.shards]
        finally:
            for w in workers:
                w.close()
        client.delete_model("ghosts")
    assert [i["live_workers"] for i in infos] == [2, 4] and [i["step"] for i in infos] == [1, 1]
    assert infos[0]["recent_rounds"][0]["contributors"] == infos[1]["recent_rounds"][0]["contributors"]
