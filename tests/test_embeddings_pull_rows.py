"""Pulls of rows (`model.pull_rows`, PullRequest.rows) and a push with the next batch's rows in the
same round trip (`push_pull(grads, rows=...)`)."""

from __future__ import annotations

import numpy as np
import pytest

from optserve.client import Init, InvalidArgumentError, Rows


def test_pull_rows_of_a_loose_and_a_packed_leaf(client, model_name):
    params = {
        "table": Init((100, 3), "float32", "normal", seed=4),
        # four alike small leaves: packed into one buffer (core/layout.py, MIN_PACK_LEAVES)
        "small": {"a": np.arange(8, dtype=np.float32).reshape(4, 2), **{k: np.ones(4, np.float32) for k in "bcd"}},
    }
    spec = {
        "partition": [
            {"params": ["table"], "optimizer": {"sparse_sgd": {"learning_rate": 0.1}}},
            {"params": "**", "optimizer": {"sgd": {"learning_rate": 0.1}}},
        ]
    }
    model = client.create_model(model_name, params, spec)
    packed = {leaf for pack in model.info()["packing"] for leaf in pack["leaves"]}
    assert "table" not in packed and "small/a" in packed
    whole = model.pull()
    ids = np.array([99, 0, 5, 5, 42])
    got = model.pull_rows({"table": ids, "small/a": [3, 1]})
    np.testing.assert_array_equal(got["table"], whole["table"][ids])
    np.testing.assert_array_equal(got["small/a"], whole["small"]["a"][[3, 1]])
    assert model.pull_rows({"table": np.array([], np.int64)})["table"].shape == (0, 3)
    narrow = model.pull_rows({"table": [1, 2]}, wire_dtype="bfloat16")["table"]
    assert narrow.dtype.name == "bfloat16"


def test_push_pull_returns_the_next_batchs_rows_after_the_update(client, model_name):
    model = client.create_model(
        model_name, {"table": np.zeros((20, 2), np.float32)}, {"sparse_sgd": {"learning_rate": 1.0}}
    )
    got = model.push_pull({"table": Rows([1, 2], np.ones((2, 2), np.float32))}, rows={"table": [2, 3]})
    np.testing.assert_array_equal(got["table"], [[-1.0, -1.0], [0.0, 0.0]])
    assert model.info()["step"] == 1


@pytest.mark.parametrize("ids, fault", [([20], "id 20 is outside"), ([-3], "id -3 is outside")])
def test_bad_row_pulls_are_refused_and_a_push_pull_applies_nothing(client, model_name, ids, fault):
    model = client.create_model(
        model_name, {"table": np.zeros((20, 2), np.float32)}, {"sparse_sgd": {"learning_rate": 1.0}}
    )
    with pytest.raises(InvalidArgumentError, match=fault) as err:
        model.pull_rows({"table": ids})
    assert model_name in str(err.value) and "'table'" in str(err.value)
    with pytest.raises(InvalidArgumentError, match=fault):
        model.push_pull({"table": Rows([1], np.ones((1, 2), np.float32))}, rows={"table": ids})
    assert model.info()["step"] == 0
    np.testing.assert_array_equal(model.pull()["table"], np.zeros((20, 2), np.float32))


def test_worker_push_pull_returns_rows_and_tracks_its_step(client, model_name):
    model = client.create_model(
        model_name, {"table": np.zeros((20, 2), np.float32)}, {"sparse_sgd": {"learning_rate": 1.0}}
    )
    worker = model.worker("w0")
    worker.pull()
    got = worker.push_pull({"table": Rows([4], np.ones((1, 2), np.float32))}, rows={"table": [4, 5]})
    np.testing.assert_array_equal(got["table"], [[-1.0, -1.0], [0.0, 0.0]])
    assert worker.base_step == 1 and worker.seq == 1
