"""Lazy rules in sync mode (core/sync.py, "Lazy rules"): a round applies its weighted-mean rows at the
union of the ids its contributions touched, so rows nobody touched keep parameters and optimizer
state bitwise; a dense contribution to the table makes the round dense."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from optserve.client import Init, Rows
from optserve.server.core import compilation
from tests.reference.lazy import LazyAdam, SparseSgd, segment_sum

ROWS, WIDTH = 20, 3
WEIGHTS = [1.0, 2.0, 0.5]
# per round, each worker's ids: overlapping (1, 5), disjoint (7, 12, 19), repeated (1, 3), empty
ROUNDS = [
    [[0, 1, 1, 5], [1, 7], [12]],
    [[5, 19], [5], []],
    [[3], [3, 3, 8], [0]],
]
CASES = [
    ({"lazy_adam": {"learning_rate": 0.05}}, lambda t: LazyAdam(t, 0.05)),
    ({"sparse_sgd": {"learning_rate": 0.1, "momentum": 0.9}}, lambda t: SparseSgd(t, 0.1, 0.9)),
]


def _round_mean(pushes: list[tuple[list[int], np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """float64: the union of the ids touched, and the weighted mean of the summed rows there."""
    union = np.unique(np.concatenate([np.array(ids, np.int64) for ids, _ in pushes]))
    mean = np.zeros((len(union), WIDTH))
    for (ids, values), w in zip(pushes, WEIGHTS, strict=True):
        r, g = segment_sum(np.array(ids, np.int64), values.astype(np.float64))
        mean[np.searchsorted(union, r)] += w * g
    return union, mean / sum(WEIGHTS)


def _state(model, path) -> dict[str, np.ndarray]:
    """Every tensor of the model's download (parameters and optimizer state) with the table's rows."""
    model.download(str(path))
    return {k: v for k, v in load_file(str(path)).items() if v.ndim and v.shape[0] == ROWS}


@pytest.mark.parametrize("spec, reference", CASES, ids=["lazy_adam", "sparse_sgd_momentum"])
def test_sync_round_applies_the_lazy_rule_at_the_union_of_touched_rows(client, model_name, tmp_path, spec, reference):
    rng = np.random.default_rng(7)
    params = {"table": Init((ROWS, WIDTH), "float32", "normal", seed=4), "w": np.ones(2, np.float32)}
    model = client.create_model(model_name, params, spec, mode="sync", workers=3)
    ref = reference(model.pull()["table"])
    for step, ids_of in enumerate(ROUNDS):
        before = _state(model, tmp_path / f"{step}.safetensors")
        assert any(k != "table" for k in before)  # the optimizer state's per-row tensors are compared too
        pushes = [(ids, rng.standard_normal((len(ids), WIDTH)).astype(np.float32)) for ids in ids_of]
        for (ids, values), w in zip(pushes, WEIGHTS, strict=True):
            model.push(
                {"table": Rows(np.array(ids, np.int64), values), "w": np.zeros(2, np.float32)},
                base_step=step,
                weight=w,
            )
        union, mean = _round_mean(pushes)
        ref.push(union, mean)
        got = model.pull(min_step=step + 1, timeout=30)["table"]
        after = _state(model, tmp_path / f"{step}-after.safetensors")
        untouched = np.setdiff1d(np.arange(ROWS), union)
        for k, tensor in before.items():
            np.testing.assert_array_equal(after[k][untouched], tensor[untouched], err_msg=k)
            assert not np.array_equal(after[k][union], tensor[union]), k  # the touched rows did change
        np.testing.assert_allclose(got, ref.p, rtol=2e-5, atol=2e-6)
    assert model.info()["step"] == len(ROUNDS)


def test_sync_round_with_one_worker_equals_the_async_push_bitwise(client, model_name):
    params = {"table": Init((ROWS, WIDTH), "float32", "uniform", minval=-1.0, maxval=1.0, seed=2)}
    spec = {"lazy_adam": {"learning_rate": 0.05}}
    sync = client.create_model(model_name + "-s", params, spec, mode="sync", workers=1)
    lazy = client.create_model(model_name + "-a", params, spec)
    # the second round leaves rows 2 and 17 alone: their moments must not decay (a dense round would move them)
    for step, rows in enumerate(
        [
            Rows([2, 2, 5, 17], np.arange(12, dtype=np.float32).reshape(4, 3) - 5),
            Rows([5, 9], np.ones((2, 3), np.float32)),
        ]
    ):
        sync.push({"table": rows}, base_step=step)
        lazy.push({"table": rows})
        np.testing.assert_array_equal(sync.pull(min_step=step + 1, timeout=30)["table"], lazy.pull()["table"])


def test_a_dense_contribution_makes_the_round_dense(client, model_name):
    """One worker pushes the table dense, another Rows: every row is touched, as a dense push under a
    lazy rule touches every row; the round equals the same round with both pushed dense."""
    params = {"table": np.ones((ROWS, WIDTH), np.float32)}
    spec = {"lazy_adam": {"learning_rate": 0.1}}
    mixed = client.create_model(model_name + "-m", params, spec, mode="sync", workers=2)
    dense = client.create_model(model_name + "-d", params, spec, mode="sync", workers=2)
    g = np.full((ROWS, WIDTH), 0.25, np.float32)
    rows = Rows([4, 4, 9], np.arange(9, dtype=np.float32).reshape(3, 3))
    mixed.push({"table": g})
    mixed.push({"table": rows})
    dense.push({"table": g})
    dense.push({"table": rows.densify((ROWS, WIDTH), np.float32)})
    got = mixed.pull(min_step=1, timeout=30)["table"]
    np.testing.assert_array_equal(got, dense.pull(min_step=1, timeout=30)["table"])
    assert (got != 1.0).all()  # every row moved


def test_sync_rounds_of_random_row_counts_compile_a_bounded_number_of_times(client, model_name):
    rng = np.random.default_rng(3)
    compilation.install_listeners()
    model = client.create_model(
        model_name,
        {"table": np.zeros((300, 2), np.float32)},
        {"sparse_sgd": {"learning_rate": 0.1, "momentum": 0.5}},
        mode="sync",
        workers=2,
    )
    model.push({"table": Rows([0], np.ones((1, 2), np.float32))}, base_step=0)
    model.push({"table": Rows([1], np.ones((1, 2), np.float32))}, base_step=0)  # step 1: bucket 8 compiled
    model.pull(min_step=1, timeout=30)
    # background warm-ups (this model's and earlier ones') would count inside the window: ended first
    compilation.finish_warm_ups()
    before = compilation.stats().compilations["update_step"]
    rounds = 60
    for step in range(1, rounds + 1):
        for _ in range(2):
            k = int(rng.integers(0, 120))
            ids = rng.integers(0, 300, k)
            model.push({"table": Rows(ids, rng.standard_normal((k, 2)).astype(np.float32))}, base_step=step)
        model.pull(min_step=step + 1, timeout=30)
    compiled = compilation.stats().compilations["update_step"] - before
    assert compiled <= 5, compiled  # buckets 16, ..., 256 (8 compiled already)
    assert model.info()["step"] == rounds + 1
