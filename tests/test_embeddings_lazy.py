"""lazy_adam, rowwise_adagrad and sparse_sgd through a live server against float64 NumPy references
(tests/reference/lazy.py): duplicate ids, empty pushes, rows touched once and many times, untouched
rows bitwise unchanged, and a lazy table beside a dense leaf in one partition."""

from __future__ import annotations

import numpy as np
import pytest

from optserve.client import Init, Rows
from tests.reference.lazy import LazyAdam, RowwiseAdagrad, SparseSgd

ROWS, WIDTH = 50, 4
# rows 0-2 every push (with duplicates), 10 and 11 once, an empty push, 49 (the last row) twice
PUSHES = [[0, 1, 2, 0, 0], [0, 1, 2, 10], [], [2, 1, 0, 49, 49], [0, 1, 2, 11], [1, 1, 1, 1]]
CASES = [
    ({"lazy_adam": {"learning_rate": 0.01}}, lambda t: LazyAdam(t, 0.01)),
    (
        {"lazy_adam": {"learning_rate": 0.02, "b1": 0.5, "b2": 0.9, "eps": 1e-3}},
        lambda t: LazyAdam(t, 0.02, 0.5, 0.9, 1e-3),
    ),
    ({"rowwise_adagrad": {"learning_rate": 0.1}}, lambda t: RowwiseAdagrad(t, 0.1)),
    (
        {"rowwise_adagrad": {"learning_rate": 0.1, "eps": 0.01, "initial_accumulator_value": 0.5}},
        lambda t: RowwiseAdagrad(t, 0.1, 0.01, 0.5),
    ),
    ({"sparse_sgd": {"learning_rate": 0.1}}, lambda t: SparseSgd(t, 0.1)),
    ({"sparse_sgd": {"learning_rate": 0.1, "momentum": 0.9}}, lambda t: SparseSgd(t, 0.1, 0.9)),
]


@pytest.mark.parametrize("spec, reference", CASES, ids=lambda c: str(c)[:60] if isinstance(c, dict) else "")
def test_lazy_rule_matches_its_float64_reference(client, model_name, spec, reference):
    rng = np.random.default_rng(5)
    model = client.create_model(model_name, {"table": Init((ROWS, WIDTH), "float32", "normal", seed=3)}, spec)
    table = model.pull()["table"]
    ref = reference(table)
    for ids in PUSHES:
        values = rng.standard_normal((len(ids), WIDTH)).astype(np.float32)
        before = model.pull()["table"]
        model.push({"table": Rows(np.array(ids, np.int64), values)})
        ref.push(np.array(ids, np.int64), values.astype(np.float64))
        after = model.pull()["table"]
        untouched = np.setdiff1d(np.arange(ROWS), ids)
        np.testing.assert_array_equal(after[untouched], before[untouched])
        np.testing.assert_allclose(after, ref.p, rtol=2e-5, atol=2e-6)
    assert model.info()["step"] == len(PUSHES)


def test_lazy_table_beside_a_dense_leaf_in_a_partition(client, model_name):
    spec = {
        "partition": [
            {"params": ["table"], "optimizer": {"lazy_adam": {"learning_rate": 0.01}}},
            {"params": "**", "optimizer": {"sgd": {"learning_rate": 0.5}}},
        ]
    }
    params = {
        "table": Init((ROWS, WIDTH), "float32", "uniform", minval=-1.0, maxval=1.0, seed=1),
        "w": np.ones(3, np.float32),
    }
    model = client.create_model(model_name, params, spec)
    ref = LazyAdam(model.pull()["table"], 0.01)
    w = np.ones(3)
    rng = np.random.default_rng(6)
    for ids in PUSHES:
        values = rng.standard_normal((len(ids), WIDTH)).astype(np.float32)
        gw = rng.standard_normal(3).astype(np.float32)
        model.push({"table": Rows(np.array(ids, np.int64), values), "w": gw})
        ref.push(np.array(ids, np.int64), values.astype(np.float64))
        w -= 0.5 * gw
    got = model.pull()
    np.testing.assert_allclose(got["table"], ref.p, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got["w"], w, rtol=1e-6)


def test_dense_gradient_under_a_lazy_rule_touches_every_row(client, model_name):
    model = client.create_model(
        model_name, {"table": np.zeros((6, 2), np.float32)}, {"lazy_adam": {"learning_rate": 0.1}}
    )
    g = np.arange(12, dtype=np.float32).reshape(6, 2) - 5.5
    model.push({"table": g})
    ref = LazyAdam(np.zeros((6, 2)), 0.1)
    ref.push(np.arange(6), g.astype(np.float64))
    np.testing.assert_allclose(model.pull()["table"], ref.p, rtol=1e-5, atol=1e-7)
