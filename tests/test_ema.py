"""Parameter EMA through a live server equals objax's ExponentialMovingAverage (debias on and off),
computed independently in float64 (tests/reference/objax.py)."""

from __future__ import annotations

import numpy as np
import pytest

from optserve.client import FailedPreconditionError, optim
from tests.reference.objax import ParamsEMA


@pytest.mark.parametrize("debias", [False, True])
def test_ema_matches_objax(client, model_name, debias):
    rng = np.random.default_rng(3)
    p0 = {
        "w": rng.standard_normal((3, 2)).astype(np.float32),
        "b": rng.standard_normal(2).astype(np.float32),
        "count": np.array(4, np.int32),
    }
    model = client.create_model(model_name, p0, optim.adam(0.05), ema=0.9, ema_debias=debias)
    ref = ParamsEMA(decay=0.9, debias=debias)
    state = ref.init({k: p0[k] for k in ("w", "b")})
    for _ in range(30):
        model.push(
            {
                "w": rng.standard_normal((3, 2)).astype(np.float32),
                "b": rng.standard_normal(2).astype(np.float32),
                "count": np.array(0, np.int32),
            }
        )
        params = model.pull()
        state = ref.update({k: params[k] for k in ("w", "b")}, state)
        got, want = model.pull(ema=True), ref.read(state)
        for k in ("w", "b"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        assert got["count"] == 4  # non-float leaves are not averaged
    assert model.info()["settings"]["ema"] == pytest.approx(0.9)


def test_pull_ema_without_ema_is_refused(client, model_name):
    model = client.create_model(model_name, {"w": np.zeros(2, np.float32)}, optim.sgd(0.1))
    with pytest.raises(FailedPreconditionError, match="keeps no parameter EMA"):
        model.pull(ema=True)
