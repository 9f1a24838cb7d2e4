"""Row-sparse gradients (`Rows`, proto RowSparseGradient): under a non-lazy rule exactly the dense
gradient, bad rows refused naming the model and the leaf with nothing changed, and the padded
update compiled a bounded number of times."""

from __future__ import annotations

import numpy as np
import pytest

from optserve.client import Init, InvalidArgumentError, Rows, optim
from optserve.server.core import compilation
from optserve.v1 import optserve_pb2 as pb

LAZY = {"lazy_adam": {"learning_rate": 0.05}}


def _table_params(rng):
    return {
        "table": rng.standard_normal((40, 3)).astype(np.float32),
        "dense": rng.standard_normal((5,)).astype(np.float32),
        "scalar": np.float32(0.5),
        "count": np.zeros(2, np.int32),
    }


def _grads(rng, ids):
    return {
        "table": Rows(ids, rng.standard_normal((len(ids), 3)).astype(np.float32)),
        "dense": rng.standard_normal((5,)).astype(np.float32),
        "scalar": np.float32(0.1),
        "count": np.zeros(2, np.int32),
    }


@pytest.mark.parametrize(
    "spec",
    [
        optim.adam(0.05),
        {"chain": [{"clip_by_global_norm": {"max_norm": 1.0}}, {"sgd": {"learning_rate": 0.1, "momentum": 0.9}}]},
    ],
)
def test_non_lazy_rule_applies_rows_as_the_dense_gradient_bit_for_bit(client, model_name, spec):
    rng = np.random.default_rng(0)
    p0 = _table_params(rng)
    sparse = client.create_model(model_name + "-s", p0, spec)
    dense = client.create_model(model_name + "-d", p0, spec)
    assert "table" not in {leaf for pack in sparse.info()["packing"] for leaf in pack["leaves"]}
    for ids in ([3, 7, 3, 3, 39], [], [0], [5, 5]):
        g = _grads(rng, np.array(ids, np.int64))
        sparse.push(g)
        dense.push({**g, "table": g["table"].densify((40, 3), np.float32)})
        a, b = sparse.pull(), dense.pull()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _raw_push(model, rows, table_rows):
    """A push whose table leaf is sent with these rows (no client-side checks)."""
    header = pb.PushHeader(model=model.name, rows=rows)
    leaves = [("table", table_rows), ("dense", np.zeros(5, np.float32)), ("scalar", np.float32(0))]
    leaves.append(("count", np.zeros(2, np.int32)))
    return model.push_raw(header, [(p, np.asarray(a)) for p, a in leaves])


@pytest.mark.parametrize(
    "rows, values, fault",
    [
        ([pb.RowSparseGradient(path="table", ids=[1, 40])], np.zeros((2, 3), np.float32), "id 40 is outside"),
        ([pb.RowSparseGradient(path="table", ids=[-1])], np.zeros((1, 3), np.float32), "id -1 is outside"),
        ([pb.RowSparseGradient(path="table", ids=[1])], np.zeros((1, 4), np.float32), "does not match"),
        ([pb.RowSparseGradient(path="table", ids=[1, 2])], np.zeros((1, 3), np.float32), "does not match"),
        ([pb.RowSparseGradient(path="scalar", ids=[0])], None, "rank 0"),
        ([pb.RowSparseGradient(path="count", ids=[0])], None, "not floating-point"),
        ([pb.RowSparseGradient(path="nope", ids=[0])], None, "no such leaf"),
        ([pb.RowSparseGradient(path="table", ids=[1])] * 2, np.zeros((1, 3), np.float32), "named twice"),
        ([pb.RowSparseGradient(path="table", ids=[1])], np.full((1, 3), np.nan, np.float32), "NaN or Inf"),
    ],
)
@pytest.mark.parametrize("spec", [optim.adam(0.05), LAZY])
def test_bad_rows_are_refused_naming_model_and_leaf_and_change_nothing(client, model_name, rows, values, fault, spec):
    rng = np.random.default_rng(1)
    model = client.create_model(model_name, _table_params(rng), spec)
    model.push(_grads(rng, np.array([1, 2])))
    before, step = model.pull(), model.info()["step"]
    with pytest.raises(InvalidArgumentError) as err:
        _raw_push(model, rows, np.zeros((40, 3), np.float32) if values is None else values)
    message = str(err.value)
    assert model_name in message and fault in message, message
    assert f"'{rows[0].path}'" in message or "'table'" in message, message
    after = model.pull()
    assert model.info()["step"] == step
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_client_refuses_rows_as_parameters_and_init_as_gradient(client, model_name):
    with pytest.raises(TypeError, match="Rows is a gradient"):
        client.create_model(model_name, {"t": Rows([0], np.zeros((1, 2), np.float32))}, optim.sgd(0.1))
    model = client.create_model(model_name, {"t": np.zeros((3, 2), np.float32)}, optim.sgd(0.1))
    with pytest.raises(TypeError, match="Init declares a parameter"):
        model.push({"t": Init((3, 2))})


def test_client_refuses_ids_that_are_not_integers():
    with pytest.raises(TypeError):
        Rows(np.array([1.0]), np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="values must have shape"):
        Rows(np.array([1, 2]), np.zeros((3, 3), np.float32))


def test_padded_row_counts_compile_a_bounded_number_of_times(client, model_name):
    rng = np.random.default_rng(2)
    compilation.install_listeners()
    model = client.create_model(
        model_name, {"table": np.zeros((600, 2), np.float32)}, {"rowwise_adagrad": {"learning_rate": 0.1}}
    )
    model.push({"table": Rows([0], np.ones((1, 2), np.float32))})  # the dense step's warm-up is over
    # background warm-ups (this model's and earlier ones') would count inside the window: ended first
    compilation.finish_warm_ups()
    before = compilation.stats().compilations["update_step"]
    sizes = rng.integers(0, 500, 200)
    for k in sizes:
        ids = rng.integers(0, 600, k)
        model.push({"table": Rows(ids, rng.standard_normal((k, 2)).astype(np.float32))})
    compiled = compilation.stats().compilations["update_step"] - before
    assert len(set(sizes.tolist())) > 100
    assert 2 <= compiled <= 7, compiled  # buckets 8, 16, ..., 512 (the first one compiled already)
    assert model.info()["step"] == 201


def test_rows_on_a_packed_leaf_are_sent_dense_by_the_client(client, model_name):
    params = {k: np.ones((6, 2), np.float32) for k in "abcd"}  # alike small leaves: one pack
    sparse = client.create_model(model_name + "-s", params, optim.adam(0.1))
    dense = client.create_model(model_name + "-d", params, optim.adam(0.1))
    assert "a" in {leaf for pack in sparse.info()["packing"] for leaf in pack["leaves"]}
    rows = Rows([4, 1, 4], np.arange(6, dtype=np.float32).reshape(3, 2))
    zeros = {k: np.zeros((6, 2), np.float32) for k in "bcd"}
    sparse.push({"a": rows, **zeros})
    dense.push({"a": rows.densify((6, 2), np.float32), **zeros})
    np.testing.assert_array_equal(sparse.pull()["a"], dense.pull()["a"])
