"""Models built in this process, without a server, for the unit tests of the core (test_core_*.py)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from optserve.server.core import admission, compilation
from optserve.server.core.model import Model
from optserve.server.core.settings import ModelSettings
from optserve.server.core.store import ModelStore
from optserve.server.core.workers import PushReply
from optserve.wire.chunks import plan_chunks
from optserve.wire.dtypes import LeafSpec, dtype_name

CPU = jax.devices("cpu")[0]
SGD = {"sgd": {"learning_rate": 0.5}}


def params() -> dict[str, np.ndarray]:
    """A float leaf the optimizer updates and an int leaf it carries unchanged."""
    return {"w": np.array([1.0, 2.0, 3.0], np.float32), "n": np.arange(2, dtype=np.int32)}


def grad(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full(3, value, np.float32), "n": np.zeros(2, np.int32)}


def make_model(
    settings: ModelSettings | None = None,
    spec: dict | None = None,
    start: Mapping[str, np.ndarray] | None = None,
    name: str = "m",
) -> Model:
    """A model created through core/admission.py, as every door creates one."""
    p = dict(start if start is not None else params())
    schema = [LeafSpec(k, dtype_name(v.dtype), v.shape) for k, v in p.items()]
    return admission.create_model(ModelStore(CPU), name, schema, spec or SGD, settings or ModelSettings(), p)


def donating_step_only(steps, state, grads, what, wanted):
    """A stand-in for core/compilation.py's warm_up_steps that compiles only the donating step in
    the background: models that are pushed to and never pulled from while an update runs (the
    conformance sweeps) never use the non-donating one, and compiling it doubles their time."""
    args = (*jax.tree.map(compilation._aval, state), grads, np.float32(1.0))
    warm_ups = {donate: compilation.WarmUp(steps[donate], args, what, wanted) for donate in (True, False)}
    compilation._pool.submit(warm_ups[True], 0)  # the other is never queued: a caller would compile it
    return warm_ups


def receive(
    model: Model,
    grads: Mapping[str, np.ndarray],
    *,
    base_step: int | None = None,
    worker_id: str = "",
    seq: int = 0,
    weight: float = 0.0,
    global_norm_sq: float | None = None,
    session: int = 0,
):
    """A push's receiver that has received all of `grads` (what the service does with a stream)."""
    receiver = model.open_push(
        base_step=base_step,
        worker_id=worker_id,
        seq=seq,
        weight=weight,
        global_norm_sq=global_norm_sq,
        session=session,
    )
    for slices, parts in plan_chunks(list(grads.items())):
        receiver.assembler.add(slices, memoryview(b"".join(bytes(p) for p in parts)))
    return receiver


def push(model: Model, grads: Mapping[str, np.ndarray], **kwargs) -> tuple[PushReply, bool]:
    """One whole push, committed: (reply, duplicate)."""
    receiver = receive(model, grads, **kwargs)
    return model.commit_push(receiver, receiver.assembler.finish())


def weights(model: Model) -> np.ndarray:
    with model.snapshot() as snap:
        return np.array(snap.arrays["w"])
