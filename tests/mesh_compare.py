"""Run as a script with several fake CPU devices (tests/test_devices.py starts it with
XLA_FLAGS=--xla_force_host_platform_device_count=4): for each conformance case named on the
command line (all when none), a model over every device and a model on the first device alone are
created in this process and fed the same pushes; prints one JSON line per case: its id and what
differs ("" when nothing: bit for bit, or to float32 rounding where the case reduces over leaves).

A script, not a test module: the device count must be set before jax is imported, and setting it
for the test session would change every other test's devices."""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from optserve.server.core import admission
from optserve.server.core import model as model_module
from optserve.server.core.placement import Placement
from optserve.server.core.settings import ModelSettings
from optserve.server.core.store import ModelStore
from optserve.server.state.model_state import capture, prepare
from optserve.wire.dtypes import LeafSpec, dtype_name
from tests.core_helpers import donating_step_only, push
from tests.reference.cases import CASES, EMA_CASES
from tests.reference.data import SHAPES, make_grads, make_params

# the conformance leaves twice (packs of 42 elements: padded on 4 devices), a leaf split along its
# second axis, and prime sizes (replicated when loose, padding when packed)
MESH_SHAPES = {
    **SHAPES,
    **{f"extra/{k}": s for k, s in SHAPES.items()},
    "mesh/wide": (3, 8),
    "mesh/prime": (13,),
    "mesh/prime2": (7, 5),
}
STEPS = 3
# rules whose result reduces over a leaf or over leaves: the same sum in another order on a mesh
REDUCING = ("clip_by_global_norm", "lamb", "lars", "norm", "centralize", "trust_ratio", "adafactor", "fromage")


def _settings(case) -> ModelSettings:
    if not hasattr(case, "settings"):
        return ModelSettings()
    return ModelSettings(ema_decay=case.settings["ema"], ema_debias=case.settings.get("ema_debias", False))


def _run(devices, case):
    params = make_params(0, MESH_SHAPES)
    schema = [LeafSpec(k, dtype_name(v.dtype), v.shape) for k, v in params.items()]
    store = ModelStore(Placement(devices))
    model = admission.create_model(store, "m", schema, case.spec, _settings(case), params)
    for g in make_grads(STEPS, 1, MESH_SHAPES):
        push(model, g)
    return model, capture(model).to_host()


def _differences(a, b, exact: bool) -> str:
    for group in ("params", "opt", "ema"):
        x, y = getattr(a, group), getattr(b, group)
        if (x is None) != (y is None):
            return f"{group}: present on one side only"
        for k in x or {}:
            if k not in y or x[k].dtype != y[k].dtype or x[k].shape != y[k].shape:
                return f"{group} {k}: dtype or shape differs"
            try:
                if exact:
                    np.testing.assert_array_equal(x[k], y[k])
                else:
                    np.testing.assert_allclose(x[k], y[k], rtol=2e-6, atol=1e-7)
            except AssertionError as e:
                return f"{group} {k}: {str(e).strip().splitlines()[-1]}"
    if a.hyperparams != b.hyperparams:
        return "hyperparams differ"
    return ""


def _padding(model) -> str:
    """What is wrong with the padding of the model's packs on the devices (it must be zeros)."""
    with model.snapshot() as snap:
        for key, b in model.placement.padded.items():
            tail = np.asarray(snap.arrays[key])[b.elements :]
            if tail.shape != (b.padding,) or np.any(tail != 0):
                return f"padding of {key}: {tail}"
    return ""


def compare(case) -> dict:
    spec = json.dumps(case.spec).lower()
    exact = not any(word in spec for word in REDUCING)
    mesh, got = _run(jax.devices(), case)
    single, want = _run(jax.devices()[:1], case)
    out = {"id": case.id, "exact": exact, "diff": _differences(got, want, exact) or _padding(mesh)}
    if not out["diff"]:  # each side continues from the other's state: checkpoints move between them
        mesh.replace_state(prepare(mesh, want))
        single.replace_state(prepare(single, got))
        g = make_grads(1, 7, MESH_SHAPES)[0]
        push(mesh, g)
        push(single, g)
        out["diff"] = _differences(capture(mesh).to_host(), capture(single).to_host(), False)
    return out


def main(ids: list[str]) -> None:
    assert len(jax.devices()) > 1, "run with XLA_FLAGS=--xla_force_host_platform_device_count=4"
    model_module.warm_up_steps = donating_step_only  # these models never use the non-donating step
    cases = [c for c in (*CASES, *EMA_CASES) if not ids or c.id in ids]
    for case in cases:
        print(json.dumps(compare(case)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
