"""core/model.py without a server: updates, pinned snapshots, worker records, state capture and
replacement, waits and counters, through the Model's own API."""

from __future__ import annotations

import dataclasses
import threading

import jax
import numpy as np
import pytest

from optserve.server.core.errors import FailedPrecondition, NonFiniteUpdate
from optserve.server.core.model import ModelState
from optserve.server.core.settings import ModelSettings
from optserve.server.core.step import MAX_STEP
from optserve.server.core.workers import REPLY_WINDOW, PushReply, WorkerRecord
from tests.core_helpers import grad, make_model, params, push, weights


def test_a_push_applies_one_update_counts_it_and_is_remembered_for_its_worker():
    model = make_model()
    version = model.state_version
    reply, duplicate = push(model, grad(1.0), worker_id="w", seq=1)
    assert (reply, duplicate) == (PushReply(1, applied=True), False)
    np.testing.assert_array_equal(weights(model), params()["w"] - 0.5)
    assert model.step == 1 and model.state_version > version
    counters = model.counters()
    assert counters.pushes_applied == 1 and counters.bytes_in == 0  # bytes are the service's to count
    assert model.worker_states() == [("w", 1, 0)]  # no base_step: the step it was applied against
    assert model.wait_for_step(1, timeout=0)


def test_a_snapshot_pins_its_arrays_so_an_update_meanwhile_does_not_overwrite_them():
    model = make_model()
    with model.snapshot() as snap:
        push(model, grad(1.0))
        push(model, grad(1.0))
        assert snap.step == 0
        np.testing.assert_array_equal(np.asarray(snap.arrays["w"]), params()["w"])
    np.testing.assert_array_equal(weights(model), params()["w"] - 1.0)
    assert model.counters().pulls == 2


def test_replies_are_kept_for_the_last_window_of_a_workers_pushes():
    model = make_model()
    n = REPLY_WINDOW + 2
    for seq in range(1, n + 1):
        push(model, grad(0.0), worker_id="w", seq=seq)
    reply, duplicate = push(model, grad(9.0), worker_id="w", seq=n - REPLY_WINDOW + 1)  # oldest kept
    assert duplicate and reply == PushReply(n - REPLY_WINDOW + 1, applied=True)
    assert model.step == n and model.counters().duplicates == 1
    with pytest.raises(FailedPrecondition, match="no reply is kept"):
        push(model, grad(9.0), worker_id="w", seq=n - REPLY_WINDOW)
    np.testing.assert_array_equal(weights(model), params()["w"])  # only zero gradients were applied


def test_captured_state_is_a_copy_and_replacing_the_state_restores_it():
    model = make_model()
    push(model, grad(1.0), worker_id="w", seq=1)
    state, version = model.capture_state()
    assert version == model.state_version and state.step == 1 and set(state.workers) == {"w"}
    push(model, grad(1.0), worker_id="w", seq=2)
    push(model, grad(1.0), worker_id="v", seq=1)
    np.testing.assert_array_equal(np.asarray(state.params["w"]), params()["w"] - 0.5)  # not the live buffers
    assert state.workers["w"].last_seq == 1  # the records were copied too

    installed = model.replace_state(state)
    assert installed == model.state_version > version
    assert model.step == 1 and model.worker_states() == [("w", 1, 0)]
    np.testing.assert_array_equal(weights(model), params()["w"] - 0.5)
    assert model.counters().pushes_applied == 0  # counters count since the restore
    reply, duplicate = push(model, grad(5.0), worker_id="w", seq=1)  # its reply came with the state
    assert duplicate and reply == PushReply(1, applied=True)
    push(model, grad(1.0), worker_id="w", seq=2)  # the restored state updates like any other
    np.testing.assert_array_equal(weights(model), params()["w"] - 1.0)


def test_the_last_step_a_model_can_reach_refuses_further_updates():
    model = make_model()
    state, _ = model.capture_state()
    model.replace_state(dataclasses.replace(state, step=MAX_STEP))
    with pytest.raises(FailedPrecondition, match="last step a model can reach"):
        push(model, grad(1.0))
    assert model.step == MAX_STEP


def test_a_refused_nonfinite_update_leaves_the_state_bitwise_unchanged():
    start = {"w": np.array([3e38, 1.0, -2.0], np.float32)}
    model = make_model(ModelSettings(reject_nonfinite_updates=True), {"sgd": {"learning_rate": 1e38}}, start)
    version = model.state_version
    with pytest.raises(NonFiniteUpdate, match=r"parameter 'w'"):
        push(model, {"w": -np.ones(3, np.float32)})
    assert model.step == 0 and model.state_version == version
    assert weights(model).tobytes() == start["w"].tobytes()
    assert model.counters().nonfinite_rejected == 1 and model.counters().pushes_applied == 0


def test_waits_end_when_the_step_comes_when_given_up_and_when_the_model_is_deleted():
    model = make_model()
    results: list[bool] = []
    give_up = threading.Event()
    waiters = [
        threading.Thread(target=lambda: results.append(model.wait_for_step(1, timeout=60))),
        threading.Thread(target=lambda: results.append(model.wait_for_step(5, timeout=60, give_up=give_up.is_set))),
        threading.Thread(target=lambda: results.append(model.wait_for_step(9, timeout=60))),
    ]
    for t in waiters:
        t.start()
    push(model, grad(1.0))
    waiters[0].join(timeout=60)
    give_up.set()
    model.notify_waiters()
    waiters[1].join(timeout=60)
    model.mark_deleted()
    waiters[2].join(timeout=60)
    assert results == [True, False, False] and model.deleted


def test_counters_are_copies_and_bytes_are_counted_by_the_model():
    model = make_model()
    model.count_received(100)
    model.count_sent(7)
    counters = model.counters()
    counters.bytes_in = 0
    assert model.counters().bytes_in == 100 and model.counters().bytes_out == 7


def test_hyperparameter_changes_are_state_changes():
    model = make_model(spec={"sgd": {"learning_rate": 0.5, "tunable": ["learning_rate"]}})
    version = model.state_version
    assert model.set_hyperparams({"learning_rate": 0.25}) == {"learning_rate": 0.25}
    assert model.state_version == version + 1 and model.hyperparams() == {"learning_rate": 0.25}
    push(model, grad(1.0))
    np.testing.assert_array_equal(weights(model), params()["w"] - 0.25)


def test_the_packing_describes_the_ema_state_without_its_values():
    assert make_model().packing.ema_map is None
    model = make_model(ModelSettings(ema_decay=0.5))
    state, _ = model.capture_state()
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state.ema_state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), model.packing.ema_shapes) == shapes


def test_replace_state_takes_worker_records_as_given_and_keeps_no_reference_to_them():
    model = make_model()
    state, _ = model.capture_state()
    record = WorkerRecord(3, 0, {3: PushReply(0, applied=False)})
    model.replace_state(ModelState(state.step, state.params, state.opt_state, None, {"w": record}))
    record.replies.clear()
    reply, duplicate = push(model, grad(1.0), worker_id="w", seq=3)
    assert duplicate and reply == PushReply(0, applied=False)
