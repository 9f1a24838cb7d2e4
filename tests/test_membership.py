"""Membership with leases (core/membership.py, core/sync.py, core/model.py) behind the Model, on a
clock the test moves: joins, sessions and expiries advance the epoch; a sync round expects the live
members of its epoch, closes when an expiry completes it and counts a joiner from the next round;
checkpoints carry the membership; bad settings and fields are INVALID_ARGUMENT naming the model
and the field. The elastic job with real worker processes is tests/test_elastic.py."""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys

import numpy as np
import pytest

from optserve.client.errors import InvalidArgumentError
from optserve.client.messages import settings_from_json, settings_message
from optserve.server.core import membership
from optserve.server.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from optserve.server.core.settings import DEFAULT_HEARTBEAT_SECONDS, ModelSettings
from optserve.server.core.workers import PushReply
from optserve.server.state import manifest, model_state
from optserve.v1 import optserve_pb2 as pb
from tests.core_helpers import grad, make_model, push, weights

W0 = np.array([1.0, 2.0, 3.0], np.float32)


def _elastic(workers: int = 3, **kwargs) -> ModelSettings:
    return ModelSettings(mode="sync", workers=workers, heartbeat_seconds=1.0, sync_timeout=600.0, **kwargs)


def _closed(model) -> list[tuple[int, tuple, int, str]]:
    return [(r.step, tuple(w for w, _ in r.contributors), r.expected, r.closed_by) for r in model.closed_rounds()]


def test_joins_new_sessions_and_expiries_advance_the_epoch(manual_clock):
    clock = manual_clock(membership)
    model = make_model(ModelSettings(heartbeat_seconds=1.0))  # async: recorded, semantics unchanged
    push(model, grad(1.0), worker_id="a", seq=1, session=7)
    model.renew_lease("b", 9)  # a pull naming b
    epoch, members = model.membership_info()
    assert epoch == 2 and [(w, lease.joined_epoch, left) for w, lease, left in members] == [
        ("a", 1, 2.0),
        ("b", 2, 2.0),
    ]
    clock.advance(1.5)
    push(model, grad(1.0), worker_id="a", seq=2, session=7)  # renews a: b's lease runs out first
    clock.advance(0.6)
    model.check_deadlines()
    epoch, members = model.membership_info()
    assert epoch == 3 and [w for w, _, _ in members] == ["a"]
    assert model.wait_for_epoch(3, timeout=0)  # the event a caller waits on
    model.renew_lease("a", 8)  # a new session of a replaces the old one
    assert model.membership_info()[0] == 4 and model.membership.session_of("a") == 8
    assert model.step == 2
    model.mark_deleted()


def test_new_models_have_leases_of_two_default_heartbeats(manual_clock):
    clock = manual_clock(membership)
    settings = ModelSettings(mode="sync", workers=2).validated("m")
    assert settings.heartbeat_seconds == DEFAULT_HEARTBEAT_SECONDS == 5.0 and settings.lease_seconds == 10.0
    model = make_model(settings)
    push(model, grad(1.0), base_step=0, worker_id="a", seq=1)
    clock.advance(9.9)
    model.check_deadlines()
    assert model.membership_info()[0] == 1
    clock.advance(0.2)
    model.check_deadlines()
    assert model.membership_info() == (2, [])
    model.mark_deleted()


def test_files_written_before_leases_keep_a_fixed_membership():
    """A manifest without heartbeat_seconds is a model of before leases: 0, not the new default."""
    old = {k: v for k, v in ModelSettings(mode="sync", workers=2).to_json().items() if k != "heartbeat_seconds"}
    assert ModelSettings.from_json(old, "m").heartbeat_seconds == 0.0
    assert ModelSettings.from_json({**old, "heartbeat_seconds": 2.5}, "m").heartbeat_seconds == 2.5
    assert settings_from_json(old).HasField("heartbeat_seconds") and settings_from_json(old).heartbeat_seconds == 0
    assert not settings_message(
        mode="sync",
        workers=2,
        quorum=None,
        max_staleness=None,
        sync_timeout=None,
        staleness_scaling=None,
        ema=None,
        ema_debias=False,
    ).HasField("heartbeat_seconds")  # not said: the server's default


def test_leases_never_expire_with_heartbeat_zero(manual_clock):
    clock = manual_clock(membership)
    model = make_model(ModelSettings(mode="sync", workers=2, heartbeat_seconds=0.0))
    push(model, grad(1.0), base_step=0, worker_id="a", seq=1)
    clock.advance(1e6)
    model.check_deadlines()
    epoch, members = model.membership_info()
    assert epoch == 1 and [(w, math.isinf(left)) for w, _, left in members] == [("a", True)]
    assert model.step == 0  # the fixed membership still expects 2
    model.mark_deleted()


def test_an_expired_member_leaves_the_round_at_once_and_a_joiner_counts_from_the_next(manual_clock):
    clock = manual_clock(membership)
    model = make_model(_elastic(workers=3))
    for w in "abc":  # the first round expects `workers`: it waits for the job to arrive
        push(model, grad(1.0), base_step=0, worker_id=w, seq=1)
    assert model.step == 1
    clock.advance(1.5)
    push(model, grad(2.0), base_step=1, worker_id="a", seq=2)
    push(model, grad(4.0), base_step=1, worker_id="b", seq=2)
    assert model.step == 1  # c is still a member
    clock.advance(0.6)  # c's lease (renewed at its push, 2.1 s ago) has run out, a's and b's have not
    model.check_deadlines()
    assert model.step == 2 and model.counters().sync_timeouts == 0
    np.testing.assert_allclose(weights(model), W0 - 0.5 * 1.0 - 0.5 * 3.0)
    assert _closed(model)[-1] == (2, ("a", "b"), 2, "membership")
    # d joins (a pull) during the round for step 3: counted from the next round
    model.renew_lease("d", 0)
    with pytest.raises(FailedPrecondition, match=r"worker 'd' joined at membership epoch 5.*counted from the next"):
        push(model, grad(9.0), base_step=2, worker_id="d", seq=1)
    push(model, grad(1.0), base_step=2, worker_id="a", seq=3)
    assert push(model, grad(1.0), base_step=2, worker_id="b", seq=3) == (PushReply(3, applied=True), False)
    push(model, grad(1.0), base_step=3, worker_id="a", seq=4)
    push(model, grad(1.0), base_step=3, worker_id="b", seq=4)
    assert model.step == 3  # the round for step 4 expects d too
    push(model, grad(1.0), base_step=3, worker_id="d", seq=2)
    assert model.step == 4
    assert _closed(model)[-2:] == [(3, ("a", "b"), 2, "quorum"), (4, ("a", "b", "d"), 3, "quorum")]
    model.mark_deleted()


def test_a_join_beyond_workers_is_refused_and_changes_nothing(manual_clock):
    manual_clock(membership)
    model = make_model(_elastic(workers=2))
    push(model, grad(1.0), base_step=0, worker_id="a", seq=1)
    push(model, grad(1.0), base_step=0, worker_id="b", seq=1)
    with pytest.raises(ResourceExhausted, match=r"model 'm': worker 'c' cannot join.*settings.workers"):
        push(model, grad(1.0), base_step=1, worker_id="c", seq=1)
    model.renew_lease("c", 1)  # a pull is not refused, and does not join
    assert model.membership_info()[0] == 2 and model.step == 1 and model.pending_contributions() == 0
    model.mark_deleted()


def test_quorum_fraction_of_the_expected_members():
    model = make_model(ModelSettings(mode="sync", workers=4, quorum_fraction=0.5))
    push(model, grad(1.0), base_step=0, worker_id="a", seq=1)
    assert push(model, grad(3.0), base_step=0, worker_id="b", seq=1)[0] == PushReply(1, applied=True)
    np.testing.assert_allclose(weights(model), W0 - 0.5 * 2.0)
    model.mark_deleted()


def test_a_new_session_starts_its_seqs_again_and_the_old_one_is_refused():
    model = make_model()
    for seq in (1, 2, 3):
        push(model, grad(1.0), worker_id="w", seq=seq, session=11)
    # the process restarts with the same worker id: its seq 1 is a new push, not a retry of seq 1
    assert push(model, grad(1.0), worker_id="w", seq=1, session=22) == (PushReply(4, applied=True), False)
    assert push(model, grad(7.0), worker_id="w", seq=1, session=22) == (PushReply(4, applied=True), True)
    with pytest.raises(FailedPrecondition, match="session 11 was replaced by a newer session"):
        push(model, grad(1.0), worker_id="w", seq=3, session=11)  # a late retry of the old process
    with pytest.raises(FailedPrecondition, match="session 11 was replaced"):
        model.renew_lease("w", 11)
    assert model.worker_states() == [("w", 1, 3)] and model.worker_sessions() == {"w": 22}
    assert model.step == 4 and model.membership_info()[0] == 2
    model.mark_deleted()


def test_a_new_session_in_an_open_sync_round_waits_for_the_next():
    model = make_model(ModelSettings(mode="sync", workers=2))
    push(model, grad(1.0), base_step=0, worker_id="w", seq=5, session=1)
    with pytest.raises(FailedPrecondition, match="already contributed seq 5"):
        push(model, grad(1.0), base_step=0, worker_id="w", seq=1, session=2)
    push(model, grad(1.0), base_step=0, worker_id="v", seq=1)
    # the old session's contribution was applied, but the worker's record is its new session's
    assert model.step == 1 and model.worker_sessions()["w"] == 2
    assert push(model, grad(1.0), base_step=1, worker_id="w", seq=1, session=2)[1] is False
    model.mark_deleted()


def test_checkpoints_carry_the_membership_and_restored_leases_expire_unless_renewed(manual_clock):
    clock = manual_clock(membership)
    model = make_model(ModelSettings(heartbeat_seconds=1.0))
    push(model, grad(1.0), worker_id="a", seq=1, session=5)
    model.renew_lease("b", 6)
    host = model_state.capture(model).to_host()
    saved = json.loads(json.dumps(manifest.to_manifest(host)))
    assert saved["membership"] == {
        "epoch": 2,
        "seen": ["a", "b"],
        "members": [
            {"worker_id": "a", "session": 5, "joined_epoch": 1},
            {"worker_id": "b", "session": 6, "joined_epoch": 2},
        ],
    }
    assert saved["workers"]["a"]["session"] == 5
    for bad, field in (
        ({**saved["membership"], "epoch": -1}, "membership.epoch"),
        ({**saved["membership"], "members": [{"worker_id": "", "session": 1, "joined_epoch": 1}]}, r"members\[0\]"),
        ({"epoch": 1}, "membership"),
    ):
        with pytest.raises(model_state.StateError, match=field):
            manifest.from_manifest({**saved, "membership": bad}, host.tensor_groups(), "file")
    restored = manifest.from_manifest(saved, host.tensor_groups(), "file")
    clock.advance(10.0)
    model.replace_state(model_state.prepare(model, restored))
    epoch, members = model.membership_info()
    assert epoch == 2 and [(w, lease.session, left) for w, lease, left in members] == [("a", 5, 2.0), ("b", 6, 2.0)]
    clock.advance(1.0)
    model.renew_lease("a", 5)
    clock.advance(1.5)
    model.check_deadlines()
    assert [w for w, _, _ in model.membership_info()[1]] == ["a"] and model.membership_info()[0] == 3
    # an older file has no membership: none restored
    older = {k: v for k, v in saved.items() if k != "membership"}
    model.replace_state(model_state.prepare(model, manifest.from_manifest(older, host.tensor_groups(), "file")))
    assert model.membership_info() == (0, [])
    model.mark_deleted()


@pytest.mark.parametrize(
    "settings, field",
    [
        (ModelSettings(heartbeat_seconds=-1.0), "settings.heartbeat_seconds"),
        (ModelSettings(heartbeat_seconds=math.nan), "settings.heartbeat_seconds"),
        (ModelSettings(mode="sync", workers=2, quorum_fraction=1.5), "settings.quorum_fraction"),
        (ModelSettings(mode="sync", workers=2, quorum=1, quorum_fraction=0.5), "settings.quorum_fraction"),
        (ModelSettings(quorum_fraction=0.5), "settings.mode"),
    ],
)
def test_bad_membership_settings_name_the_model_and_field(settings, field):
    with pytest.raises(InvalidArgument, match=rf"model 'm': {field}"):
        settings.validated("m")


def test_bad_fields_over_the_wire_name_the_model_and_field(client, model_name):
    with pytest.raises(InvalidArgumentError, match=rf"model '{model_name}': settings.heartbeat_seconds"):
        client.create_model(model_name, {"w": W0}, {"sgd": {"learning_rate": 0.1}}, heartbeat=-2.0)
    model = client.create_model(model_name, {"w": W0}, {"sgd": {"learning_rate": 0.1}}, heartbeat=5.0)
    header = pb.PushHeader(model=model_name, session=3)
    with pytest.raises(InvalidArgumentError, match=rf"model '{model_name}': session 3 given without a worker_id"):
        model.push_raw(header, [("w", np.zeros(3, np.float32))])
    with pytest.raises(InvalidArgumentError, match=rf"model '{model_name}': pull session 4 given without a worker_id"):
        client.call(client._pull_one, pb.PullRequest(model=model_name, session=4))
    info = model.info()
    assert info["step"] == 0 and info["membership_epoch"] == 0 and info["settings"]["heartbeat"] == 5.0
    with model.worker("w") as worker:
        worker.pull()
        info = model.info()
        assert info["membership_epoch"] == 1 and info["live_workers"] == 1
        assert info["members"]["w"]["session"] == worker.session and info["members"]["w"]["joined_epoch"] == 1
        assert 0 < info["members"]["w"]["lease_seconds_left"] <= 10.0


def test_session_zero_is_no_session_and_continues_the_workers_seqs():
    """A client that knows no sessions (a hand-written one, an older one) sends 0: its seqs count in
    whatever session the worker has, and its retries are answered from it, as before sessions."""
    model = make_model()
    push(model, grad(1.0), worker_id="w", seq=1, session=5)
    assert push(model, grad(1.0), worker_id="w", seq=1) == (PushReply(1, applied=True), True)
    assert push(model, grad(1.0), worker_id="w", seq=2)[1] is False
    model.renew_lease("w", 0)
    assert model.membership_info()[0] == 1 and model.worker_sessions() == {"w": 5}
    assert model.worker_states() == [("w", 2, 1)]
    push(model, grad(1.0), worker_id="w", seq=3, session=5)  # the session's own seqs go on after it
    assert model.step == 3
    model.mark_deleted()


def test_a_round_whose_members_all_left_expects_the_workers_that_come(manual_clock):
    clock = manual_clock(membership)
    model = make_model(_elastic(workers=2))
    push(model, grad(1.0), base_step=0, worker_id="a", seq=1)
    push(model, grad(1.0), base_step=0, worker_id="b", seq=1)
    clock.advance(2.5)
    model.check_deadlines()
    assert model.membership_info() == (4, [])
    model.renew_lease("c", 0)  # nobody the open round expected is left: c is counted in it
    assert push(model, grad(1.0), base_step=1, worker_id="c", seq=1)[0] == PushReply(2, applied=True)
    model.mark_deleted()


def test_leases_over_several_shards_are_decided_by_shard_0():
    """A sync model over shards with leases is admitted; shard 0 decides its rounds (each shard's
    own leases would let them close a round with different contributors); without leases and with
    quorum == workers the shards close their rounds alone, as before."""
    from optserve.client.rounds import decides_rounds as client_decides
    from optserve.server.core.shard_rounds import decides_rounds
    from optserve.server.core.sharding import check_shardable
    from optserve.server.spec import compile_spec

    compiled = compile_spec({"sgd": {"learning_rate": 0.1}}, ["w"])
    leased, fixed = (
        ModelSettings(mode="sync", workers=2).validated("m"),
        ModelSettings(mode="sync", workers=2, heartbeat_seconds=0.0).validated("m"),
    )
    check_shardable("m", compiled, leased, 2)
    assert decides_rounds(leased, 2, False) and not decides_rounds(fixed, 2, False)
    assert not decides_rounds(leased, 1, False)
    assert client_decides({"mode": "sync", "workers": 2, "quorum": 2, "heartbeat": 5.0}, 2, False)
    assert not client_decides({"mode": "sync", "workers": 2, "quorum": 2, "heartbeat": None}, 2, False)


def test_a_bad_worker_session_in_a_file_is_refused_naming_the_field():
    model = make_model()
    push(model, grad(1.0), worker_id="a", seq=1, session=5)
    host = model_state.capture(model).to_host()
    saved = json.loads(json.dumps(manifest.to_manifest(host)))
    for bad in (-1, "5", 2**64, True):
        saved["workers"]["a"]["session"] = bad
        with pytest.raises(model_state.StateError, match=r"workers\['a'\]\.session"):
            manifest.from_manifest(saved, host.tensor_groups(), "file")
    model.mark_deleted()


_DOOMED_WORKER = """
import sys
from optserve.client import Client
with Client(sys.argv[1], timeout=60) as client:
    worker = client.model(sys.argv[2]).worker("doomed")
    worker.pull()
    print("READY", flush=True)
    sys.stdin.read()  # parked (heartbeats go on) until the test kills this process or closes stdin
"""


def test_a_model_created_without_a_heartbeat_setting_has_leases_that_a_killed_worker_loses(client, server, model_name):
    """No heartbeat given: the server's default (5 s, leases of 10 s). A worker process killed with
    SIGKILL stops renewing its lease and leaves: the test waits for the epoch to move (the event the
    model exposes), bounded only as a safety net."""
    model = client.create_model(model_name, {"w": W0}, {"sgd": {"learning_rate": 0.1}}, mode="sync", workers=2)
    assert model.info()["settings"]["heartbeat"] == DEFAULT_HEARTBEAT_SECONDS
    proc = subprocess.Popen(
        [sys.executable, "-c", _DOOMED_WORKER, server.address, model_name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], 120)[0], "the worker said nothing in 120 s"
        assert proc.stdout.readline().strip() == "READY"
        info = model.info()
        left = info["members"]["doomed"]["lease_seconds_left"]
        assert info["membership_epoch"] == 1 and left is not None and 0 < left <= 2 * DEFAULT_HEARTBEAT_SECONDS
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
        assert server.store.get(model_name).wait_for_epoch(2, timeout=120), "the killed worker's lease never expired"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    info = model.info()
    assert info["membership_epoch"] == 2 and info["members"] == {} and info["live_workers"] == 0
