"""A sync round's sum (core/round_sums.py): lazy leaves sent as rows are summed at the union of their
ids, never as a dense table, and give the mean the dense sum of the densified contributions gives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optserve.server.core.placement import ModelPlacement, Placement
from optserve.server.core.round_sums import RoundSum
from optserve.wire.dtypes import LeafSpec

ROWS, WIDTH = 40, 3
SCHEMA = {"table": LeafSpec("table", "float32", (ROWS, WIDTH)), "w": LeafSpec("w", "float32", (5,))}


def _placement() -> ModelPlacement:
    return ModelPlacement(Placement(jax.devices()[:1]), {})  # one device: put needs no buffers


def _sum() -> RoundSum:
    return RoundSum(SCHEMA, _placement())


def _contribution(seed: int, ids: list[int] | None):
    """(device grads, rows) of one push: the table as rows of `ids`, or dense (None)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(5).astype(np.float32)
    if ids is None:
        table = rng.standard_normal((ROWS, WIDTH)).astype(np.float32)
        return {"table": jnp.asarray(table), "w": jnp.asarray(w)}, {}, table
    distinct = np.array(sorted(set(ids)), np.int64)
    values = rng.standard_normal((len(distinct), WIDTH)).astype(np.float32)
    dense = np.zeros((ROWS, WIDTH), np.float32)
    dense[distinct] = values
    padded = np.zeros((8, WIDTH), np.float32)  # what the device holds of it: ignored by the sum
    return {"table": jnp.asarray(padded), "w": jnp.asarray(w)}, {"table": (distinct, values)}, dense


def _dense_mean(contributions, weights) -> dict[str, np.ndarray]:
    """The mean as the dense fold computes it: `sum + weight * grad` in float32, then / total."""
    sums = None
    for (grads, _, table), weight in zip(contributions, weights, strict=True):
        g = {"table": table, "w": np.asarray(grads["w"])}
        wt = np.float32(weight)
        sums = {k: wt * v for k, v in g.items()} if sums is None else {k: sums[k] + wt * g[k] for k in g}
    return {k: v / np.float32(sum(weights)) for k, v in sums.items()}


@pytest.mark.parametrize(
    "pushes",
    [
        [[0, 1, 2], [2, 3, 39], [7]],  # rows only: the union is 0, 1, 2, 3, 7, 39
        [[0, 1], None, [5, 6]],  # a dense contribution in the middle: dense from then on
        [None, [3, 4]],  # dense first
        [[], [9, 9, 1]],  # an empty push, then repeats (distinct by then)
    ],
)
def test_the_mean_equals_the_dense_fold_of_the_densified_contributions(pushes):
    weights = [1.0, 2.5, 0.5][: len(pushes)]
    contributions = [_contribution(i, ids) for i, ids in enumerate(pushes)]
    sums = _sum()
    for (grads, rows, _), weight in zip(contributions, weights, strict=True):
        sums.add(grads, rows, weight)
    mean = sums.mean()
    want = _dense_mean(contributions, weights)
    np.testing.assert_allclose(np.asarray(mean.dense["w"]), want["w"], rtol=1e-6)
    if any(ids is None for ids in pushes):
        assert "table" not in mean.rows
        np.testing.assert_allclose(np.asarray(mean.dense["table"]), want["table"], rtol=1e-6, atol=1e-7)
        return
    assert "table" not in mean.dense  # never a dense buffer of the table's size
    ids, values = mean.rows["table"]
    union = sorted({i for p in pushes for i in p})
    assert ids.tolist() == union
    np.testing.assert_allclose(values, want["table"][union], rtol=1e-6, atol=1e-7)
    untouched = np.setdiff1d(np.arange(ROWS), union)
    assert not want["table"][untouched].any()
    grads, row_ids = mean.update_inputs(SCHEMA, _placement())
    assert row_ids["table"].tolist() == union + [ROWS] * (8 - len(union))  # padded past the table's end
    assert np.asarray(grads["table"]).shape == (8, WIDTH)
    np.testing.assert_array_equal(np.asarray(grads["table"])[: len(union)], values)
    assert not np.asarray(grads["table"])[len(union) :].any()


def test_scaling_and_the_squared_norm_count_the_rows():
    sums = _sum()
    grads, rows, dense = _contribution(3, [1, 4])
    sums.add(grads, rows, 2.0)
    mean = sums.mean()
    want = np.sum(np.square(dense), dtype=np.float64) + np.sum(np.square(np.asarray(grads["w"])), dtype=np.float64)
    assert mean.squared_norm() == pytest.approx(want, rel=1e-6)
    half = mean.scaled(0.5)
    np.testing.assert_array_equal(half.rows["table"][1], mean.rows["table"][1] * np.float32(0.5))
    np.testing.assert_array_equal(np.asarray(half.dense["w"]), np.asarray(mean.dense["w"]) * np.float32(0.5))


def test_the_mean_of_numpy_gradients_is_committed_to_the_device():
    """Small gradients reach the sum as numpy arrays (core/receiving.py); the mean the step takes
    must still be committed to the model's device, as the step's warm-up compiled it
    (core/compilation.py, step_grad_avals): an uncommitted mean compiled the step a second time."""
    sums = _sum()
    rng = np.random.default_rng(0)
    for weight in (1.0, 2.0):
        sums.add({"w": rng.standard_normal(5).astype(np.float32)}, {}, weight)
    mean = sums.mean()
    assert mean.dense["w"].committed and mean.dense["w"].devices() == {jax.devices()[0]}
    assert mean.scaled(0.5).dense["w"].committed
