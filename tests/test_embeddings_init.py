"""Server-side initialization (`Init`, proto LeafInit): deterministic, validated, and an ordinary
leaf afterwards (download and upload restore it bitwise)."""

from __future__ import annotations

import numpy as np
import pytest

from optserve.client import Init, InvalidArgumentError, optim


def test_same_seed_same_table_other_seed_other_table(client, model_name):
    params = {
        "a": Init((300, 8), "float32", "normal", stddev=0.01, seed=7),
        "b": Init((300, 8), "float32", "normal", stddev=0.01, seed=7),
        "c": Init((300, 8), "float32", "normal", stddev=0.01, seed=8),
        "bias": np.ones(3, np.float32),
    }
    model = client.create_model(model_name, params, optim.sgd(0.1))
    got = model.pull()
    assert got["a"].dtype == np.float32 and got["a"].shape == (300, 8)
    np.testing.assert_array_equal(got["a"], got["b"])
    assert not np.array_equal(got["a"], got["c"])
    assert abs(float(got["a"].std()) - 0.01) < 0.002
    np.testing.assert_array_equal(got["bias"], np.ones(3, np.float32))


def test_each_initializer(client, model_name):
    params = {
        "zeros": Init((4, 3), "float32"),
        "const": Init((5,), "bfloat16", "constant", value=0.5),
        "ints": Init((2, 2), "int32", "constant", value=-3),
        "trunc": Init((2000,), "float32", "truncated_normal", mean=1.0, stddev=0.5, seed=1),
        "unif": Init((2000,), "float16", "uniform", minval=-2.0, maxval=-1.0, seed=2),
        "scalar": Init((), "float32", "normal", seed=3),
    }
    got = client.create_model(model_name, params, optim.sgd(0.1)).pull()
    np.testing.assert_array_equal(got["zeros"], np.zeros((4, 3), np.float32))
    assert got["const"].dtype.name == "bfloat16" and np.all(got["const"].astype(np.float32) == 0.5)
    np.testing.assert_array_equal(got["ints"], np.full((2, 2), -3, np.int32))
    assert got["trunc"].min() >= 0.0 and got["trunc"].max() <= 2.0
    assert got["unif"].dtype == np.float16 and got["unif"].min() >= -2.0 and got["unif"].max() <= -1.0
    assert got["scalar"].shape == ()


@pytest.mark.parametrize(
    "leaf, fault",
    [
        (Init((3,), "int32", "normal"), "needs a floating-point leaf"),
        (Init((3,), "float32", "normal", stddev=-1.0), "stddev must be >= 0"),
        (Init((3,), "float32", "uniform", minval=2.0, maxval=1.0), "above maxval"),
        (Init((3,), "float32", "constant", value=float("inf")), "must be finite"),
        (Init((3,), "int8", "constant", value=300.0), "is not a int8"),
    ],
)
def test_bad_declarations_are_refused_naming_the_leaf(client, model_name, leaf, fault):
    with pytest.raises(InvalidArgumentError) as err:
        client.create_model(model_name, {"table": leaf}, optim.sgd(0.1))
    assert model_name in str(err.value) and "'table'" in str(err.value) and fault in str(err.value)
    assert model_name not in [m["name"] for m in client.list_models()]


def test_download_upload_restore_an_initialized_table_bitwise(client, model_name, tmp_path):
    params = {"table": Init((64, 4), "float32", "uniform", minval=-0.1, maxval=0.1, seed=11)}
    model = client.create_model(model_name, params, optim.adam(0.01))
    model.push({"table": np.ones((64, 4), np.float32)})
    before = model.pull()
    path = tmp_path / "m.safetensors"
    model.download(str(path))
    again = client.upload(str(path), name=model_name + "-up")
    np.testing.assert_array_equal(again.pull()["table"], before["table"])
    assert again.info()["step"] == 1
