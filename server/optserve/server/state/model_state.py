"""A model's complete state on the host (`HostState`), and the way in and out of a live model.

`capture(model)` takes a consistent snapshot as fresh device copies (`Model.capture_state`, which
holds the model lock only while the copies are dispatched; later updates, which donate their
buffers, cannot touch it); `DeviceSnapshot.to_host()` turns it into a `HostState` of numpy arrays.
`prepare(model, state)` validates all of a `HostState` against the model and puts it on the device
without touching the model; `Model.replace_state` then installs the result, so a bad state changes
nothing. `admit_state(store, name, state)` creates a model from a `HostState` through the one
admission path (core/admission.py).

Tensor groups and keys (README, "Checkpoint format"):
- `params`: parameters by leaf path, e.g. `encoder/layers/0/kernel`;
- `opt`: optimizer-state leaves by state path, the `/`-joined keys of the leaf in the
  optimizer-state pytree, e.g. `count`, `inner_state/0/mu/encoder/layers/0/kernel`,
  `hyperparams/learning_rate`;
- `ema`: leaves of the parameter-EMA state, when the model keeps one, keyed like the optimizer
  state, e.g. `count`, `ema/<leaf path>`.
The manifest (state/manifest.py) describes the rest; state/state_file.py and checkpoint/files.py
store both.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from optserve.server.core import admission
from optserve.server.core.errors import InvalidArgument
from optserve.server.core.layout import StateMap
from optserve.server.core.membership import MembershipState
from optserve.server.core.model import Model, ModelState
from optserve.server.core.placement import ModelPlacement
from optserve.server.core.settings import ModelSettings
from optserve.server.core.sharding import Shard
from optserve.server.core.store import ModelStore
from optserve.server.core.workers import WorkerRecord
from optserve.server.state.errors import StateError
from optserve.wire.assembler import aligned_empty
from optserve.wire.dtypes import FLOAT_DTYPES, LeafSpec

GROUPS = ("params", "opt", "ema")


@dataclasses.dataclass
class HostState:
    """Everything that makes a model continue exactly where it left off, as host data."""

    name: str
    step: int
    schema: list[LeafSpec]
    spec: Any
    settings: ModelSettings
    params: dict[str, np.ndarray]
    opt: dict[str, np.ndarray]  # state path -> leaf, in the optimizer state's leaf order
    ema: dict[str, np.ndarray] | None  # state path -> leaf of the EMA state, in leaf order
    hyperparams: dict[str, float]
    workers: dict[str, WorkerRecord]  # worker_id -> its record (validated; JSON form: state/worker_records.py)
    shard: Shard | None = None  # which shard of a model over several servers (core/sharding.py)
    membership: MembershipState | None = None  # epoch and members (core/membership.py); None: none saved

    def tensor_groups(self) -> dict[str, dict[str, np.ndarray]]:
        groups = {"params": self.params, "opt": self.opt}
        if self.ema is not None:
            groups["ema"] = self.ema
        return groups

    def nbytes(self) -> int:
        return sum(a.nbytes for g in self.tensor_groups().values() for a in g.values())


def host_leaf_form(
    smap: StateMap, tree: Any, what: str, placement: ModelPlacement | None = None
) -> dict[str, np.ndarray]:
    """A model's state pytree of device buffers (optimizer state or EMA) as host arrays of its leaf
    form (core/layout.py, StateMap), by state path (waits for each copy, gathering a sharded one
    once; packs become views, without the padding a mesh holds them with)."""
    host = [np.asarray(x) for x in jax.tree.leaves(tree)]
    if placement is not None:
        host = [placement.state_host(path, a) for (path, _, _), a in zip(smap.entries, host, strict=True)]
    if len(smap.names) != len(smap.order):  # two key paths that join to one name
        raise StateError(f"{what}: two optimizer-state leaves share a key once joined with '/'")
    return dict(zip(smap.names, smap.to_leaves(host).values(), strict=True))


# ---------------------------------------------------------------------------------------------
# Model -> host state


@dataclasses.dataclass
class DeviceSnapshot:
    """Device copies of a model's state plus its host-side bookkeeping, taken under the lock."""

    model: Model
    step: int
    params: dict[str, jax.Array]
    opt_state: Any
    ema: Any
    workers: dict[str, WorkerRecord]  # worker_id -> a copy of its record
    membership: MembershipState | None = None

    def to_host(self) -> HostState:
        """Waits for the copies and views them as numpy (zero copy on CPU; a transfer on GPUs)."""
        m = self.model
        what = f"model {m.name!r}"
        opt = host_leaf_form(m.packing.opt_map, self.opt_state, what, m.placement)
        ema = None
        if self.ema is not None:
            assert m.packing.ema_map is not None  # a model that keeps an EMA has its map
            ema = host_leaf_form(m.packing.ema_map, self.ema, what, m.placement)
        return HostState(
            name=m.name,
            step=self.step,
            schema=list(m.schema),
            spec=m.compiled.spec,
            settings=m.settings,
            params=m.layout.leaf_arrays({k: m.placement.host(k, np.asarray(v)) for k, v in self.params.items()}),
            opt=opt,
            ema=ema,
            hyperparams=m.compiled.hyperparams(self.opt_state),
            workers=self.workers,
            shard=m.shard,
            membership=self.membership,
        )


def capture(model: Model) -> DeviceSnapshot:
    """A consistent snapshot of `model` (Model.capture_state: device copies, dispatched under its lock)."""
    return capture_versioned(model)[0]


def capture_versioned(model: Model) -> tuple[DeviceSnapshot, int]:
    """`capture(model)` and the model's `state_version` it holds, taken together under the lock."""
    return snapshot_of(model, model.capture_state())


def snapshot_of(model: Model, captured: tuple[ModelState, int]) -> tuple[DeviceSnapshot, int]:
    """A state the model captured (`Model.capture_state`, `capture_at`, `take_captured`) as a
    snapshot, with the `state_version` it holds."""
    state, version = captured
    snap = DeviceSnapshot(
        model, state.step, state.params, state.opt_state, state.ema_state, state.workers, state.membership
    )
    return snap, version


# ---------------------------------------------------------------------------------------------
# Host state -> model


def check_compatible(model: Model, state: HostState) -> None:
    """A state can replace a model's only if schema, spec and settings are the model's."""
    what = f"model {model.name!r}"
    if list(state.schema) != list(model.schema):
        raise StateError(f"{what}: the checkpoint's schema differs from the model's (was the model re-created?)")
    if json.dumps(state.spec, sort_keys=True) != json.dumps(model.compiled.spec, sort_keys=True):
        raise StateError(f"{what}: the checkpoint's optimizer spec differs from the model's")
    if state.settings != model.settings:
        raise StateError(f"{what}: the checkpoint's settings differ from the model's")
    if (model.shard is None) != (state.shard is None) or (
        model.shard is not None and not model.shard.same_placement(state.shard)
    ):
        raise StateError(f"{what}: the checkpoint belongs to another shard placement than the model's")


def prepare(model: Model, state: HostState) -> ModelState:
    """Validates `state` against `model` and puts it on the device, for `Model.replace_state`;
    touches nothing of the model."""
    check_compatible(model, state)
    what = f"model {model.name!r}"
    packing = model.packing
    _check_state(what, "optimizer state", packing.opt_map, packing.opt_dtypes, state.opt)
    opt_state = _buffer_form(packing.opt_map, state.opt, model.placement)
    _check_leaves(what, "params", model.schema, state.params)
    if (state.ema is None) != (packing.ema_map is None):
        has = (
            "holds a parameter EMA but the model keeps none"
            if packing.ema_map is None
            else "holds no parameter EMA but the model keeps one"
        )
        raise StateError(f"{what}: the state {has}")
    ema = None
    if packing.ema_map is not None and state.ema is not None:  # both or neither (checked above)
        _check_state(what, "EMA state", packing.ema_map, packing.ema_dtypes, state.ema)
        ema = _buffer_form(packing.ema_map, state.ema, model.placement)
    _check_hyperparams_state(what, state.opt)
    workers = {w: r.copy() for w, r in state.workers.items()}
    buffers = model.layout.pack_arrays(state.params)
    params = {k: model.placement.put(k, own(buffers[k])) for k in model.layout.keys}
    return ModelState(
        step=state.step, params=params, opt_state=opt_state, ema_state=ema, workers=workers, membership=state.membership
    )


def _check_hyperparams_state(what: str, opt: Mapping[str, np.ndarray]) -> None:
    """Hyperparameters held in the optimizer state (tunable and injected ones) must be finite: no
    client could have set anything else (CreateModel and SetHyperparams validate them)."""
    for path, a in opt.items():
        if (
            path.startswith("hyperparams/")
            and a.dtype.name in FLOAT_DTYPES
            and not np.isfinite(a.astype(np.float64)).all()
        ):
            raise StateError(f"{what}: optimizer state leaf {path!r}: hyperparameter is not finite ({a})")


def admit_state(store: ModelStore, name: str, state: HostState) -> Model:
    """Creates model `name` from a validated HostState (`manifest.from_manifest`) through
    core/admission.py, as CreateModel creates one: limits, spec and tensors checked before anything
    is allocated for it; INVALID_ARGUMENT for a state that does not fit together. The model appears
    in the store only once its whole state is installed; whatever fails, nothing remains."""

    def check_params() -> None:
        try:
            _check_leaves(f"model {name!r}", "params", state.schema, state.params)
        except StateError as e:
            raise InvalidArgument(str(e)) from None

    def restore(model: Model) -> ModelState:
        try:
            return prepare(model, state)
        except StateError as e:
            raise InvalidArgument(str(e)) from None

    with admission.admit(
        store, name, state.schema, state.spec, state.settings, validate=check_params, shard=state.shard
    ) as admitted:
        return admitted.create({k: own(v) for k, v in state.params.items()}, restore=restore)


def own(a: np.ndarray) -> np.ndarray:
    # A private, aligned, writable buffer: on CPU the device array aliases it and donation writes it.
    out = aligned_empty(a.nbytes).view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _check_state(
    what: str, group: str, smap: StateMap, dtypes: Sequence[frozenset], arrays: Mapping[str, np.ndarray]
) -> None:
    """The leaf form of an optimizer or EMA state must have every leaf of the model's, with its
    shape and an allowed dtype, and nothing else (StateMap.check)."""
    wrong = smap.check(arrays, dtypes, group)
    if wrong:
        raise StateError(f"{what}: {wrong}")


def _buffer_form(smap: StateMap, arrays: Mapping[str, np.ndarray], placement: ModelPlacement) -> Any:
    """Checked host arrays of a state's leaf form (by state path) as the model's device pytree over
    its buffers (packs gathered), each leaf placed as the model's step expects it (core/placement.py)."""
    by_key = {path: arrays["/".join(path)] for path in smap.order}
    buffers = smap.to_buffers(by_key)
    put = [placement.put_state(path, own(a)) for (path, _, _), a in zip(smap.entries, buffers, strict=True)]
    return jax.tree.unflatten(smap.treedef, put)


def _check_leaves(what: str, group: str, schema: list[LeafSpec], arrays: Mapping[str, np.ndarray]) -> None:
    if set(arrays) != {leaf.path for leaf in schema}:
        missing = [leaf.path for leaf in schema if leaf.path not in arrays]
        known = {leaf.path for leaf in schema}
        extra = [p for p in arrays if p not in known]
        raise StateError(
            f"{what}: {group}: " + (f"missing leaf {missing[0]!r}" if missing else f"unexpected leaf {extra[0]!r}")
        )
    for leaf in schema:
        a = arrays[leaf.path]
        if a.dtype.name != leaf.dtype or tuple(a.shape) != tuple(leaf.shape):
            raise StateError(
                f"{what}: {group} leaf {leaf.path!r}: expected {leaf.dtype}{list(leaf.shape)}, "
                f"got {a.dtype.name}{list(a.shape)}"
            )
