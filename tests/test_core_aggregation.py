"""Async and sync aggregation (core/async_push.py, core/sync.py) behind the Model, without a server:
staleness, quorum and weights, duplicates and the retry window, stale pushes, aborted streams,
rounds that may not wait, dropped rounds, and sync_timeout on a clock the test moves."""

from __future__ import annotations

import numpy as np
import pytest

from optserve.server.core import sync
from optserve.server.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NonFiniteUpdate,
    ResourceExhausted,
)
from optserve.server.core.settings import ModelSettings
from optserve.server.core.workers import PushReply
from tests.core_helpers import grad, make_model, params, push, receive, weights

W0 = params()["w"]


def _sync(workers: int = 3, quorum: int = 0, **kwargs) -> ModelSettings:
    # a fixed membership: these rounds' pushes send no heartbeats, and a lease expiring on the real
    # clock between two of them would close a round early (leases: tests/test_membership.py)
    kwargs.setdefault("heartbeat_seconds", 0.0)
    return ModelSettings(mode="sync", workers=workers, quorum=quorum, **kwargs)


# -- async ------------------------------------------------------------------------------------------


def test_async_refuses_pushes_beyond_max_staleness_and_steps_from_the_future():
    model = make_model(ModelSettings(max_staleness=1))
    push(model, grad(0.0))
    push(model, grad(0.0))
    with pytest.raises(FailedPrecondition, match="2 steps behind the current step 2"):
        push(model, grad(1.0), base_step=0)
    with pytest.raises(InvalidArgument, match="ahead of the current step"):
        push(model, grad(1.0), base_step=3)
    with pytest.raises(InvalidArgument, match="negative"):
        push(model, grad(1.0), base_step=-1)
    assert push(model, grad(1.0), base_step=1) == (PushReply(3, applied=True), False)
    assert model.counters().stale_rejected == 1 and model.step == 3


def test_async_inverse_staleness_scaling_scales_the_update():
    model = make_model(ModelSettings(staleness_scaling="inverse"))
    push(model, grad(0.0))
    push(model, grad(1.0), base_step=0)  # one step behind: half the update
    np.testing.assert_allclose(weights(model), W0 - 0.5 * 0.5)


def test_async_retry_gets_the_original_reply_and_applies_nothing():
    model = make_model()
    first = push(model, grad(1.0), worker_id="w", seq=1)
    push(model, grad(1.0), worker_id="w", seq=2)
    assert push(model, grad(7.0), worker_id="w", seq=1) == (first[0], True)
    assert model.step == 2 and model.counters().duplicates == 1
    np.testing.assert_allclose(weights(model), W0 - 1.0)


def test_an_aborted_push_counts_nothing():
    for settings in (ModelSettings(), _sync(workers=1)):
        model = make_model(settings)
        receiver = receive(model, grad(1.0), worker_id="w", seq=1)
        receiver.abort()
        assert model.step == 0 and model.pending_contributions() == 0 and model.worker_states() == []


# -- sync -------------------------------------------------------------------------------------------


def test_sync_applies_the_weighted_mean_once_the_quorum_is_reached():
    model = make_model(_sync(workers=3, quorum=2))
    assert push(model, grad(1.0), base_step=0, worker_id="a", seq=1, weight=1) == (PushReply(1, applied=False), False)
    assert model.step == 0 and model.pending_contributions() == 1
    assert model.worker_states() == [("a", 1, 0)]  # pending contributions are shown
    assert push(model, grad(5.0), base_step=0, worker_id="b", seq=1, weight=3) == (PushReply(1, applied=True), False)
    assert model.step == 1 and model.pending_contributions() == 0
    np.testing.assert_allclose(weights(model), W0 - 0.5 * (1.0 * 1 + 5.0 * 3) / 4, rtol=1e-6)
    assert model.counters().pushes_applied == 1


def test_sync_retries_pending_or_applied_get_their_original_reply_and_count_once():
    model = make_model(_sync(workers=2))
    pending = push(model, grad(1.0), base_step=0, worker_id="a", seq=1)[0]
    assert push(model, grad(9.0), base_step=0, worker_id="a", seq=1) == (pending, True)  # while pending
    with pytest.raises(FailedPrecondition, match="already contributed seq 1"):
        push(model, grad(9.0), base_step=0, worker_id="a", seq=2)  # a second push to the same round
    push(model, grad(3.0), base_step=0, worker_id="b", seq=1)
    np.testing.assert_allclose(weights(model), W0 - 0.5 * 2.0)  # the mean of a's first push and b's
    # after the round: the original reply (applied: false when it was made), from the worker's records
    assert push(model, grad(9.0), base_step=0, worker_id="a", seq=1) == (pending, True)
    assert model.step == 1 and model.counters().duplicates == 2


def test_sync_refuses_an_older_seq_that_was_never_applied():
    model = make_model(_sync(workers=2))
    push(model, grad(1.0), base_step=0, worker_id="a", seq=5)
    with pytest.raises(FailedPrecondition, match="older than its pending seq 5 and was never applied"):
        push(model, grad(1.0), base_step=0, worker_id="a", seq=4)


def test_sync_stale_pushes_are_refused_before_their_bytes_but_retries_get_through():
    model = make_model(_sync(workers=1))
    push(model, grad(1.0), base_step=0, worker_id="a", seq=1)
    with pytest.raises(FailedPrecondition, match="current step is 1"):
        model.open_push(base_step=0, worker_id="b", seq=1, weight=0)  # refused before any byte
    assert model.counters().stale_rejected == 1
    assert push(model, grad(1.0), base_step=0, worker_id="a", seq=1) == (PushReply(1, applied=True), True)
    with pytest.raises(InvalidArgument, match="weight"):
        model.open_push(base_step=1, worker_id="b", seq=1, weight=-1.0)


def test_sync_a_push_that_may_not_wait_is_refused_unless_it_completes_its_round():
    model = make_model(_sync(workers=2))
    receiver = receive(model, grad(1.0), base_step=0, worker_id="a", seq=1)
    receiver.require_completion("no free waiting slot")
    with pytest.raises(ResourceExhausted, match="no free waiting slot"):
        model.commit_push(receiver, receiver.assembler.finish())
    assert model.pending_contributions() == 0
    push(model, grad(1.0), base_step=0, worker_id="a", seq=1)
    receiver = receive(model, grad(3.0), base_step=0, worker_id="b", seq=1)
    receiver.require_completion("no free waiting slot")
    assert model.commit_push(receiver, receiver.assembler.finish()) == (PushReply(1, applied=True), False)


def test_sync_a_round_refused_as_nonfinite_is_dropped_whole_and_its_waiters_told():
    start = {"w": np.array([3e38, 1.0, -2.0], np.float32)}
    model = make_model(_sync(workers=2, reject_nonfinite_updates=True), {"sgd": {"learning_rate": 1e38}}, start)
    first = receive(model, {"w": -np.ones(3, np.float32)}, base_step=0, worker_id="a", seq=1)
    assert model.commit_push(first, first.assembler.finish()) == (PushReply(1, applied=False), False)
    dropped = first.dropped_check()
    assert dropped is not None and dropped() == ""
    with pytest.raises(NonFiniteUpdate, match="was dropped: push again against step 0"):
        push(model, {"w": -np.ones(3, np.float32)}, base_step=0, worker_id="b", seq=1)
    count, why = model.dropped_rounds()
    assert count == 1 and why == dropped() and "non-finite" in why
    assert model.step == 0 and model.pending_contributions() == 0 and model.worker_states() == []
    # the contributors push again against the same step, with the same seqs (never recorded)
    push(model, {"w": np.zeros(3, np.float32)}, base_step=0, worker_id="a", seq=1)
    push(model, {"w": np.zeros(3, np.float32)}, base_step=0, worker_id="b", seq=1)
    assert model.step == 1


def test_sync_timeout_applies_what_has_arrived_when_the_clock_says_so(manual_clock):
    clock = manual_clock(sync)
    model = make_model(_sync(workers=3, sync_timeout=0.3))
    push(model, grad(2.0), base_step=0, worker_id="a", seq=1)
    clock.advance(0.25)
    assert not model.wait_for_step(1, timeout=0)
    clock.advance(0.1)
    assert model.wait_for_step(1, timeout=60)  # the model's deadline timer applied the round
    np.testing.assert_allclose(weights(model), W0 - 0.5 * 2.0)
    assert model.counters().sync_timeouts == 1 and model.worker_states() == [("a", 1, 0)]
    with pytest.raises(FailedPrecondition, match="current step is 1"):
        model.open_push(base_step=0, worker_id="c", seq=1, weight=0)  # the late worker's push is stale
    model.mark_deleted()


def test_replacing_the_state_drops_the_pending_round():
    model = make_model(_sync(workers=2))
    state, _ = model.capture_state()
    push(model, grad(1.0), base_step=0, worker_id="a", seq=1)
    model.replace_state(state)
    assert model.pending_contributions() == 0 and model.worker_states() == []
    push(model, grad(1.0), base_step=0, worker_id="a", seq=1)  # a new contribution, not a retry
    push(model, grad(3.0), base_step=0, worker_id="b", seq=1)
    np.testing.assert_allclose(weights(model), W0 - 0.5 * 2.0)
